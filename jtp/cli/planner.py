"""Capacity planner: which (data, tensor) split, fsdp, sequence parallel and remat policy to use.

For each valid configuration the planner compiles jtp's real Llama train step *abstractly*
(:mod:`jtp.training.compile`: shapes and shardings only, nothing allocated) for as many forced CPU
devices as the cluster has, and reads per-device memory (``memory_analysis``), FLOPs
(``cost_analysis``) and collective bytes by mesh axis (the HLO). Compiling all layers of an
8B model 28 times would take too long on a small machine, so it compiles 1- and 2-layer
versions and extrapolates linearly in the layer count (blocks are identical, so every
per-block quantity is exactly additive; ``tests/test_planner.py`` checks the linearity).
It compiles the model's unrolled twin (``scan_layers=False``): a scanned step's loop body
counts once in XLA's FLOPs whatever its trips, and a one-trip loop is simplified away, so
only unrolled blocks add up layer by layer. The scanned step ``fit`` runs keeps the same
per-layer state and sends the same tensor-axis bytes; it needs at most the memory planned
(less under remat) and, with fsdp, all-gathers each layer's weights again in the backward
(``tests/cli/test_planner.py`` measures both).

Times are ESTIMATES from a roofline: compute at a fraction of the device's peak plus
communication at the link bandwidths (tensor axis inside a host; data axis across hosts
when it spans them), without overlap. Memory and bytes are compiler figures for XLA's CPU
backend; a GPU program fuses and schedules differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

import numpy as np

from jtp.cli.output import write_json
from jtp.models.stack import REMAT_POLICIES, remat_name
from jtp.training.precision import PRECISIONS

GB = 1e9
# axes_key -> the planner's names; a collective over no axis (1-device groups) is free.
AXES_KEYS = {"tensor": "tensor", "data": "data", "data+tensor": "both", "-": "tensor"}


@dataclasses.dataclass(frozen=True)
class Hardware:
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    compute_efficiency: float = 0.5  # fraction of peak a real step reaches
    intra_host_gbps: float = 450.0  # NVLink, per direction per GPU (tensor axis)
    inter_host_gbps: float = 50.0  # per GPU across hosts (400 Gb/s NICs)
    memory_gb: float = 80.0


@dataclasses.dataclass(frozen=True)
class Config:
    data: int
    tensor: int
    fsdp: bool
    sequence_parallel: bool
    remat: str  # a policy of jtp.models.stack ("none", "full", ...); True / False: full / none

    def __post_init__(self) -> None:
        object.__setattr__(self, "remat", remat_name(self.remat))

    def label(self) -> str:
        flags = [f for f in ("fsdp", "sequence_parallel") if getattr(self, f)]
        flags += [] if self.remat == "none" else [f"remat={self.remat}".replace("=full", "")]
        return f"{self.data}x{self.tensor} " + (
            ",".join(f.replace("sequence_parallel", "sp") for f in flags) or "-"
        )


def configurations(
    n_devices: int,
    per_host: int,
    n_heads: int,
    n_kv: int,
    batch: int,
    seq: int,
    remat: tuple[str, ...] = REMAT_POLICIES,
) -> list[Config]:
    """Valid splits: tensor divides the heads, fits in one host; data divides the batch;
    each with every remat policy in ``remat``."""
    out = []
    for t in range(1, min(per_host, n_devices) + 1):
        if n_devices % t or n_heads % t or n_kv % t:
            continue
        d = n_devices // t
        if batch % d:
            continue
        for fsdp in (False, True) if d > 1 else (False,):  # fsdp over 1 device is a no-op
            for sp in (False, True) if t > 1 and seq % t == 0 else (False,):
                for policy in remat:
                    out.append(Config(d, t, fsdp, sp, policy))
    return out


def _ring_factor(kind: str, n: int) -> float:
    """Bytes a device sends per byte of (full) buffer in a ring implementation."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n if kind == "all-reduce" else (n - 1) / n


def measure(
    config: Config,
    preset: str,
    n_layers: int,
    seq: int,
    micro_batch: int,
    precision: str,
    devices: list,
    accumulate: int = 1,
    hf: str | None = None,
) -> dict[str, Any]:
    """Compile one configuration with ``n_layers`` blocks and ``accumulate`` micro-batches
    per optimizer step (as the trainer runs it); compiler figures per device and per
    optimizer step: memory (accumulation buffer included), collective bytes (loop bodies
    counted once per trip) and FLOPs.

    XLA's cost analysis counts a loop body once; the body is one micro-batch, so the step's
    FLOPs are ``accumulate`` times the program's (the optimizer update, O(params), is then
    counted k times instead of once: under 0.1% next to 6 x params x tokens). ``hf``: the
    shapes of that Hugging Face checkpoint instead of ``preset``'s.
    """
    from jtp.analysis.collectives import axes_key, bytes_by_axes, collectives
    from jtp.analysis.memory import peak_memory_per_device
    from jtp.cli.recipes import LlamaTaskConfig, abstract_llama_step

    task_config = LlamaTaskConfig(
        preset=preset, hf=hf, seq_len=seq, batch_size=micro_batch * config.data, fsdp=config.fsdp,
        sequence_parallel=config.sequence_parallel, loss_parallel=config.tensor > 1,
        remat=config.remat, scan_layers=False,  # unrolled blocks add up (module docstring)
    )  # fmt: skip
    compiled, mesh = abstract_llama_step(
        task_config, (config.data, config.tensor), devices, precision=precision,
        n_layers=n_layers, accumulate=accumulate,
    )  # fmt: skip
    records = collectives(compiled, mesh)
    by_axis = {AXES_KEYS[k]: float(v) for k, v in bytes_by_axes(records).items()}
    wire = dict.fromkeys(AXES_KEYS.values(), 0.0)
    for c in records:
        n = int(np.prod([mesh.shape[a] for a in c.axes or ()]))
        wire[AXES_KEYS[axes_key(c)]] += c.bytes * _ring_factor(c.kind, n)
    flops = accumulate * float((compiled.cost_analysis() or {}).get("flops", 0.0))
    return {
        "memory": float(peak_memory_per_device(compiled)),
        "flops": flops,
        **{f"bytes_{k}": by_axis.get(k, 0.0) for k in AXES_KEYS.values()},
        **{f"wire_{k}": v for k, v in wire.items()},
    }


def extrapolate(one: dict[str, float], two: dict[str, float], n_layers: int) -> dict[str, float]:
    """f(L) = f(1) + (L - 1) * (f(2) - f(1)) for every per-step quantity."""
    return {k: one[k] + (n_layers - 1) * (two[k] - one[k]) for k in one}


def estimate(m: dict[str, float], config: Config, hw: Hardware, per_host: int) -> dict[str, float]:
    """Roofline seconds per optimizer step (``m`` is per optimizer step already)."""
    compute = m["flops"] / (hw.peak_tflops * 1e12 * hw.compute_efficiency)
    data_bw = hw.inter_host_gbps if config.data * config.tensor > per_host else hw.intra_host_gbps
    comm = m["wire_tensor"] / (hw.intra_host_gbps * 1e9) + (m["wire_data"] + m["wire_both"]) / (
        data_bw * 1e9
    )
    return {"compute_s": compute, "comm_s": comm, "step_s": compute + comm}


def analytic_floor(n_params: int, n_devices: int, config: Config, precision: str) -> float:
    """(params + grads + 2 AdamW moments) bytes per device, fp32 state."""
    per_param = 16 if precision != "bf16-true" else 8
    shards = n_devices if config.fsdp else config.tensor
    return n_params * per_param / shards


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m jtp.plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3-8b", help="a jtp.models.llama preset")
    p.add_argument(
        "--hf", default=None, help="plan for this Hugging Face directory's config.json instead"
    )
    p.add_argument("--devices", type=int, default=64, help="devices in the cluster")
    p.add_argument("--devices-per-host", type=int, default=8, help="tensor groups stay in a host")
    hw = Hardware()
    p.add_argument("--device-memory-gb", type=float, default=hw.memory_gb, help="per device")
    p.add_argument("--global-batch", type=int, default=256, help="sequences per optimizer step")
    p.add_argument(
        "--micro-batch", type=int, default=1, help="sequences per data rank per micro-step"
    )
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence")
    p.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    p.add_argument("--peak-tflops", type=float, default=hw.peak_tflops, help="bf16 dense peak")
    p.add_argument(
        "--compute-efficiency", type=float, default=hw.compute_efficiency,
        help="fraction of peak reached",
    )  # fmt: skip
    p.add_argument(
        "--intra-host-gbps", type=float, default=hw.intra_host_gbps, help="GB/s/device in a host"
    )
    p.add_argument(
        "--inter-host-gbps", type=float, default=hw.inter_host_gbps, help="GB/s/device across"
    )
    p.add_argument("--tensor", default=None, help="only these tensor sizes, e.g. 4,8")
    p.add_argument(
        "--remat", default=",".join(REMAT_POLICIES), help="remat policies to try, e.g. none,full"
    )
    p.add_argument("--json", default="bench_results/plan.json", help="JSON output path")
    args = p.parse_args(argv)

    from jtp.cli.devices import select_devices

    devices = select_devices(args.devices)
    from jtp.cli.recipes import preset_config

    if args.hf:  # shapes only: config.json suffices, no weights are read
        from jtp.models.hf import config_of

        model = config_of(args.hf, max_seq_len=args.seq_len)
        args.model = f"{args.hf} ({args.model} ignored)"
    else:
        model = preset_config(args.model)
    hw = Hardware(args.peak_tflops, args.compute_efficiency, args.intra_host_gbps,
                  args.inter_host_gbps, args.device_memory_gb)  # fmt: skip
    policies = tuple(remat_name(r) for r in args.remat.split(","))
    configs = configurations(args.devices, args.devices_per_host, model.n_heads,
                             model.n_kv_heads, args.global_batch, args.seq_len,
                             policies)  # fmt: skip
    if args.tensor:
        keep = {int(t) for t in args.tensor.split(",")}
        configs = [c for c in configs if c.tensor in keep]
    t0 = time.perf_counter()
    rows = []
    for config in configs:
        if args.global_batch % (config.data * args.micro_batch):
            continue
        accumulate = args.global_batch // (config.data * args.micro_batch)
        one, two = (
            measure(config, args.model, n, args.seq_len, args.micro_batch, args.precision,
                    devices, accumulate, hf=args.hf)
            for n in (1, 2)
        )  # fmt: skip
        m = extrapolate(one, two, model.n_layers)
        est = estimate(m, config, hw, args.devices_per_host)
        tokens = args.global_batch * args.seq_len / est["step_s"] / args.devices
        floor = analytic_floor(model.num_params(), args.devices, config, args.precision)
        rows.append({
            "config": dataclasses.asdict(config), "label": config.label(), "accumulate": accumulate,
            "memory_bytes": m["memory"], "floor_bytes": floor,
            "fits": m["memory"] <= hw.memory_gb * GB, "flops_per_step": m["flops"],
            "tensor_bytes_per_step": m["bytes_tensor"],
            "data_bytes_per_step": m["bytes_data"] + m["bytes_both"],
            **est, "tokens_per_s_per_device": tokens,
        })  # fmt: skip
        print(
            f"  {config.label():<22} {m['memory'] / GB:8.2f} GB  {time.perf_counter() - t0:6.0f} s",
            file=sys.stderr,
        )
    rows.sort(key=lambda r: (not r["fits"], -r["tokens_per_s_per_device"]))
    best = next((r for r in rows if r["fits"]), None)
    print(format_plan(rows, args, best))
    payload = {"args": vars(args), "hardware": dataclasses.asdict(hw), "rows": rows,
               "recommended": best, "seconds": time.perf_counter() - t0}  # fmt: skip
    write_json(args.json, payload)
    return payload


def format_plan(rows: list[dict[str, Any]], args: argparse.Namespace, best: dict | None) -> str:
    head = (
        f"{args.model} on {args.devices} devices ({args.devices_per_host}/host, "
        f"{args.device_memory_gb:g} GB), global batch {args.global_batch} x {args.seq_len} tokens, "
        f"{args.precision}, micro-batch {args.micro_batch}/data rank.\n"
        "Memory and bytes: compiled (XLA CPU backend, per device). Step time and tokens/s: "
        f"ESTIMATES (roofline: {args.compute_efficiency:.0%} of {args.peak_tflops:g} TFLOP/s, "
        f"{args.intra_host_gbps:g} GB/s in host, {args.inter_host_gbps:g} GB/s across, "
        "no overlap).\n"
    )
    lines = [
        f"| {'':1} | {'d x t, options':<22} | {'accum':>5} | {'memory GB':>9} | {'floor GB':>8} | "
        f"{'fits':>4} | {'tensor GB/step':>14} | {'data GB/step':>12} | {'step s (est)':>12} | "
        f"{'tok/s/dev (est)':>15} |",
        "|---|" + "|".join("-" * (w + 2) for w in (22, 5, 9, 8, 4, 14, 12, 12, 15)) + "|",
    ]
    for r in rows:
        mark = "*" if best is not None and r["label"] == best["label"] else " "
        lines.append(
            f"| {mark} | {r['label']:<22} | {r['accumulate']:>5} | "
            f"{r['memory_bytes'] / GB:>9.2f} | "
            f"{r['floor_bytes'] / GB:>8.2f} | {'yes' if r['fits'] else 'no':>4} | "
            f"{r['tensor_bytes_per_step'] / GB:>14.1f} | {r['data_bytes_per_step'] / GB:>12.1f} | "
            f"{r['step_s']:>12.2f} | {r['tokens_per_s_per_device']:>15,.0f} |"
        )
    tail = f"\n* recommended: {best['label']}" if best else "\nno configuration fits"
    return head + "\n".join(lines) + tail


def run() -> None:
    """The ``python -m`` entry point."""
    main(sys.argv[1:])
