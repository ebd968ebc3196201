"""``python -m jtp.bench compile``: how long the Llama train step takes to compile, scanned
vs unrolled, by depth; and what each remat policy costs in memory and FLOPs.

The step is the trainer's (:func:`jtp.recipes.llama.abstract_llama_step`: AdamW, the Llama
plan on a (2, 4) mesh with fsdp, remat "full", bf16-mixed), compiled on abstract arrays
(nothing allocated) for 8 forced CPU devices. A compile's seconds run from the model's
shapes to the compiled program (tracing, lowering, XLA). Unrolled blocks are traced and
compiled once each: their time grows with the depth. A scanned stack is one loop body
whatever the depth. The remat rows compile each policy at one depth, both forms; FLOPs are
the unrolled program's (XLA's cost analysis counts a loop body once, not once per trip).
Every compile here runs with jax's persistent compilation cache off, whatever
``--compilation-cache`` says: with a warm cache the table would time loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from jtp.analysis import compiling
from jtp.bench.results import machine, write_result

MESH = (2, 4)
PRECISION = "bf16-mixed"


def _model(args: argparse.Namespace, n_layers: int, **overrides: Any) -> Any:
    """A Llama of width ``args.dim`` (head dim 16, half as many kv heads, SwiGLU 3 x dim)."""
    from jtp.models.llama import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        dim=args.dim,
        n_layers=n_layers,
        n_heads=args.dim // 16,
        n_kv_heads=args.dim // 32,
        ffn_hidden=3 * args.dim,
        max_seq_len=args.seq,
        **overrides,
    )


def _compile(model: Any, devices: list, seq: int, batch: int) -> tuple[Any, float]:
    """The compiled train step of ``model`` and the seconds it took."""
    from jtp.recipes import LlamaTaskConfig
    from jtp.recipes.llama import abstract_llama_step

    task = LlamaTaskConfig(seq_len=seq, batch_size=batch, fsdp=True, remat=model.remat)
    with compiling.afresh():  # a cached program would time a load, not a compile
        t0 = time.perf_counter()
        compiled, _ = abstract_llama_step(
            task, MESH, devices, precision=PRECISION, model_config=model
        )
        return compiled, time.perf_counter() - t0


def format_compile(p: dict[str, Any]) -> str:
    """Two tables: compile seconds by depth; memory and FLOPs by remat policy."""
    lines = [
        f"Llama train step, width {p['model']['dim']}, {p['model']['n_heads']} heads, batch "
        f"{p['global_batch']} x {p['seq_len']} tokens, mesh {p['mesh']['data']} x "
        f"{p['mesh']['tensor']}, fsdp, {p['precision']}; seconds from shapes to the compiled "
        "program.",
        "| layers | scanned s | unrolled s | unrolled / scanned |",
        "|-------:|----------:|-----------:|-------------------:|",
    ]
    for r in p["rows"]:
        ratio = r["unrolled_s"] / r["scanned_s"]
        lines.append(
            f"| {r['layers']:>6} | {r['scanned_s']:>9.1f} | {r['unrolled_s']:>10.1f} | "
            f"{ratio:>17.1f}x |"
        )
    base = next((r for r in p["policies"] if r["remat"] == "none"), p["policies"][0])
    lines += [
        "",
        f"Per remat policy at {p['policy_layers']} layers: peak memory per device (compiled) "
        "and FLOPs per device per step (XLA's count, unrolled program).",
        f"| remat   | peak scanned | peak unrolled | FLOPs    | FLOPs vs {base['remat']:<4} |",
        "|---------|-------------:|--------------:|---------:|--------------:|",
    ]
    for r in p["policies"]:
        lines.append(
            f"| {r['remat']:<7} | {_mb(r['scanned_peak_bytes_per_device']):>12} | "
            f"{_mb(r['unrolled_peak_bytes_per_device']):>13} | "
            f"{r['flops_per_device'] / 1e9:>6.2f} G | "
            f"{r['flops_per_device'] / base['flops_per_device']:>12.2f}x |"
        )
    return "\n".join(lines)


def compile(args: argparse.Namespace) -> dict[str, Any]:  # the sub-command's name
    from jtp.mesh import select_devices

    devices = select_devices(8)
    from jtp.analysis.memory import peak_memory_per_device
    from jtp.models.stack import remat_name

    depths = [int(d) for d in args.depths.split(",")]
    rows = []
    for n in depths:
        row = {"layers": n}
        for scan in (True, False):
            model = _model(args, n, remat="full", scan_layers=scan)
            _, row["scanned_s" if scan else "unrolled_s"] = _compile(model, devices, args.seq, 8)
        rows.append(row)
        print(
            f"  {n} layers: {row['scanned_s']:.1f} s scanned, {row['unrolled_s']:.1f} s unrolled",
            file=sys.stderr,
        )
    policies = []
    for policy in [remat_name(r) for r in args.remat.split(",")]:
        row = {"remat": policy}
        for scan in (True, False):
            model = _model(args, args.policy_layers, remat=policy, scan_layers=scan)
            compiled, seconds = _compile(model, devices, args.seq, 8)
            form = "scanned" if scan else "unrolled"
            row[f"{form}_peak_bytes_per_device"] = peak_memory_per_device(compiled)
            row[f"{form}_s"] = seconds
            if not scan:
                row["flops_per_device"] = float(compiled.cost_analysis()["flops"])
        policies.append(row)
        print(f"  remat {policy}: done", file=sys.stderr)
    payload = {
        "benchmark": "compile",
        "machine": machine(),
        "mesh": {"data": MESH[0], "tensor": MESH[1]},
        "precision": PRECISION,
        "model": dataclasses.asdict(_model(args, args.policy_layers)),
        "seq_len": args.seq,
        "global_batch": 8,
        "policy_layers": args.policy_layers,
        "rows": rows,
        "policies": policies,
    }
    write_result(args, payload)
    print(format_compile(payload))
    return payload


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
