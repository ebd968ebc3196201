"""``python -m jtp.bench multihost``: what multi-process safety and accumulation cost.

Two measurements, both in JSON for docs/multi-host.md:

- the stop agreement: two real processes on 127.0.0.1 (4 forced CPU devices each, gloo)
  time ``agree_max``, the one all-gather of an int32 per process that every process runs
  every ``stop_check_every_n_steps`` optimizer steps;
- gradient accumulation: the Llama train step compiled abstractly on a (2, 4) mesh for
  k = 1 and k = 4, each ``grad_reduce`` choice, with and without fsdp: memory per device and
  bytes over "data" per optimizer step (loop bodies counted once per trip).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from jtp.bench.results import machine, write_result

GB = 1e9


def _agree_worker(coord: str, pid: int, calls: int) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(coord, 2, pid, heartbeat_timeout_seconds=10)
    from jtp.distributed import agree_max

    for _ in range(10):  # warm up: compile the gather
        agree_max(pid)
    t0 = time.perf_counter()
    for i in range(calls):
        agree_max(i % 2)
    ms = (time.perf_counter() - t0) / calls * 1e3
    print(json.dumps({"process": pid, "ms_per_agreement": ms}), flush=True)
    jax.distributed.shutdown()
    os._exit(0)  # gloo may hang in interpreter teardown (see jtp.cli.train)


def agreement_ms(calls: int) -> list[float]:
    """ms per agreement, per process, of a 2-process job on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "jtp.bench.multihost", "agree-worker", f"127.0.0.1:{port}"]
    procs = [
        subprocess.Popen([*cmd, str(i), str(calls)], stdout=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    rows = [json.loads(next(ln for ln in o.splitlines() if ln.startswith("{"))) for o in outs]
    return [r["ms_per_agreement"] for r in rows]


ACCUM_MODEL = dict(
    vocab_size=8192, dim=512, n_layers=2, n_heads=8, n_kv_heads=8, ffn_hidden=1536, max_seq_len=256
)


def accumulation_rows() -> list[dict[str, Any]]:
    """Memory and data-axis bytes per optimizer step for each accumulation choice."""
    import jax

    from jtp.analysis.collectives import bytes_by_axes, collectives
    from jtp.analysis.memory import peak_memory_per_device
    from jtp.models.llama import LlamaConfig
    from jtp.recipes import LlamaTaskConfig
    from jtp.recipes.llama import abstract_llama_step

    rows, model = [], LlamaConfig(**ACCUM_MODEL)
    for fsdp in (False, True):
        config = LlamaTaskConfig(seq_len=256, batch_size=8, fsdp=fsdp, loss_parallel=True)
        for k, reduce in ((1, None), (4, "per_step"), (4, "per_micro_batch")):
            compiled, mesh = abstract_llama_step(
                config,
                (2, 4),
                jax.devices(),
                accumulate=k,
                grad_reduce=reduce,
                model_config=model,
            )
            by_axes = bytes_by_axes(collectives(compiled, mesh))
            rows.append(
                {
                    "fsdp": fsdp,
                    "k": k,
                    "grad_reduce": reduce or "-",
                    "memory_bytes": peak_memory_per_device(compiled),
                    "data_bytes_per_step": by_axes.get("data", 0),
                    "tensor_bytes_per_step": by_axes.get("tensor", 0),
                }
            )
            print(f"  fsdp={fsdp} k={k} {reduce}", file=sys.stderr)
    return rows


def format_multihost(payload: dict[str, Any]) -> str:
    ms = payload["agreement_ms"]
    m = payload["model"]
    lines = [
        f"Stop agreement (2 processes x 4 CPU devices, gloo, {payload['calls']} calls): "
        f"{max(ms):.2f} ms per agreement (slowest process)",
        "",
        f"Llama dim {m['dim']}, {m['n_layers']} layers, vocab {m['vocab_size']}, seq 256, "
        "8 rows per loader batch, mesh data 2 x tensor 4, AdamW fp32; per device, per "
        "optimizer step:",
        f"| {'layout':<6} | {'k':>2} | {'grad_reduce':<15} | {'memory MB':>9} | "
        f"{'data-axis MB/step':>17} | {'tensor-axis MB/step':>19} |",
        f"|{'-' * 8}|{'-' * 4}|{'-' * 17}|{'-' * 11}|{'-' * 19}|{'-' * 21}|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {'fsdp' if r['fsdp'] else 'tp':<6} | {r['k']:>2} | {r['grad_reduce']:<15} | "
            f"{r['memory_bytes'] / 1e6:>9.2f} | {r['data_bytes_per_step'] / 1e6:>17.2f} | "
            f"{r['tensor_bytes_per_step'] / 1e6:>19.2f} |"
        )
    return "\n".join(lines)


def multihost(args: argparse.Namespace) -> dict[str, Any]:
    from jtp.mesh import select_devices

    select_devices(8)
    payload = {
        "benchmark": "multihost",
        "machine": machine(),
        "calls": args.calls,
        "agreement_ms": agreement_ms(args.calls),
        "model": ACCUM_MODEL,
        "rows": accumulation_rows(),
    }
    print(format_multihost(payload))
    write_result(args, payload)
    return payload


if __name__ == "__main__" and sys.argv[1:2] == ["agree-worker"]:
    _agree_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
