"""``python -m jtp.eval``: mean next-token loss and perplexity of a model on prepared tokens.

    python -m jtp.eval --hf DIR --data TOKENS                      # val.bin, all devices
    python -m jtp.eval --checkpoint runs/ck --data TOKENS --split train --json out.json
    python -m jtp.eval --devices 8 --hf DIR --data TOKENS --seq-len 2048 --batch-size 8 \\
        --data-parallel 2 --tensor-parallel 4 --fsdp --sequence-parallel --loss-parallel
    python -m jtp.eval --devices 8 --hf DIR --data TOKENS --seq-len 4096 --context-parallel 4

The model is a Hugging Face checkpoint (``jtp.hf.load_pretrained``: each device reads its
slice) or a ``python -m jtp.train --checkpoint-dir`` directory (parameters restored onto
this mesh; the optimizer state is never read). TOKENS is a ``python -m jtp.prepare``
directory made with the model's tokenizer. The loss is computed as ``fit``'s validation
computes it (``Trainer.validate``): perplexity = exp(mean loss), the mean over every token
of every full window, each window once (:mod:`jtp.recipes.perplexity` says exactly which).
``main(argv)`` is importable and returns the results it writes as JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from jtp.bench.results import machine
from jtp.checkpoint.outputs import check_output_file, write_json
from jtp.cli.devices import add_mesh_flags, init_distributed
from jtp.cli.flags import (
    ArgumentParser,
    FieldFlags,
    add_compilation_cache_flags,
    options_from_args,
)
from jtp.cli.output import one_line_errors, program
from jtp.errors import InputError
from jtp.host_memory import retain_host_memory
from jtp.mesh import select_devices
from jtp.recipes.llama import check_context
from jtp.recipes.perplexity import EvalConfig, build_task
from jtp.training import compilation_cache
from jtp.xla_flags import apply_gpu_flags


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=program("python -m jtp.eval"),
        description="Mean next-token loss and perplexity of a Hugging Face or jtp training "
        "checkpoint on every window of a prepared token file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf", metavar="DIR", help="a Hugging Face checkpoint directory")
    model.add_argument(
        "--checkpoint", metavar="DIR", help="python -m jtp.train --checkpoint-dir's directory"
    )
    p.add_argument("--data", required=True, metavar="DIR", help="a python -m jtp.prepare directory")
    flags = FieldFlags(metavars={"precision": "NAME"})
    flags.add(p.add_argument_group("what and how"), EvalConfig, _FIELDS)
    add_mesh_flags(p, context=True)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    add_compilation_cache_flags(p.add_argument_group("compilation (process setup)"))
    return p


# EvalConfig's fields with a derived flag (--hf, --checkpoint and --data are added by hand:
# one of the first two is required, and --data always is).
_FIELDS = (
    "step",
    "split",
    "seq_len",
    "batch_size",
    "precision",
    "fsdp",
    "sequence_parallel",
    "loss_parallel",
    "attention",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    config = options_from_args(EvalConfig, args)
    if config.step is not None and config.hf is not None:
        raise InputError("--step picks a step of --checkpoint DIR; --hf has none")
    if args.json:  # before any work: not a directory, in a writable one, not the data
        check_output_file(args.json, flag="--json", inputs=[("--data", config.data)])
    compilation_cache.enable(args.compilation_cache)
    apply_gpu_flags(sequence_parallel=config.sequence_parallel)
    distributed = init_distributed(args.devices)  # from the environment (JAX_*, a launcher)
    devices = None if distributed or args.devices is None else select_devices(args.devices)

    import jax

    from jtp.mesh import ModelParallelStrategy, mesh_shape
    from jtp.training.trainer import Trainer

    task, precision, source = build_task(config)  # every refusal before a weight is read
    strategy = ModelParallelStrategy(
        args.data_parallel,
        args.tensor_parallel,
        context_parallel_size=args.context_parallel,
        fsdp=config.fsdp,
        devices=devices,
    )
    task.mesh = strategy.mesh
    # each window cut into the context axis' pieces: said before a weight is read
    check_context(task.config.seq_len, task.mesh, sequence_parallel=config.sequence_parallel)
    batches = len(task.val_dataloader())  # its refusals (batch vs the data axis) too
    trainer = Trainer(
        strategy,
        precision=precision,
        enable_progress_bar=False,
        logger=None,
        report_memory=False,
    )
    t0 = time.perf_counter()
    trainer.setup(task)  # load or restore the sharded model
    t1 = time.perf_counter()
    loss = trainer.validate(task)["val_loss"]  # compile (once) and evaluate
    t2 = time.perf_counter()
    windows, seq_len = len(task.windows), task.config.seq_len
    results = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "source": source,
        "data": config.data,
        "split": config.split,
        "seq_len": seq_len,
        "windows": windows,
        "tokens": windows * seq_len,
        "unscored_tokens": len(task.windows.tokens) - 1 - windows * seq_len,
        "batch_size": task.config.batch_size,
        "batches": batches,
        "mesh": mesh_shape(strategy.mesh),
        "fsdp": config.fsdp,
        "sequence_parallel": config.sequence_parallel,
        "loss_parallel": config.loss_parallel,
        "precision": precision,
        "platform": strategy.mesh.devices.flat[0].platform,
        "machine": machine(),
        "load_seconds": t1 - t0,
        "eval_seconds": t2 - t1,
        "process_count": jax.process_count(),
    }
    if jax.process_index() == 0:
        print(table(results))
    write_json(args.json, results, announce=False)
    return results


def table(r: dict[str, Any]) -> str:
    """The results as a few aligned lines."""
    model = ", ".join(f"{k} {v}" for k, v in r["source"].items())
    rows = [
        ("model", model),
        ("data", f"{r['data']} ({r['split']}.bin)"),
        (
            "scored",
            f"{r['tokens']:,} tokens = {r['windows']:,} windows x {r['seq_len']} "
            f"({r['unscored_tokens']} tail tokens fill no window)",
        ),
        (
            "run",
            f"mesh {r['mesh']} on {r['platform']}, fsdp={r['fsdp']}, {r['precision']}, "
            f"{r['batches']} batches of {r['batch_size']}",
        ),
        ("loss", f"{r['loss']:.6f} (mean over tokens)"),
        ("perplexity", f"{r['perplexity']:.4f}"),
        ("seconds", f"{r['load_seconds']:.2f} load, {r['eval_seconds']:.2f} compile + eval"),
    ]
    return "\n".join(f"{name:<11} {value}" for name, value in rows)


def run() -> None:
    """The ``python -m jtp.eval`` entry point."""
    retain_host_memory()  # on CPU, before jax starts: jtp.host_memory says why
    with one_line_errors("jtp.eval"):
        main(sys.argv[1:])
    import jax

    if jax.process_count() > 1:
        jax.distributed.shutdown()
