"""``jtp capacity`` (``python -m jtp.capacity``): the capacity planner's program. Flags map
onto :class:`jtp.capacity.Request` and :class:`jtp.capacity.Hardware`; the table is
:func:`jtp.capacity.planner`'s, printed, and with ``--json PATH`` written with its
provenance (what ``jtp bench docs`` renders into the pages)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jtp.checkpoint.outputs import write_json
from jtp.cli.flags import add_compilation_cache_flags, number
from jtp.cli.output import one_line_errors, program
from jtp.errors import InputError
from jtp.training import compilation_cache

PROG = "python -m jtp.capacity"


def _tensor_sizes(text: str, flag: str = "--tensor") -> tuple[int, ...]:
    """``--tensor 4,8`` (or ``flag``'s) as sizes (a word or a size below 1: an InputError)."""
    try:
        sizes = tuple(sorted({int(t) for t in text.split(",")}))
    except ValueError:
        raise InputError(f"{flag} {text}: give sizes separated by commas, e.g. 4,8") from None
    if min(sizes) < 1:
        raise InputError(f"{flag} {text}: sizes are >= 1")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    from jtp.capacity.roofline import Hardware
    from jtp.models.attention import ATTENTION
    from jtp.models.stack import REMAT_POLICIES
    from jtp.training.precision import PRECISIONS

    hw = Hardware()
    p = argparse.ArgumentParser(
        prog=program(PROG), description="Which layout of a model fits a cluster, and what it costs."
    )
    add = p.add_argument
    add("--model", default="llama3-8b", help="a jtp.models.llama preset")
    add("--hf", default=None, help="plan for this Hugging Face directory's config.json instead")
    add("--devices", type=number(int, low=1), default=64, help="devices in the cluster")
    add(
        "--devices-per-host",
        type=number(int, low=1),
        default=8,
        help="tensor groups stay in a host",
    )
    add("--device-memory-gb", type=number(above=0), default=hw.memory_gb, help="per device")
    add(
        "--mem-fraction",
        type=number(above=0, high=1),
        default=None,
        help="share of it jax may use (default: $XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.75)",
    )
    add("--global-batch", type=number(int, low=1), default=256, help="sequences per optimizer step")
    add(
        "--micro-batch",
        type=number(int, low=1),
        default=1,
        help="sequences per data rank per micro-step",
    )
    add("--seq-len", type=number(int, low=1), default=8192, help="tokens per sequence")
    add("--precision", default="bf16-mixed", choices=PRECISIONS)
    add("--peak-tflops", type=number(above=0), default=hw.peak_tflops, help="bf16 dense peak")
    add(
        "--fp32-ratio",
        type=number(above=0),
        default=hw.fp32_ratio,
        help="float32 matmul peak / bf16 peak (0.5: TF32 tensor cores, jax's GPU default)",
    )
    add(
        "--attention",
        default="auto",
        choices=ATTENTION,
        help="kernel to size; auto: what the GPU runs (blockwise stands for cuDNN on CPU)",
    )
    add(
        "--compute-efficiency",
        type=number(above=0, high=1),
        default=hw.compute_efficiency,
        help="fraction of peak reached",
    )
    add(
        "--intra-host-gbps",
        type=number(above=0),
        default=hw.intra_host_gbps,
        help="GB/s/device in a host",
    )
    add(
        "--inter-host-gbps",
        type=number(above=0),
        default=hw.inter_host_gbps,
        help="GB/s/device across",
    )
    add("--tensor", default=None, help="only these tensor sizes, e.g. 4,8")
    add(
        "--expert",
        default=None,
        help='only these "expert" axis sizes of a MoE (1: none), e.g. 1,8; default: all valid',
    )
    add("--context", default=None, help='only these "context" axis sizes, e.g. 1,8 (1: none)')
    add("--remat", default=",".join(REMAT_POLICIES), help="remat policies to try, e.g. none,full")
    add("--json", default=None, metavar="PATH", help="also write the table as JSON here")
    add_compilation_cache_flags(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    compilation_cache.enable(args.compilation_cache)
    from jtp.capacity import Hardware, Request, search
    from jtp.capacity.roofline import GB, default_mem_fraction
    from jtp.mesh import select_devices

    request = Request(
        model=args.model,
        hf=args.hf,
        devices=args.devices,
        devices_per_host=args.devices_per_host,
        global_batch=args.global_batch,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        precision=args.precision,
        attention=args.attention,
        tensor=_tensor_sizes(args.tensor) if args.tensor else None,
        remat=tuple(args.remat.split(",")),
        expert=_tensor_sizes(args.expert, "--expert") if args.expert else None,
        context=_tensor_sizes(args.context, "--context") if args.context else None,
    )
    hardware = Hardware(
        peak_tflops=args.peak_tflops,
        compute_efficiency=args.compute_efficiency,
        intra_host_gbps=args.intra_host_gbps,
        inter_host_gbps=args.inter_host_gbps,
        memory_gb=args.device_memory_gb,
        fp32_ratio=args.fp32_ratio,
        mem_fraction=default_mem_fraction() if args.mem_fraction is None else args.mem_fraction,
    )
    devices = select_devices(args.devices)

    def progress(layout: Any, measured: dict[str, float], seconds: float) -> None:
        line = f"  {layout.label():<26} {measured['memory'] / GB:8.2f} GB  {seconds:6.0f} s"
        print(line, file=sys.stderr)

    table = search(request, hardware, devices=devices, progress=progress)
    print(table.format())
    payload = table.to_json()
    if args.json:  # what the table measured (bench docs --check finds it stale after a change)
        from jtp.bench.results import provenance

        command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
        payload["provenance"] = provenance("capacity", command, devices[0].platform)
    write_json(args.json, payload)
    return payload


def run() -> None:
    """The ``python -m`` entry point."""
    with one_line_errors("jtp.capacity"):
        main(sys.argv[1:])
