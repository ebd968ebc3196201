"""``python -m jtp.bench lora``: compiled memory per device of a LoRA train step against
full fine-tuning.

Both steps are compiled on abstract arrays (nothing is allocated: the planner's path) on 8
forced CPU devices, as ``Trainer.fit`` runs them: the same model, mesh (2 x 4, fsdp), batch
and precision, AdamW; LoRA on all seven targets. XLA's ``memory_analysis`` per device:
arguments (parameters + optimizer state + batch), temporaries, and the peak
(``jtp.peak_memory_per_device``). CPU figures: a GPU's XLA schedules the temporaries
differently; the argument sizes are exact either way.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jtp.bench.results import machine, write_result

GIB = 2**30


def lora(args: argparse.Namespace) -> dict[str, Any]:
    from jtp.mesh import select_devices

    devices = select_devices(8)
    rows = [_measure(args, rank, devices) for rank in (0, args.rank)]
    payload = {
        "benchmark": "lora",
        "machine": machine(),
        "platform": devices[0].platform,
        "mesh": {"data": 2, "tensor": 4},
        "fsdp": True,
        "preset": args.preset,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "optimizer": "adamw",
        "rows": rows,
    }
    print(format_lora(payload))
    write_result(args, payload)
    return payload


def _measure(args: argparse.Namespace, rank: int, devices: list) -> dict[str, Any]:
    from jtp.analysis.memory import peak_memory_per_device
    from jtp.recipes import LlamaTaskConfig
    from jtp.recipes.llama import abstract_llama_step

    config = LlamaTaskConfig(
        preset=args.preset,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        fsdp=True,
        lora_rank=rank,
        lora_alpha=2.0 * max(rank, 1),
    )
    compiled, _ = abstract_llama_step(config, (2, 4), devices, precision=args.precision)
    m = compiled.memory_analysis()
    print(f"  rank {rank}: compiled", file=sys.stderr)
    return {
        "lora_rank": rank,
        "arguments_gib": m.argument_size_in_bytes / GIB,
        "temporaries_gib": m.temp_size_in_bytes / GIB,
        "peak_gib": peak_memory_per_device(compiled) / GIB,
    }


def format_lora(p: dict[str, Any]) -> str:
    lines = [
        f"{p['preset']}, mesh {p['mesh']['data']}x{p['mesh']['tensor']} fsdp, {p['precision']}, "
        f"batch {p['batch_size']} x {p['seq_len']}, AdamW; per device, {p['platform']} compile",
        "| | arguments (params + opt state + batch) | temporaries | peak |",
        "|---|---|---|---|",
    ]
    for r in p["rows"]:
        name = "full fine-tuning" if r["lora_rank"] == 0 else f"LoRA r = {r['lora_rank']}"
        lines.append(
            f"| {name} | {r['arguments_gib']:.2f} GiB | {r['temporaries_gib']:.2f} GiB "
            f"| {r['peak_gib']:.2f} GiB |"
        )
    return "\n".join(lines)
