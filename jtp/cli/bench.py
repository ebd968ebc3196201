"""``jtp bench``: the figures the docs quote, re-measured, as a table and JSON.

    python -m jtp.bench memory    [--dim 8192] [--json PATH] [--plot PNG]
    python -m jtp.bench overhead  [--dim 512] [--steps 200] [--repeats 3] [--json PATH]
    python -m jtp.bench llama     [--json PATH] [--no-8b]
    python -m jtp.bench multihost [--calls 200] [--json PATH]
    python -m jtp.bench text      [--steps 300] [--json PATH] [--plot PNG]
    python -m jtp.bench fp8       [--steps 300] [--precisions bf16-mixed,transformer-engine]
    python -m jtp.bench gpu       [--steps 20] [--precision bf16-mixed,...] [--json PATH] [--smoke]
    python -m jtp.bench attention [--json PATH] [--smoke]
    python -m jtp.bench compile   [--depths 2,8,32,80] [--dim 256] [--json PATH]
    python -m jtp.bench cache     [--json PATH]
    python -m jtp.bench generate  [--batches 1,8,32] [--repeats 5] [--json PATH]
    python -m jtp.bench lora      [--preset llama3-8b] [--rank 16] [--json PATH]
    python -m jtp.bench moe       [--layers 4] [--seq-len 256] [--repeats 5] [--json PATH]
    python -m jtp.bench context   [--seq-len 4096] [--sizes 1,2,4,8] [--budget-mib 512]
    python -m jtp.bench lightning --lightning-python PY --example-dir DIR [--repeats 3]
    python -m jtp.bench docs      [--check]

Every benchmark also takes ``--record``, and every sub-command ``--compilation-cache DIR`` /
``--no-compilation-cache`` (:mod:`jtp.training.compilation_cache`; on by default).

Where results go (:mod:`jtp.bench.results`): ``$JTP_BENCH_DIR/NAME.json``, else
``runs/bench/NAME.json`` (gitignored), or ``--json PATH``; only ``--record`` writes the
committed ``bench_results/`` the docs render, and ``--smoke`` never does. Every result records
its provenance (commit, a hash of the sources it measures, versions, machine, device, date).

Each benchmark is a module of :mod:`jtp.bench` named like its sub-command (imported when it
runs), whose function of that name takes the parsed arguments: ``memory.memory(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from jtp.bench import lightning, results
from jtp.cli.flags import add_compilation_cache_flags
from jtp.cli.output import program
from jtp.host_memory import retain_host_memory
from jtp.training import compilation_cache
from jtp.xla_flags import apply_gpu_flags

JSON_HELP = "JSON output path (default: $JTP_BENCH_DIR or runs/bench/; --record: bench_results/)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog=program("python -m jtp.bench"), description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="which", required=True)
    m = sub.add_parser("memory", help="peak memory per device vs Lightning and the floor")
    m.add_argument("--dim", type=int, default=8192, help="FeedForward dim = hidden dim")
    m.add_argument("--steps", type=int, default=2, help="train steps per configuration")
    m.add_argument("--plot", default=None, help="PNG output path (needs matplotlib)")
    o = sub.add_parser("overhead", help="Trainer.fit steps/s vs a bare jitted loop")
    o.add_argument("--dim", type=int, default=512, help="FeedForward dim (hidden = 4 x dim)")
    o.add_argument("--steps", type=int, default=200, help="steps per run")
    o.add_argument("--repeats", type=int, default=3, help="alternating runs; best counts")
    lm = sub.add_parser("llama", help="Llama memory and communication per step, abstractly")
    lm.add_argument("--no-8b", action="store_true", help="skip the llama3-8b rows")
    mh = sub.add_parser("multihost", help="stop-agreement cost; accumulation memory vs bytes")
    mh.add_argument("--calls", type=int, default=200, help="agreements timed per process")
    text = "a tiny Llama learning the stdlib's *.py, byte-level"
    for name, what in (("text", text), ("fp8", "bench text's run per precision")):
        tx = sub.add_parser(name, help=what)
        tx.add_argument("--steps", type=int, default=300, help="optimizer steps")
        tx.add_argument("--warmup", type=int, default=30, help="lr warmup steps")
        tx.add_argument("--val-every", type=int, default=100, help="validate every N steps")
        tx.add_argument("--val-fraction", type=float, default=0.02, help="held-out share")
    sub.choices["text"].add_argument("--plot", default="auto", help="PNG; default: by the JSON")
    sub.choices["fp8"].add_argument(
        "--precisions", default="bf16-mixed,transformer-engine", help="the first is the baseline"
    )
    gp = sub.add_parser("gpu", help="Llama-3-8B tokens/s/device and MFU on the local GPUs")
    gp.add_argument("--preset", default="llama3-8b", help="a jtp.models.llama preset")
    gp.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence")
    gp.add_argument("--micro-batch", type=int, default=1, help="sequences per data rank")
    gp.add_argument("--steps", type=int, default=20, help="timed steps")
    gp.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    gp.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak (default: table)")
    gp.add_argument("--precision", default="bf16-mixed", help="precisions, comma-separated")
    gp.add_argument("--smoke", action="store_true", help="tiny shape on 8 CPU devices (CI)")
    at = sub.add_parser("attention", help="attention kernels on Llama/Gemma shapes vs float32")
    at.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU code path)")
    cp = sub.add_parser("compile", help="train-step compile seconds, scanned vs unrolled")
    cp.add_argument("--depths", default="2,8,32,80", help="layer counts to compile")
    cp.add_argument("--dim", type=int, default=256, help="model width (head dim 16)")
    cp.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    cp.add_argument("--policy-layers", type=int, default=8, help="depth of the remat rows")
    cp.add_argument("--remat", default="none,full,dots,minimal", help="policies to compare")
    ge = sub.add_parser("generate", help="decode tokens/s/device and KV-cache memory by batch")
    ge.add_argument("--dim", type=int, default=512, help="model width")
    ge.add_argument("--layers", type=int, default=4, help="blocks")
    ge.add_argument("--prompt", type=int, default=64, help="tokens per prompt")
    ge.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ge.add_argument("--batches", default="1,8,32", help="prompts per batch")
    ge.add_argument("--repeats", type=int, default=5, help="timed runs per batch; best counts")
    lo = sub.add_parser("lora", help="LoRA train-step memory against full fine-tuning")
    lo.add_argument("--preset", default="llama3-8b", help="a jtp.models.llama preset")
    lo.add_argument("--rank", type=int, default=16, help="LoRA rank")
    lo.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    lo.add_argument("--batch-size", type=int, default=8, help="global batch")
    lo.add_argument("--precision", default="bf16-mixed", help="a jtp precision")
    mo = sub.add_parser("moe", help="MoE step vs its dense twin; dropless, capacity; placements")
    mo.add_argument("--layers", type=int, default=4, help="blocks")
    mo.add_argument("--batch-size", type=int, default=8, help="global batch")
    mo.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    mo.add_argument("--repeats", type=int, default=5, help="timed steps per layout; best counts")
    cx = sub.add_parser("context", help="context parallelism: memory, time, balance, longest T")
    cx.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (batch 1)")
    cx.add_argument("--layers", type=int, default=2, help="blocks")
    cx.add_argument("--repeats", type=int, default=3, help="timed steps per row; median counts")
    cx.add_argument("--sizes", default="1,2,4,8", help="context sizes C")
    cx.add_argument(
        "--kernels",
        default="xla,blockwise,blockwise ring",
        help='attention kernels ("KERNEL ring": on the ring strategy)',
    )
    cx.add_argument("--budget-mib", type=int, default=512, help="memory per device, longest T")
    cx.add_argument("--search-from", type=int, default=1024, help="shortest T searched")
    cx.add_argument("--max-seq-len", type=int, default=131072, help="longest T searched")
    sub.add_parser("cache", help="a repeated run's compile with the persistent cache")
    lightning.add_flags(sub.add_parser("lightning", help="jtp vs Lightning's TP Llama example"))
    dc = sub.add_parser("docs", help="re-render the docs' figure tables from bench_results JSON")
    dc.add_argument("--root", default=".", help="repository root (holds docs/, bench_results/)")
    dc.add_argument("--check", action="store_true", help="fail if a table differs; write nothing")
    for name, sub_parser in sub.choices.items():
        add_compilation_cache_flags(sub_parser)
        if name != "docs":
            sub_parser.add_argument("--json", default=None, help=JSON_HELP)
            sub_parser.add_argument(
                "--record",
                action="store_true",
                help="write the committed result, bench_results/" + results.result_name(name),
            )
    args = p.parse_args(argv)
    if args.which != "docs":
        args.command = " ".join(["python -m jtp.bench", *(sys.argv[1:] if argv is None else argv)])
        results.resolve_target(args)  # before any work: where the result goes, or a refusal
    compilation_cache.enable(getattr(args, "compilation_cache", None))
    apply_gpu_flags()  # before jax initialises; only where jax can run on NVIDIA GPUs
    benchmark = importlib.import_module(f"jtp.bench.{args.which}")
    return getattr(benchmark, args.which)(args)


def run() -> None:
    """The ``python -m`` entry point."""
    retain_host_memory()  # on CPU, before jax starts: jtp.host_memory says why
    main(sys.argv[1:])
