"""Capacity planner: which (data, tensor) split, fsdp, sequence parallel and remat policy to use.

For each valid configuration the planner compiles jtp's real Llama train step *abstractly*
(:mod:`jtp.training.compile`: shapes and shardings only, nothing allocated) for as many forced CPU
devices as the cluster has, and reads per-device memory (``memory_analysis``), matmul FLOPs
by dtype (the traced step) and collective bytes by mesh axis (the HLO): :mod:`jtp.cli.sizing`.
It compiles the step ``fit`` runs, layers scanned, at the model's whole depth: a scanned
step compiles in the time of one layer, and a shallower one does not predict it
(:mod:`jtp.cli.sizing` says why; ``tests/cli/test_planner.py`` checks that the plan equals
the trainer's compiled step).

It sizes the GPU program, not the CPU stand-in: bf16 buffers are counted at 2 bytes (the
compile keeps the CPU backend from upcasting them: :data:`jtp.analysis.memory.KEEP_BF16`),
attention is compiled as jtp's O(T) blockwise kernel where a GPU would run cuDNN's fused one
(bf16, supported head dim), and "fits" compares with the memory jax may use, not all of it
(:mod:`jtp.cli.roofline`).

Times are ESTIMATES from a roofline: matmul FLOPs (read off the traced step, by operand
dtype) at a fraction of the device's peak, plus communication at the link bandwidths (tensor
axis inside a host; data axis across hosts when it spans them), without overlap. Memory and
bytes are compiler figures for XLA's CPU backend; a GPU program fuses and schedules
differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from jtp.cli import compilation_cache
from jtp.cli.flags import number
from jtp.cli.output import one_line_errors, write_json
from jtp.cli.roofline import GB, Hardware, default_mem_fraction, estimate
from jtp.cli.sizing import analytic_floor, compiled_attention, measure
from jtp.errors import InputError
from jtp.models.attention import ATTENTION
from jtp.models.stack import REMAT_POLICIES, remat_name
from jtp.training.precision import PRECISIONS


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
    """Valid splits: tensor divides the query heads and divides the kv heads or is a
    multiple of them (each kv head then replicated, :func:`jtp.plans.replicate_kv`: the
    compiled step the planner sizes holds the copies), fits in one host; data divides the
    batch; each with every remat policy in ``remat``."""
    out = []
    for t in range(1, min(per_host, n_devices) + 1):
        if n_devices % t or n_heads % t or (n_kv % t and t % n_kv):
            continue
        d = n_devices // t
        if batch % d:
            continue
        for fsdp in (False, True) if d > 1 else (False,):  # fsdp over 1 device is a no-op
            for sp in (False, True) if t > 1 and seq % t == 0 else (False,):
                for policy in remat:
                    out.append(Config(d, t, fsdp, sp, policy))
    return out


def _tensor_sizes(text: str) -> set[int]:
    """``--tensor 4,8`` as sizes (a word or a size below 1: an InputError)."""
    try:
        sizes = {int(t) for t in text.split(",")}
    except ValueError:
        raise InputError(f"--tensor {text}: give sizes separated by commas, e.g. 4,8") from None
    if min(sizes) < 1:
        raise InputError(f"--tensor {text}: sizes are >= 1")
    return sizes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m jtp.plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3-8b", help="a jtp.models.llama preset")
    p.add_argument(
        "--hf", default=None, help="plan for this Hugging Face directory's config.json instead"
    )
    p.add_argument("--devices", type=number(int, low=1), default=64, help="devices in the cluster")
    p.add_argument(
        "--devices-per-host",
        type=number(int, low=1),
        default=8,
        help="tensor groups stay in a host",
    )
    hw = Hardware()
    p.add_argument(
        "--device-memory-gb", type=number(above=0), default=hw.memory_gb, help="per device"
    )
    p.add_argument(
        "--mem-fraction", type=number(above=0, high=1), default=None,
        help="share of it jax may use (default: $XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.75)",
    )  # fmt: skip
    p.add_argument(
        "--global-batch", type=number(int, low=1), default=256, help="sequences per optimizer step"
    )
    p.add_argument(
        "--micro-batch",
        type=number(int, low=1),
        default=1,
        help="sequences per data rank per micro-step",
    )
    p.add_argument("--seq-len", type=number(int, low=1), default=8192, help="tokens per sequence")
    p.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    p.add_argument(
        "--peak-tflops", type=number(above=0), default=hw.peak_tflops, help="bf16 dense peak"
    )
    p.add_argument(
        "--fp32-ratio", type=number(above=0), default=hw.fp32_ratio,
        help="float32 matmul peak / bf16 peak (0.5: TF32 tensor cores, jax's GPU default)",
    )  # fmt: skip
    p.add_argument(
        "--attention", default="auto", choices=ATTENTION,
        help="kernel to size; auto: what the GPU runs (blockwise stands for cuDNN on CPU)",
    )  # fmt: skip
    p.add_argument(
        "--compute-efficiency", type=number(above=0, high=1), default=hw.compute_efficiency,
        help="fraction of peak reached",
    )  # fmt: skip
    p.add_argument(
        "--intra-host-gbps",
        type=number(above=0),
        default=hw.intra_host_gbps,
        help="GB/s/device in a host",
    )
    p.add_argument(
        "--inter-host-gbps",
        type=number(above=0),
        default=hw.inter_host_gbps,
        help="GB/s/device across",
    )
    p.add_argument("--tensor", default=None, help="only these tensor sizes, e.g. 4,8")
    p.add_argument(
        "--remat", default=",".join(REMAT_POLICIES), help="remat policies to try, e.g. none,full"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON here")
    compilation_cache.add_flags(p)
    args = p.parse_args(argv)
    compilation_cache.enable(args.compilation_cache)

    from jtp.cli.devices import select_devices

    devices = select_devices(args.devices)
    from jtp.cli.recipes import preset_config

    if args.hf:  # shapes only: config.json suffices, no weights are read
        from jtp.models.hf import config_of

        model = config_of(args.hf, max_seq_len=args.seq_len)
        args.model = f"{args.hf} ({args.model} ignored)"
    else:
        model = preset_config(args.model)
    if args.mem_fraction is None:
        args.mem_fraction = default_mem_fraction()
    hw = Hardware(
        peak_tflops=args.peak_tflops, compute_efficiency=args.compute_efficiency,
        intra_host_gbps=args.intra_host_gbps, inter_host_gbps=args.inter_host_gbps,
        memory_gb=args.device_memory_gb, mem_fraction=args.mem_fraction,
        fp32_ratio=args.fp32_ratio,
    )  # fmt: skip
    args.attention_compiled = compiled_attention(
        args.attention, args.precision, model.head_dim, devices[0].platform, model.attn_softcap
    )
    policies = tuple(remat_name(r) for r in args.remat.split(","))
    configs = configurations(args.devices, args.devices_per_host, model.n_heads,
                             model.n_kv_heads, args.global_batch, args.seq_len,
                             policies)  # fmt: skip
    if args.tensor:
        keep = _tensor_sizes(args.tensor)
        valid = sorted({c.tensor for c in configs})
        if not keep & set(valid):  # say why, not "no configuration fits" as if memory were
            raise InputError(
                f"--tensor {args.tensor}: no valid split of {args.devices} devices for "
                f"{model.n_heads} heads / {model.n_kv_heads} kv heads and batch "
                f"{args.global_batch} (the tensor size divides the heads, fits in "
                f"--devices-per-host {args.devices_per_host}); valid sizes: {valid}"
            )
        configs = [c for c in configs if c.tensor in keep]
    t0 = time.perf_counter()
    rows = []
    for config in configs:
        if args.global_batch % (config.data * args.micro_batch):
            continue
        accumulate = args.global_batch // (config.data * args.micro_batch)
        m = measure(
            config,
            args.model,
            model.n_layers,
            args.seq_len,
            args.micro_batch,
            args.precision,
            devices,
            accumulate,
            hf=args.hf,
            attention=args.attention,
        )
        est = estimate(m, config, hw, args.devices_per_host)
        tokens = args.global_batch * args.seq_len / est["step_s"] / args.devices
        floor = analytic_floor(model, args.devices, config, args.precision)
        rows.append({
            "config": dataclasses.asdict(config), "label": config.label(), "accumulate": accumulate,
            "memory_bytes": m["memory"], "floor_bytes": floor,
            "fits": m["memory"] <= hw.usable_bytes, "flops_per_step": m["flops"],
            "bf16_flops_per_step": m["flops_bf16"],
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
    shown = {k: v for k, v in vars(args).items() if k != "compilation_cache"}  # a local path
    payload = {"args": shown, "hardware": dataclasses.asdict(hw),
               "usable_bytes_per_device": hw.usable_bytes, "rows": rows,
               "recommended": best, "seconds": time.perf_counter() - t0}  # fmt: skip
    if args.json:  # what the table measured (bench docs --check finds it stale after a change)
        from jtp.cli.bench.results import provenance

        command = " ".join(["python -m jtp.plan", *(sys.argv[1:] if argv is None else argv)])
        payload["provenance"] = provenance("plan", command, devices[0].platform)
    write_json(args.json, payload)
    return payload


def format_plan(rows: list[dict[str, Any]], args: argparse.Namespace, best: dict | None) -> str:
    usable = args.device_memory_gb * args.mem_fraction
    kernel = {"blockwise": "blockwise, standing for cuDNN's fused kernel", "xla": "XLA's, T^2"}
    head = (
        f"{args.model} on {args.devices} devices ({args.devices_per_host}/host, "
        f"{args.device_memory_gb:g} GB), global batch {args.global_batch} x {args.seq_len} tokens, "
        f"{args.precision}, micro-batch {args.micro_batch}/data rank.\n"
        f"Fits: memory <= {usable:g} GB usable ({args.mem_fraction:.0%} of "
        f"{args.device_memory_gb:g} GB: jax's preallocation). Memory and bytes: compiled (XLA "
        "CPU backend, bf16 kept "
        f"bf16, attention {kernel.get(args.attention_compiled, args.attention_compiled)}; "
        "per device).\n"
        f"Step time and tokens/s: ESTIMATES (roofline: {args.compute_efficiency:.0%} of "
        f"{args.peak_tflops:g} TFLOP/s bf16, fp32 matmuls at {args.fp32_ratio:g}x that, "
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
    with one_line_errors("jtp.plan"):
        main(sys.argv[1:])
