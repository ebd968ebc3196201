"""``python -m jtp.bench llama``: Llama memory and communication per step, abstractly.

Compiles the trainer's real Llama train step abstractly (:mod:`jtp.training.compile`:
nothing allocated) on 64 forced CPU devices and reads per-device memory and collective bytes
per step: the tiny preset at (1,8), (2,4), (8,1) with and without fsdp / sequence parallel /
remat, and llama3-8b at data 8 x tensor 8.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from jtp.bench.results import machine, write_result


def _llama_row(
    preset: str, shape: tuple[int, int], seq_len: int, batch: int, devices: list, **flags: Any
) -> dict[str, Any]:
    import dataclasses

    from jtp.analysis.collectives import bytes_by_axes, collectives
    from jtp.analysis.memory import peak_memory_per_device
    from jtp.recipes import LlamaTaskConfig
    from jtp.recipes.llama import abstract_llama_step

    precision = flags.pop("precision", "32-true")
    config = LlamaTaskConfig(preset=preset, seq_len=seq_len, batch_size=batch, **flags)
    t0 = time.perf_counter()
    compiled, mesh = abstract_llama_step(config, shape, devices, precision=precision)
    seconds = time.perf_counter() - t0
    colls = collectives(compiled, mesh)
    by_axis = bytes_by_axes(colls)
    flags_on = [f for k, v in dataclasses.asdict(config).items() if (f := _flag(k, v))]
    return {
        "preset": preset,
        "mesh": {"data": shape[0], "tensor": shape[1]},
        "flags": flags_on + ([precision] if precision != "32-true" else []),
        "seq_len": seq_len,
        "global_batch": batch,
        "peak_bytes_per_device": peak_memory_per_device(compiled),
        "collective_bytes_by_axis": by_axis,
        "collectives": len(colls),
        "compile_seconds": seconds,
    }


def _flag(field: str, value: Any) -> str | None:
    """How an option shows in the table: its name when on; ``remat`` (full) or
    ``remat=POLICY``; ``unrolled`` for layers that are not scanned (the default)."""
    if field == "remat":
        return None if value == "none" else "remat" if value == "full" else f"remat={value}"
    if field == "scan_layers":
        return None if value else "unrolled"
    return field if value is True else None


def format_llama(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"| {'preset':<10} | {'mesh d x t':>10} | {'options':<52} | {'peak/device':>12} | "
        f"{'tensor-axis bytes':>17} | {'data-axis bytes':>15} | {'other':>9} |",
        f"|{'-' * 12}|{'-' * 12}|{'-' * 54}|{'-' * 14}|{'-' * 19}|{'-' * 17}|{'-' * 11}|",
    ]
    for r in rows:
        ax = dict(r["collective_bytes_by_axis"])
        tensor, data = ax.pop("tensor", 0), ax.pop("data", 0)
        mesh = f"{r['mesh']['data']} x {r['mesh']['tensor']}"
        lines.append(
            f"| {r['preset']:<10} | {mesh:>10} | {', '.join(r['flags']) or 'plan only':<52} | "
            f"{_human(r['peak_bytes_per_device']):>12} | {_human(tensor):>17} | "
            f"{_human(data):>15} | {_human(sum(ax.values())):>9} |"
        )
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def llama(args: argparse.Namespace) -> dict[str, Any]:
    from jtp.mesh import select_devices

    devices = select_devices(64)
    rows = []
    variants = [
        {},
        {"fsdp": True},
        {"sequence_parallel": True},
        {"remat": True},
        {"fsdp": True, "sequence_parallel": True, "remat": True},
    ]
    for shape in [(1, 8), (2, 4), (8, 1)]:
        for flags in variants:
            if flags.get("sequence_parallel") and shape[1] == 1:
                continue
            rows.append(_llama_row("tiny", shape, 32, 8, devices, **flags))
            print(f"  tiny {shape} {flags}", file=sys.stderr)
    if not args.no_8b:
        big = {"fsdp": True, "precision": "bf16-mixed", "loss_parallel": True}
        for extra in ({"remat": True}, {"remat": True, "sequence_parallel": True}, {}):
            rows.append(_llama_row("llama3-8b", (8, 8), 8192, 8, devices, **big, **extra))
            print(f"  llama3-8b {extra}: {rows[-1]['compile_seconds']:.0f} s", file=sys.stderr)
    table = (
        "Llama train step (AdamW), per device, from the compiled program (abstract: nothing "
        f"allocated; {jax_platform()} backend, 64 forced devices). tiny: batch 8 x 32 tokens; "
        "llama3-8b: batch 8 x 8192 tokens.\n" + format_llama(rows)
    )
    print(table)
    payload = {"benchmark": "llama", "machine": machine(), "rows": rows}
    write_result(args, payload)
    return payload


def jax_platform() -> str:
    import jax

    return jax.devices()[0].platform
