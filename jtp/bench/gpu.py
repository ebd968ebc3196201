"""``python -m jtp.bench gpu``: Llama-3-8B training throughput and MFU on the local GPUs.

The question a GPU user asks first: tokens/s per device and model FLOPs utilisation, next to
two published anchors on 8 x H100 (bf16): torchtitan's Llama-3-8B, 5,762 tok/s/GPU at
33-39% MFU, and MaxText's Llama-2-7B, about 11k tok/s/GPU at about 50%.

It runs the trainer's own compiled step (:mod:`jtp.training.compile`) on real arrays with
``bf16-mixed`` and ``attention="auto"`` (cuDNN's fused kernel on a GPU), on the layout the
capacity planner recommends for these GPUs: every single-node layout (fsdp over the data
ranks, each remat policy) is compiled abstractly *for the GPUs themselves* at 2 and 3
scanned layers (:mod:`jtp.capacity.measure`), extrapolated to the model's depth, ranked by the
planner's roofline estimate (this device's bf16 peak), and the fastest whose memory fits the
usable memory (``bytes_limit`` of ``memory_stats()``: what jax's preallocation leaves) is
compiled whole; if XLA's figure for that whole program does not fit, the next one is taken
(recorded). If none fits, the layer count is halved until one does, and the table and JSON
say so.

Beside the run, three checks only a GPU can make: cuDNN's fused attention against XLA's in
float32 (outputs and gradients; time of each kernel), the CPU planner's memory for the
chosen layout (``python -m jtp.capacity`` without a GPU) against XLA's for the GPU, and the
expert-parallel exchange's ragged all-to-all against its padded stand-in (the one the CPU
tests run) over an "expert" axis of all the GPUs (values, gradients, time, bytes).

MFU = (6 N + attention) FLOPs per token x tokens/s / (devices x peak), torchtitan's
formula: N parameters without the embedding table, attention 12 x layers x heads x head dim
x sequence per token (causal masking not discounted, as torchtitan). The peak is the dense
bf16 TFLOP/s of the device kind (a table; ``--peak-tflops`` overrides) and is named in the
output. Without a GPU it says so and exits 2; ``--smoke`` runs a tiny shape on 8 CPU
devices so the code path is tested everywhere (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any

from jtp.bench.gpu_checks import (
    ATTENTION_SHAPE,
    SMOKE_ATTENTION_SHAPE,
    attention_check,
    expert_exchange_check,
    planner_check,
)
from jtp.bench.results import machine, write_result

TORCHTITAN = {
    "tokens_per_s_per_device": 5762,
    "mfu": "33-39%",
    "model": "Llama-3-8B",
    "hardware": "8 x H100, bf16",
}
MAXTEXT = {
    "tokens_per_s_per_device": 11000,
    "mfu": "~50%",
    "model": "Llama-2-7B",
    "hardware": "8 x H100, bf16",
}
# Dense bf16 peak TFLOP/s by device_kind substring (first match wins).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of a GPU kind (``jax.Device.device_kind``), or None if unknown."""
    return next((tf for name, tf in PEAK_TFLOPS if name.lower() in device_kind.lower()), None)


def flops_per_token(config: Any, seq_len: int) -> float:
    """torchtitan's training FLOPs per token: 6 x non-embedding parameters + 12 x layers x
    heads x head dim x sequence length (attention scores and values, forward + backward).
    With experts, the *active* parameters (k of E experts per sparse layer): the MFU of a
    MoE model counts the work its tokens need, as MaxText's and torchtitan's do."""
    embedding = config.vocab_size * config.dim
    n = config.num_active_params() - embedding
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6.0 * n + attention


# The layout the run takes: the planner's layouts for the local GPUs, each whole scanned
# step compiled for them, the fastest estimate that fits.


def n_layers(preset: str) -> int:
    from jtp.recipes.llama import preset_config

    return preset_config(preset).n_layers


def _candidates(n: int, smoke: bool, preset: str, micro_batch: int, seq: int) -> list[Any]:
    """The planner's single-node layouts (:func:`jtp.capacity.layouts`) that a
    throughput run takes: fsdp over "data" wherever there is more than one data rank, no
    sequence parallelism (T is whole on each device), every remat policy."""
    from jtp.capacity import Layout, layouts
    from jtp.recipes.llama import preset_config

    if smoke:
        return [Layout(2, n // 2, True, False, "none")]
    c = preset_config(preset)
    return [
        config
        for config in layouts(n, n, c.n_heads, c.n_kv_heads, micro_batch * n, seq)
        if config.fsdp == (config.data > 1) and not config.sequence_parallel
    ]


def choose_layout(
    preset: str,
    devices: list,
    seq: int,
    micro_batch: int,
    peak: float,
    usable: int | None,
    *,
    smoke: bool = False,
) -> tuple[Any, int | None, list[dict[str, Any]]]:
    """The planner's fastest layout that fits ``usable`` bytes (None: anything fits), the
    layer count it needs (None: the preset's), and every candidate's figures.

    Each candidate's whole scanned step is compiled for ``devices`` (:mod:`jtp.capacity.measure`)
    and ranked by the roofline estimate; if none fits, the depth is halved and they are
    compiled again."""
    from jtp.capacity import Hardware
    from jtp.capacity.measure import measure
    from jtp.capacity.roofline import estimate

    hw = Hardware(peak_tflops=peak)
    depth = layers = n_layers(preset)
    table = []
    candidates = _candidates(len(devices), smoke, preset, micro_batch, seq)
    while True:
        rows = []
        for config in candidates:
            t0 = time.perf_counter()
            m = measure(config, preset, layers, seq, micro_batch, "bf16-mixed", devices)
            seconds = time.perf_counter() - t0
            fits = usable is None or m["memory"] <= usable
            est = estimate(m, config, hw, len(devices))
            rows.append(
                {
                    "layout": config.label(),
                    "layers": layers,
                    "memory_bytes": m["memory"],
                    "fits": fits,
                    "estimated_step_s": est["step_s"],
                    "compile_seconds": seconds,
                    "config": config,
                }
            )
            print(
                f"  {config.label()}, {layers} layers: {m['memory'] / 2**30:.1f} GiB"
                f"{'' if fits else ' (does not fit)'}",
                file=sys.stderr,
            )
        table += [{k: v for k, v in r.items() if k != "config"} for r in rows]
        fitting = [r for r in rows if r["fits"]]
        if fitting:
            best = min(fitting, key=lambda r: r["estimated_step_s"])
            return best["config"], (None if layers == depth else layers), table
        if layers == 1:
            raise SystemExit("python -m jtp.bench gpu: not even one layer fits these GPUs")
        layers = max(1, layers // 2)


def _step(
    config: str,
    layout: Any,
    devices: list,
    batch: int,
    seq: int,
    layers: int | None,
    precision: str = "bf16-mixed",
):
    """A compiled train step in ``precision`` on real arrays, its state and a batch; the
    shares of its matmul FLOPs in bf16 and in float8 (read off its jaxpr)."""
    import jax
    import numpy as np

    from jtp.analysis.dtypes import float8_fraction, flops_fraction
    from jtp.mesh import ModelParallelStrategy
    from jtp.parallel.batch import shard_batch
    from jtp.recipes import LlamaTask, LlamaTaskConfig
    from jtp.recipes.llama import model_shapes
    from jtp.training.compile import build_state, trace_train_step, train_step
    from jtp.training.options import TrainerOptions

    d, t, fsdp, remat = layout.data, layout.tensor, layout.fsdp, layout.remat
    task_config = LlamaTaskConfig(
        preset=config,
        seq_len=seq,
        batch_size=batch,
        fsdp=fsdp,
        remat=remat,
        sequence_parallel=False,
        loss_parallel=t > 1,
    )
    shapes = model_shapes(task_config)
    if layers is not None:  # cut to the depth that fits
        shapes = dataclasses.replace(shapes, n_layers=layers)
    task = LlamaTask(task_config, model_config=shapes)
    strategy = ModelParallelStrategy(d, t, fsdp=fsdp, devices=devices[: d * t])
    options = TrainerOptions(precision=precision)
    state, rules = build_state(task, strategy, options)
    step = train_step(task, state, options, fsdp=fsdp)
    tokens = np.random.default_rng(0).integers(0, task.model_config.vocab_size, (batch, seq + 1))
    batches = [shard_batch(tokens.astype(np.int32), strategy.mesh)]
    t0 = time.perf_counter()
    traced = trace_train_step(step, state, batches, rules, precision=precision)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t0
    share = {  # of the program just compiled
        "bfloat16": flops_fraction(traced.jaxpr, "bfloat16"),
        "float8": float8_fraction(traced.jaxpr),
    }
    jax.block_until_ready(state.params)
    return compiled, state, batches, compile_s, task.model_config, share


def _timed(compiled: Any, state: Any, batches: list, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` steps after ``warmup`` untimed ones (state donated)."""
    import jax

    arrays = state.arrays()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        *arrays, metrics = compiled(*arrays, batches)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _run(args: argparse.Namespace, precision: str, preset: str, chosen: Any, devices, layers, seq):
    """One precision's step on the chosen layout: compiled, timed, its figures. Everything
    it allocated is dropped on return, so the next precision's state has the memory."""
    from jtp.analysis.memory import peak_memory_per_device

    batch = args.micro_batch * chosen.data
    compiled, state, batches, compile_s, model_config, share = _step(
        preset, chosen, devices, batch, seq, layers, precision
    )
    times = _timed(compiled, state, batches, args.warmup, args.steps)
    step_s = statistics.median(times)
    return {
        "precision": precision,
        "compile_seconds": compile_s,
        "step_seconds": {"median": step_s, "min": min(times), "max": max(times)},
        "tokens_per_s_per_device": batch * seq / step_s / len(devices),
        "compiled_peak_bytes_per_device": peak_memory_per_device(compiled),
        "matmul_flops_share": share,
        "cudnn_attention_in_program": "__cudnn$fmha" in compiled.as_text(),
        "model_config": model_config,
    }


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from jtp.mesh import select_devices
    from jtp.training.precision import policy

    precisions = args.precision.split(",")
    for name in precisions:
        policy(name)  # an unknown name raises, listing the choices, before anything runs

    if not args.smoke:
        try:  # CPU devices beside the GPUs, for the planner's CPU stand-in (planner_check)
            jax.config.update("jax_num_cpu_devices", 8)
        except RuntimeError:
            pass  # backends already up: planner_check uses the CPU devices there are
    devices = select_devices(8) if args.smoke else jax.devices()
    platform = devices[0].platform
    if platform != "gpu" and not args.smoke:
        print(
            f"python -m jtp.bench gpu: no GPU here (jax platform {platform!r}); run it on a "
            "machine with NVIDIA GPUs and jax[cuda12], or pass --smoke for the CPU code path",
            file=sys.stderr,
        )
        raise SystemExit(2)
    preset = "tiny" if args.smoke else args.preset
    seq = 32 if args.smoke else args.seq_len
    n = len(devices)
    usable = _usable_bytes(devices[0])
    kind = devices[0].device_kind
    known = peak_tflops(kind)
    peak = args.peak_tflops or known or 989.0
    source = (
        "--peak-tflops"
        if args.peak_tflops
        else f"table ({kind})"
        if known
        else (f"ASSUMED: {kind} is not in the table; H100's 989 taken (pass --peak-tflops)")
    )
    chosen, layers, tried = choose_layout(
        preset, devices, seq, args.micro_batch, peak, usable, smoke=args.smoke
    )
    batch = args.micro_batch * chosen.data
    depth = layers or n_layers(preset)
    planned = next(r for r in tried if r["layout"] == chosen.label() and r["layers"] == depth)
    cpu_plan = planner_check(chosen, preset, depth, seq, args.micro_batch, planned["memory_bytes"])
    attention_rows = attention_check(
        SMOKE_ATTENTION_SHAPE if args.smoke else ATTENTION_SHAPE, platform
    )
    exchange_row = expert_exchange_check(devices, platform, smoke=args.smoke)
    # The layout is the one chosen for bf16-mixed (the planner's); every precision runs it.
    runs = [_run(args, name, preset, chosen, devices, layers, seq) for name in precisions]
    first = runs[0]  # the top-level figures are the first precision's (bf16-mixed by default)
    model_config = first.pop("model_config")
    for r in runs[1:]:
        r.pop("model_config")
        r["speedup"] = first["step_seconds"]["median"] / r["step_seconds"]["median"]
    tokens_per_s_per_device = first["tokens_per_s_per_device"]
    fpt = flops_per_token(model_config, seq)
    for r in runs:  # against the bf16 peak for every precision (float8's is twice that)
        r["mfu"] = None if args.smoke else r["tokens_per_s_per_device"] * fpt / (peak * 1e12)
    mfu = first["mfu"]
    stats = devices[0].memory_stats() or {}
    payload = {
        "benchmark": "gpu",
        "machine": machine(),
        "platform": platform,
        "device_kind": kind,
        "devices": n,
        "smoke": args.smoke,
        "model": preset,
        "n_layers": model_config.n_layers,
        "layers_reduced": layers is not None,
        "layout": {
            "data": chosen.data,
            "tensor": chosen.tensor,
            "fsdp": chosen.fsdp,
            "remat": chosen.remat,
        },
        "layouts_tried": tried,
        "global_batch": batch,
        "seq_len": seq,
        "precision": first["precision"],
        "cudnn_attention_in_program": first["cudnn_attention_in_program"],
        "bf16_matmul_flops_share": first["matmul_flops_share"]["bfloat16"],
        # the first compile of this program (choose_layout's); the run's own compile below
        # reads the persistent compilation cache that one filled
        "compile_seconds": planned["compile_seconds"],
        "cached_compile_seconds": first["compile_seconds"],
        "step_seconds": first["step_seconds"],
        "tokens_per_s_per_device": tokens_per_s_per_device,
        "flops_per_token": fpt,
        "peak_tflops": peak,
        "peak_source": source,
        "mfu": mfu,
        "compiled_peak_bytes_per_device": first["compiled_peak_bytes_per_device"],
        # the process's peak: with several precisions, the largest of their runs
        "hbm_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        # one row per --precision, in the order run (same process, layout and batch)
        "precisions": runs,
        "usable_bytes_per_device": usable,
        "planner_check": cpu_plan,
        "attention_shape": SMOKE_ATTENTION_SHAPE if args.smoke else ATTENTION_SHAPE,
        "attention_check": attention_rows,
        "expert_exchange_check": exchange_row,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": _versions(),
        "anchors": {"torchtitan": TORCHTITAN, "maxtext": MAXTEXT},
    }
    print(format_gpu(payload))
    write_result(args, payload)
    return payload


def _versions() -> dict[str, str]:
    import flax
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__}


def _usable_bytes(device: Any) -> int | None:
    """What jax may allocate on ``device`` (after its preallocation fraction); None on CPU."""
    stats = device.memory_stats() if device.platform == "gpu" else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _compile_text(r: dict[str, Any]) -> str:
    if "cached_compile_seconds" in r:
        return (
            f"compile {r['compile_seconds']:.1f} s (again from the persistent cache: "
            f"{r['cached_compile_seconds']:.1f} s)"
        )
    # JSON written before the cold compile was timed: its figure is a cache hit
    return f"compile from the persistent cache {r['compile_seconds']:.1f} s (cold: not timed)"


def format_gpu(r: dict[str, Any]) -> str:
    lay = r["layout"]
    remat = [] if lay["remat"] in (False, "none") else [f"remat={lay['remat']}"]
    options = ",".join(["fsdp"] * bool(lay["fsdp"]) + remat) or "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    hbm = r["hbm_peak_bytes_in_use"]
    rows = [
        "| run | hardware | layout | tok/s/device | MFU |",
        "|---|---|---|---:|---:|",
        f"| jtp, {r['model']}, {r['n_layers']} layers{' (reduced)' if r['layers_reduced'] else ''}"
        f", T={r['seq_len']}{' (SMOKE: CPU, meaningless)' if r['smoke'] else ''} | "
        f"{r['devices']} x {r['device_kind']} | {lay['data']}x{lay['tensor']} {options} | "
        f"{r['tokens_per_s_per_device']:,.0f} | {mfu} |",
    ]
    for name, a in r["anchors"].items():
        rows.append(
            f"| {name}, {a['model']} (published) | {a['hardware']} | - | "
            f"{a['tokens_per_s_per_device']:,} | {a['mfu']} |"
        )
    tail = (
        f"\n{_compile_text(r)}; step {r['step_seconds']['median']:.3f} s "
        f"(min {r['step_seconds']['min']:.3f}, max {r['step_seconds']['max']:.3f}); "
        f"cuDNN attention in the program: {r['cudnn_attention_in_program']}; peak "
        f"{r['peak_tflops']} TFLOP/s bf16; HBM peak "
        f"{'n/a' if hbm is None else f'{hbm / 2**30:.1f} GiB'}"
    )
    lines = [
        "\n| attention, bf16 fwd+bwd | max rel. error vs fp32 (out, dq, dk, dv) "
        "| within tol. | ms |",
        "|---|---|---|---:|",
    ]
    for a in r["attention_check"]:
        err = ", ".join(f"{v:.1e}" for v in a["relative_error"].values())
        lines.append(
            f"| {a['implementation']} | {err} | {a['within_tolerance']} | "
            f"{a['forward_backward_ms']:.2f} |"
        )
    ex = r.get("expert_exchange_check")
    if ex is not None:
        v = ex["variants"]
        err = ex["relative_error"]
        lines.append(
            f"\nexpert exchange over {ex['shape']['expert_axis']} device(s): padded "
            f"{v['padded']['forward_backward_ms']:.2f} ms"
            + (
                f", ragged {v['ragged']['forward_backward_ms']:.2f} ms, max rel. difference "
                f"{max(err.values()):.1e} (within tol.: {ex['within_tolerance']})"
                if "ragged" in v
                else " (ragged: not on CPU)"
            )
        )
    if len(r.get("precisions", [])) > 1:  # several --precision names, one process
        lines += [
            "\n| precision | step s (median) | tok/s/device | MFU (bf16 peak) "
            "| float8 matmul FLOPs | speed-up |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for p in r["precisions"]:
            m = "n/a" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%"
            lines.append(
                f"| {p['precision']} | {p['step_seconds']['median']:.3f} | "
                f"{p['tokens_per_s_per_device']:,.0f} | {m} | "
                f"{100 * p['matmul_flops_share']['float8']:.1f}% | "
                f"{p.get('speedup', 1.0):.2f}x |"
            )
    plan = r["planner_check"]
    if plan is not None:
        lines.append(
            f"\nplanner on CPU (jtp.capacity): {plan['cpu_planned_bytes'] / 2**30:.1f} GiB/device "
            f"for this layout; XLA for the GPU: {plan['gpu_compiled_bytes'] / 2**30:.1f} GiB "
            f"(ratio {plan['ratio']:.2f})"
        )
    return "\n".join(rows) + tail + "\n".join(lines)
