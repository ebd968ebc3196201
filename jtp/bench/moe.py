"""``python -m jtp.bench moe``: a mixture-of-experts train step against a dense one with the
same active parameters, dropless against a capacity factor, and experts split over
"tensor" against an "expert" axis.

The model: 4 blocks (``--layers``) of width 256, 8 experts of hidden width 256, 2 per token
(``softmax_topk``, renormalised); its dense twin has one feed-forward of hidden width
2 x 256, so both multiply every token by the same number of feed-forward weights (the
same *active* parameters; the MoE model holds 4x the feed-forward parameters). Batch 8 x
256 tokens, float32, AdamW, the trainer's own step (``jtp.training.compile``), on forced
CPU devices.

Per row: the step time (best of ``--repeats`` after a compiled warm-up step), XLA's peak
memory per device, the compiled step's FLOPs (XLA's cost analysis), the bytes its
collectives move per device and step by mesh axis (from the compiled HLO,
:mod:`jtp.analysis.collectives`), and the share of (token, expert) pairs dropped.

What a CPU shows and a GPU would not: XLA:CPU lowers ``ragged_dot`` (the dropless grouped
matmuls) to a dense product masked per expert, so each row meets every expert's weights
(E / k = 4x the top-k FLOPs here); the capacity path's batched matmuls do not. On CPU the
padded exchange over "expert" sends worst-case buffers (each destination N k rows); a
GPU's ragged all-to-all sends only the pairs (:mod:`jtp.parallel.expert_exchange`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Any

from jtp.bench.results import machine, write_result

MIB = 2**20
LAYOUTS: tuple[dict[str, Any], ...] = (
    {"name": "dense twin", "dense": True},
    {"name": "MoE dropless"},
    {"name": "MoE capacity 1.25", "capacity_factor": 1.25},
    {"name": "dense twin", "dense": True, "data": 2, "tensor": 4},
    {"name": "MoE dropless", "data": 2, "tensor": 4},
    {"name": "MoE dropless", "data": 2, "expert": 4},
    {"name": "MoE capacity 1.25", "capacity_factor": 1.25, "data": 2, "expert": 4},
)


def moe(args: argparse.Namespace) -> dict[str, Any]:
    from jtp.mesh import select_devices

    devices = select_devices(8)
    rows = []
    for layout in LAYOUTS:
        rows.append(_measure(args, layout, devices))
        print(f"  {_label(rows[-1])}: {rows[-1]['step_seconds'] * 1e3:.0f} ms", file=sys.stderr)
    payload = {
        "benchmark": "moe",
        "machine": machine(),
        "platform": devices[0].platform,
        "model": dataclasses.asdict(_model_shapes(args.layers, args.seq_len, dense=False)),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "rows": rows,
    }
    print(format_moe(payload))
    write_result(args, payload)
    return payload


def _model_shapes(
    n_layers: int, seq_len: int, *, dense: bool, capacity_factor: float | None = None
):
    from jtp.models.llama import LlamaConfig

    moe = LlamaConfig(
        vocab_size=512,
        dim=256,
        n_layers=n_layers,
        n_heads=8,
        n_kv_heads=4,
        ffn_hidden=512,
        max_seq_len=max(256, seq_len),
        n_experts=8,
        experts_per_token=2,
        moe_ffn_hidden=256,
        norm_topk_prob=True,
        capacity_factor=capacity_factor,
    )
    if dense:  # the same active feed-forward: k experts' width in one
        return dataclasses.replace(moe, n_experts=0, moe_ffn_hidden=0, norm_topk_prob=False)
    return moe


def _measure(args: argparse.Namespace, layout: dict[str, Any], devices: list) -> dict[str, Any]:
    import jax
    import numpy as np

    from jtp.analysis.collectives import bytes_by_axes, collectives
    from jtp.analysis.memory import peak_memory_per_device
    from jtp.mesh import ModelParallelStrategy
    from jtp.parallel.batch import shard_batch
    from jtp.recipes import LlamaTaskConfig
    from jtp.recipes.llama import LlamaTask
    from jtp.training.compile import build_state, compile_train_step, train_step
    from jtp.training.options import TrainerOptions

    data, tensor, expert = (layout.get(k, 1) for k in ("data", "tensor", "expert"))
    n = data * tensor * expert
    config = LlamaTaskConfig(seq_len=args.seq_len, batch_size=args.batch_size)
    shapes = _model_shapes(
        args.layers,
        args.seq_len,
        dense=layout.get("dense", False),
        capacity_factor=layout.get("capacity_factor"),
    )
    task = LlamaTask(config, model_config=shapes)
    strategy = ModelParallelStrategy(data, tensor, expert_parallel_size=expert, devices=devices[:n])
    options = TrainerOptions()
    state, rules = build_state(task, strategy, options)
    step = train_step(task, state, options, fsdp=False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, (args.batch_size, args.seq_len + 1), dtype=np.int32)
    batches = [shard_batch(tokens, strategy.mesh)]
    compiled = compile_train_step(step, state, batches, rules)
    arrays = state.arrays()
    best = float("inf")
    for i in range(args.repeats + 1):  # the first run warms up
        start = time.perf_counter()
        *arrays, metrics = compiled(*arrays, batches)
        jax.block_until_ready(metrics)
        if i:
            best = min(best, time.perf_counter() - start)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "layout": layout["name"],
        "mesh": {"data": data, "expert": expert, "tensor": tensor},
        "capacity_factor": layout.get("capacity_factor"),
        "dense": bool(layout.get("dense")),
        "step_seconds": best,
        "peak_mib": peak_memory_per_device(compiled) / MIB,
        "gflops": float(cost.get("flops", 0.0)) / 1e9,
        # Collectives over some axis (a psum over an axis of size 1 moves nothing).
        "bytes_by_axes": bytes_by_axes([r for r in collectives(compiled, strategy.mesh) if r.axes]),
        "dropped_fraction": float(metrics.get("dropped_fraction", 0.0)),
    }


def _label(row: dict[str, Any]) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in row["mesh"].items() if v > 1) or "1 device"
    return f"{row['layout']}, {mesh}"


def format_moe(p: dict[str, Any]) -> str:
    m = p["model"]
    lines = [
        f"MoE: {m['n_layers']} blocks, width {m['dim']}, {m['n_experts']} experts of "
        f"{m['moe_ffn_hidden']}, top-{m['experts_per_token']}; dense twin: hidden "
        f"{m['experts_per_token'] * m['moe_ffn_hidden']}. Batch {p['batch_size']} x "
        f"{p['seq_len']}, float32, AdamW; best of {p['repeats']} steps; {p['platform']}.",
        "| layout | step | vs dense twin | peak / device | GFLOP / device | moved / device "
        "| dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    # the dense twin on as many devices (the first such row) is the baseline
    dense: dict[int, float] = {}
    for r in p["rows"]:
        if r["dense"]:
            dense.setdefault(math.prod(r["mesh"].values()), r["step_seconds"])
    for r in p["rows"]:
        baseline = dense.get(math.prod(r["mesh"].values()))
        ratio = f"{r['step_seconds'] / baseline:.2f}x" if baseline else "-"
        moved = ", ".join(
            f"{axes} {b / MIB:.1f} MiB" for axes, b in sorted(r["bytes_by_axes"].items())
        )
        lines.append(
            f"| {_label(r)} | {r['step_seconds'] * 1e3:.0f} ms | {ratio} | "
            f"{r['peak_mib']:.0f} MiB | {r['gflops']:.1f} | {moved or '-'} | "
            f"{100 * r['dropped_fraction']:.1f}% |"
        )
    return "\n".join(lines)
