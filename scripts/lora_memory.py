"""Compiled memory per device of a LoRA train step against full fine-tuning (CPU figures).

    .venv/bin/python scripts/lora_memory.py [--preset llama3-8b] [--rank 16] [--out PATH]

Both steps are compiled on abstract arrays (nothing is allocated: jtp's planner path) on 8
forced CPU devices, as ``Trainer.fit`` would run them: the same model, mesh (2 x 4, fsdp),
batch and precision, AdamW; LoRA on all seven targets. XLA's ``memory_analysis`` per device:
arguments (parameters + optimizer state + batch), temporaries, and the peak
(``jtp.peak_memory_per_device``). Written to bench_results/lora_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402

from jtp.analysis.memory import peak_memory_per_device  # noqa: E402
from jtp.cli.recipes import abstract_llama_step  # noqa: E402
from jtp.cli.task_config import LlamaTaskConfig  # noqa: E402

GIB = 2**30


def measure(preset: str, rank: int, seq: int, batch: int, precision: str) -> dict:
    config = LlamaTaskConfig(preset=preset, seq_len=seq, batch_size=batch, fsdp=True,
                             lora_rank=rank, lora_alpha=2.0 * max(rank, 1))  # fmt: skip
    compiled, _ = abstract_llama_step(config, (2, 4), jax.devices(), precision=precision)
    m = compiled.memory_analysis()
    return {
        "lora_rank": rank,
        "arguments_gib": m.argument_size_in_bytes / GIB,
        "temporaries_gib": m.temp_size_in_bytes / GIB,
        "peak_gib": peak_memory_per_device(compiled) / GIB,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--out", default=os.path.join("bench_results", "lora_memory.json"))
    a = p.parse_args()
    rows = [measure(a.preset, r, a.seq_len, a.batch_size, a.precision) for r in (0, a.rank)]
    result = {
        "platform": jax.devices()[0].platform, "mesh": {"data": 2, "tensor": 4}, "fsdp": True,
        "preset": a.preset, "seq_len": a.seq_len, "batch_size": a.batch_size,
        "precision": a.precision, "optimizer": "adamw", "rows": rows,
    }  # fmt: skip
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        name = "full fine-tuning" if r["lora_rank"] == 0 else f"LoRA r={r['lora_rank']}"
        print(
            f"{name:18s} args {r['arguments_gib']:7.2f} GiB  temps {r['temporaries_gib']:6.2f}"
            f" GiB  peak {r['peak_gib']:7.2f} GiB per device"
        )


if __name__ == "__main__":
    main()
