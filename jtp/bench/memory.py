"""``python -m jtp.bench memory``: the Lightning docs' memory table, re-measured.

FeedForward(dim, dim) + AdamW, global batch 8, with tensor parallelism over 1, 2, 4, 8
devices and 2D (data 2 x tensor 4, fsdp). Each configuration is a real ``python -m
jtp.train`` run in its own process (forced CPU devices on a CPU machine), and its
per-device peak is the one the trainer reports. Beside it: Lightning's published CUDA
figures and the floor, (params + grads + 2 AdamW moments) / N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from jtp.bench.results import machine, write_result

GB = 1e9
LIGHTNING_GB = {1: 4.04, 2: 2.03, 4: 1.02, 8: 0.60}  # docs table, CUDA, 8192x8192, AdamW
MEMORY_CONFIGS = [  # (data, tensor, fsdp)
    (1, 1, False),
    (1, 2, False),
    (1, 4, False),
    (1, 8, False),
    (2, 4, True),
]


def _train_run(data: int, tensor: int, fsdp: bool, dim: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.json")
        cmd = [
            sys.executable,
            "-m",
            "jtp.train",
            "--devices",
            str(data * tensor),
            "--data-parallel",
            str(data),
            "--tensor-parallel",
            str(tensor),
            "--dim",
            str(dim),
            "--hidden-dim",
            str(dim),
            "--max-steps",
            str(steps),
            "--no-enable-progress-bar",
            "--default-root-dir",
            tmp,
            "--metrics-json",
            out,
        ]
        if fsdp:
            cmd.append("--fsdp")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=1800)
        with open(out) as f:
            return json.load(f)


def memory(args: argparse.Namespace) -> dict[str, Any]:
    state_bytes = 4 * 3 * args.dim * args.dim * 4  # (params + grads + mu + nu) x 3 kernels, fp32
    rows = []
    for data, tensor, fsdp in MEMORY_CONFIGS:
        t0 = time.perf_counter()
        run = _train_run(data, tensor, fsdp, args.dim, args.steps)
        shards = data * tensor if fsdp else tensor
        floor = state_bytes / shards
        peak = run["peak_memory_bytes_per_device"]
        lightning = LIGHTNING_GB.get(data * tensor) if not fsdp and data == 1 else None
        # FSDP gathers each kernel's tensor shard over "data" for the step: on this one-layer
        # model that is the whole layer's tensor shard, held transiently beside the state.
        gathered = 3 * args.dim * args.dim * 4 / tensor if fsdp else 0
        rows.append(
            {
                "config": f"2D fsdp {data}x{tensor}" if fsdp else f"TP={tensor}",
                "devices": data * tensor,
                "mesh": run["mesh"],
                "fsdp": fsdp,
                "platform": run["platform"],
                "peak_bytes_per_device": peak,
                "floor_bytes_per_device": floor,
                "ratio_to_floor": peak / floor,
                "gathered_bytes_per_device": gathered,
                "ratio_to_floor_plus_gathered": peak / (floor + gathered),
                "lightning_gb": lightning if args.dim == 8192 else None,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"  measured {rows[-1]['config']}: {peak / GB:.3f} GB", file=sys.stderr)
    print(format_memory(rows, args.dim))
    payload = {"benchmark": "memory", "dim": args.dim, "machine": machine(), "rows": rows}
    write_result(args, payload)
    if args.plot:
        _plot(rows, args.plot, f"FeedForward {args.dim}x{args.dim} + AdamW")
    return payload


def format_memory(rows: list[dict[str, Any]], dim: int) -> str:
    head = (
        f"FeedForward({dim}, {dim}) + AdamW, batch 8: peak memory per device "
        f"({rows[0]['platform']}; compiled-step analysis where the backend keeps no stats)\n"
    )
    lines = [
        f"| {'config':<15} | {'devices':>7} | {'jtp GB':>7} | {'floor GB':>8} | "
        f"{'jtp/floor':>9} | {'Lightning GB':>12} | {'jtp/Lightning':>13} |",
        f"|{'-' * 17}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 14}|{'-' * 15}|",
    ]
    for r in rows:
        lt = r["lightning_gb"]
        peak_gb = r["peak_bytes_per_device"] / GB
        lines.append(
            f"| {r['config']:<15} | {r['devices']:>7} | {peak_gb:>7.3f} | "
            f"{r['floor_bytes_per_device'] / GB:>8.3f} | {r['ratio_to_floor']:>9.3f} | "
            f"{(f'{lt:.2f}' if lt else '-'):>12} | {(f'{peak_gb / lt:.2f}' if lt else '-'):>13} |"
        )
    notes = [
        f"{r['config']}: floor + the FSDP-gathered layer "
        f"({r['gathered_bytes_per_device'] / GB:.3f} GB) = "
        f"{(r['floor_bytes_per_device'] + r['gathered_bytes_per_device']) / GB:.3f} GB; "
        f"jtp / that = {r['ratio_to_floor_plus_gathered']:.3f}"
        for r in rows
        if r["fsdp"]
    ]
    return head + "\n".join(lines + notes)


def _plot(rows: list[dict[str, Any]], path: str, title: str = "FeedForward + AdamW") -> None:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped", file=sys.stderr)
        return
    tp = [r for r in rows if not r["fsdp"]]
    n = [r["devices"] for r in tp]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(n, [r["peak_bytes_per_device"] / GB for r in tp], "o-", label="jtp (measured)")
    ax.plot(n, [r["floor_bytes_per_device"] / GB for r in tp], "k--", label="floor: state / N")
    lt = [(r["devices"], r["lightning_gb"]) for r in tp if r["lightning_gb"]]
    if lt:
        ax.plot(*zip(*lt, strict=True), "s-", label="Lightning (published, CUDA)")
    ax.set(xscale="log", xlabel="tensor-parallel devices", ylabel="peak GB per device")
    ax.set_xticks(n, [str(v) for v in n])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"{title}: jtp on {tp[0]['platform'].upper()} (forced devices)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
