"""``python -m jtp.train``: the Lightning docs' tensor-parallel example, in jtp.

Default run: FeedForward(8192, 8192), loss ``output.sum()``, AdamW lr 3e-3,
RandomDataset(8192, 64), global batch 8, one epoch, tensor parallelism over all devices; it
prints the peak memory per device at the end.

    python -m jtp.train                                   # all devices (1 CPU device here)
    python -m jtp.train --devices 8                       # 8 forced CPU devices, TP=8
    python -m jtp.train --devices 8 --data-parallel 2 --tensor-parallel 4 --fsdp
    python -m jtp.train --devices 8 --dim 256 --hidden-dim 1024 --metrics-json m.json
    python -m jtp.train --devices 8 --model llama --preset tiny --data-parallel 2 \
        --tensor-parallel 4 --fsdp --sequence-parallel --loss-parallel --precision bf16-mixed
    python -m jtp.train --devices 8 --model llama --preset MOE --expert-parallel 4 \
        --tensor-parallel 2                               # MoE experts over "expert"
    python -m jtp.train --devices 8 --model llama --context-parallel 4 --tensor-parallel 2 \
        --seq-len 256                                     # each sequence in 4 pieces
    python -m jtp.train --devices 8 --model llama --hf DIR --lora-rank 8 --lora-alpha 16 \
        --export-peft ADAPTER --export-hf MERGED          # LoRA: only the adapters train
    python -m jtp.train --devices 8 --model llama --data DIR --seq-len 128 --batch-size 32 \
        --data-parallel 2 --tensor-parallel 4 --max-steps 300 --lr-schedule cosine \
        --warmup-steps 30 --val-check-interval 100        # DIR from python -m jtp.prepare

Every field of the task configs and of TrainerOptions is a flag named after it
(``--log-every-n-steps``, ...: jtp.cli.flags); :data:`ALIASES` keeps the earlier spellings
working. ``main(argv)`` (tests call it) returns the metrics dict it writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from jtp.checkpoint.outputs import write_json
from jtp.cli.devices import add_mesh_flags, init_distributed
from jtp.cli.flags import (
    ArgumentParser,
    FieldFlags,
    add_compilation_cache_flags,
    field_values,
    options_from_args,
)
from jtp.cli.output import one_line_errors, program
from jtp.errors import InputError
from jtp.host_memory import retain_host_memory, setting
from jtp.mesh import select_devices
from jtp.recipes import FeedForwardConfig, LlamaTaskConfig, TaskConfig
from jtp.recipes.objective import ROUTER_METRICS
from jtp.training import compilation_cache
from jtp.training.options import TrainerOptions
from jtp.xla_flags import apply_gpu_flags

# The fields of the task configs and TrainerOptions are flags; earlier spellings still work:
ALIASES = {
    "log_every_n_steps": ("--log-every",),
    "default_root_dir": ("--root-dir",),
    "enable_progress_bar": ("--no-progress",),
    "checkpoint_every_n_steps": ("--checkpoint-every",),
    "stop_check_every_n_steps": ("--stop-check-every",),
}
METAVARS = dict.fromkeys(("data", "hf", "default_root_dir", "checkpoint_dir"), "DIR")
METAVARS["preset"] = "NAME"
WHAT_EXPERT = "splits a mixture-of-experts model's experts (--model feedforward has none)"
WHAT_CONTEXT = "splits each token sequence over devices (--model feedforward has none)"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=program("python -m jtp.train"),
        description="Train the Lightning docs' FeedForward example (or a Llama) with tensor "
        "parallelism. Flags are named after the option they set; the earlier spellings ("
        + ", ".join(s for spellings in ALIASES.values() for s in spellings)
        + ") still work.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_mesh_flags(p, "mesh", expert=True, context=True)
    p.add_argument(
        "--model", choices=("feedforward", "llama"), default="feedforward", help="what to train"
    )
    p.add_argument(
        "--explain", action="store_true", help="print every parameter's layout before training"
    )
    p.add_argument(
        "--metrics-json",
        default=None,
        metavar="PATH",
        help="write mesh, losses, memory, ... as JSON here",
    )
    flags = FieldFlags(aliases=ALIASES, metavars=METAVARS)
    flags.add(p.add_argument_group("both models"), TaskConfig)
    flags.add(p.add_argument_group("--model feedforward"), FeedForwardConfig)
    flags.add(p.add_argument_group("--model llama"), LlamaTaskConfig)
    trainer = p.add_argument_group("Trainer options (Lightning's names)")
    g = p.add_argument_group("checkpoints")
    flags.add(g, TrainerOptions, ("checkpoint_dir", "checkpoint_every_n_steps", "keep_last"))
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="if-any",
        type=_resume,
        help="continue from the newest checkpoint of --checkpoint-dir (which must exist); "
        "--resume if-any: also start afresh when it does not (a self-restarting job)",
    )
    g.add_argument(
        "--export",
        default=None,
        metavar="PATH",
        help="after training, write consolidated params (safetensors)",
    )
    g.add_argument(
        # "--export-" spelt out: before --export-peft it was an unambiguous prefix of this.
        "--export-hf",
        "--export-",
        default=None,
        metavar="DIR",
        help="after training, write a Hugging Face checkpoint here",
    )
    g.add_argument(
        "--export-peft",
        default=None,
        metavar="DIR",
        help="after LoRA training (--lora-rank), write the adapters as a PEFT adapter here",
    )
    d = p.add_argument_group("multiple processes (jax.distributed)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    d.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    d.add_argument("--process-id", type=int, metavar="I", help="this process's index")
    d.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=20,
        metavar="SECONDS",
        help="seconds without a heartbeat before a peer counts as dead (then all exit)",
    )
    flags.add(d, TrainerOptions, ("stop_check_every_n_steps",))
    add_compilation_cache_flags(p.add_argument_group("compilation (process setup)"))
    flags.add(trainer, TrainerOptions)  # the others
    return p


def _resume(value: str) -> str:
    """``--resume``'s one optional value."""
    if value != "if-any":
        raise argparse.ArgumentTypeError(f"{value!r}: --resume takes no value, or 'if-any'")
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.hf and args.model != "llama":
        raise SystemExit("--hf loads a Llama-family checkpoint: add --model llama")
    if args.export_peft and getattr(args, "lora_rank", 0) <= 0:
        raise SystemExit("--export-peft writes LoRA adapters: add --lora-rank R (R > 0)")
    if args.export_peft and args.hf:  # refused now rather than after training (Phi-3)
        from jtp.models.hf.config import read_config
        from jtp.models.hf.families import refuse_peft

        refuse_peft(read_config(args.hf), "--export-peft")
    for flag, given, what in (
        ("--data DIR", args.data, "trains a language model"),
        (f"--expert-parallel {args.expert_parallel}", args.expert_parallel > 1, WHAT_EXPERT),
        (f"--context-parallel {args.context_parallel}", args.context_parallel > 1, WHAT_CONTEXT),
    ):
        if given and args.model != "llama":
            raise InputError(f"{flag} {what}: add --model llama")
    check_paths(args)
    # Before the first compile: a repeated or resumed run loads its steps from this cache.
    compilation_cache.enable(args.compilation_cache)
    # XLA reads its flags when jax initialises (next): on GPUs, jtp's set (jtp.xla_flags).
    apply_gpu_flags(sequence_parallel=getattr(args, "sequence_parallel", False))
    # Each process's devices are forced inside init_distributed; there all devices are used.
    distributed = init_distributed(
        args.devices,
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        heartbeat_timeout=args.heartbeat_timeout,
    )
    devices = None if distributed or args.devices is None else select_devices(args.devices)

    import jax

    from jtp.distributed import watchdog

    if distributed:
        watchdog.arm(args.collective_timeout)  # the fit, the exports and the shutdown

    from jtp.mesh import ModelParallelStrategy, mesh_shape
    from jtp.recipes import FeedForwardTask, LlamaTask
    from jtp.training.trainer import Trainer

    strategy = ModelParallelStrategy(
        args.data_parallel,
        args.tensor_parallel,
        expert_parallel_size=args.expert_parallel,
        context_parallel_size=args.context_parallel,
        fsdp=args.fsdp,
        devices=devices,
    )
    if args.model == "llama":
        task = LlamaTask(options_from_args(LlamaTaskConfig, args))
    else:
        task = FeedForwardTask(options_from_args(FeedForwardConfig, args))
    trainer = Trainer(strategy, **field_values(TrainerOptions, args))
    mesh = strategy.mesh
    if args.model == "llama":  # the sequence against the context axis, before any model
        from jtp.recipes.llama import check_context

        check_context(args.seq_len, mesh, sequence_parallel=args.sequence_parallel)
    if jax.process_index() == 0:
        print(
            f"mesh {mesh_shape(mesh)} on {mesh.devices.size} "
            f"{mesh.devices.flat[0].platform} devices, fsdp={args.fsdp}"
        )
    if args.explain and jax.process_index() == 0:
        from jtp.analysis.explain import explain
        from jtp.training.precision import policy

        p = policy(args.precision)
        computes = {"compute_dtype": p.compute_dtype, "float8": p.float8}
        print(explain(task.model_factory(mesh), mesh, task.plan, fsdp=args.fsdp, **computes))
    trainer.fit(task, resume=args.resume)
    if args.export:
        from jtp.checkpoint.consolidated import save_consolidated

        save_consolidated(trainer.model, args.export)  # its gathers are watched regions
    if args.export_hf:  # config.json and tokenizer files carried over from --hf; LoRA merged
        from jtp.models.hf import save_pretrained

        save_pretrained(trainer.model, args.export_hf, source=args.hf)  # gathers watched
    if args.export_peft:
        from jtp.models.hf import save_peft

        base = os.path.abspath(args.hf) if args.hf else None
        save_peft(trainer.model, args.export_peft, base_model_name_or_path=base)
    steps = len(trainer.losses)
    metrics = {
        "mesh": mesh_shape(mesh),
        "fsdp": args.fsdp,
        "model": args.model,
        "platform": mesh.devices.flat[0].platform,
        "losses": trainer.losses,
        "first_step": trainer.first_step,
        "steps": steps,
        "peak_memory_bytes_per_device": trainer.peak_memory_bytes_per_device,
        "fit_seconds": trainer.fit_seconds,
        "compile_seconds": trainer.compile_seconds,
        "step_times": trainer.step_times,  # each loss on the host, s from the fit's start
        "compile_cache_hits": trainer.compile_cache_hits,
        "compilation_cache": args.compilation_cache,
        "host_memory": setting(),  # jtp.host_memory: retained on CPU
        **_fit_metrics(trainer),
        "config": vars(args),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "launch": _launch_metrics(distributed),
    }
    write_json(args.metrics_json, metrics, announce=False)
    return metrics


def check_paths(args: argparse.Namespace) -> None:
    """Every output path, before any work: the right kind (file or directory), in an
    existing writable directory, never an input of the run, and never a directory holding
    what jtp did not write (jtp.checkpoint.outputs); the export flags valid for the model."""
    from jtp.checkpoint.outputs import check_not_an_input, check_output_dir, check_output_file

    if (args.export_hf or args.export_peft) and args.model != "llama":
        flag = "--export-hf" if args.export_hf else "--export-peft"
        raise InputError(f"{flag} writes a Hugging Face language model: add --model llama")
    inputs = [("--data", args.data), ("--hf", args.hf)]
    if args.checkpoint_dir:
        check_not_an_input(args.checkpoint_dir, "--checkpoint-dir", inputs)
        inputs.append(("--checkpoint-dir", args.checkpoint_dir))
    outputs = []
    if args.export:
        check_output_file(args.export, flag="--export", inputs=inputs, kind="consolidated")
        outputs.append(("--export", args.export))
    for flag, path, kind in (
        ("--export-hf", args.export_hf, "hf-checkpoint"),
        ("--export-peft", args.export_peft, "peft-adapter"),
    ):
        if path:
            check_output_dir(path, kind, flag=flag, inputs=[*inputs, *outputs])
            outputs.append((flag, path))
    if args.metrics_json:
        check_output_file(args.metrics_json, flag="--metrics-json", inputs=[*inputs, *outputs])


def _launch_metrics(launch: Any) -> dict[str, Any] | None:
    """How jax.distributed was started (None: one process): the settings, and the GPUs jax
    was left (``jax_cuda_visible_devices``, "all" unless restricted), read back from jax."""
    if launch is None:
        return None
    import dataclasses

    import jax

    visible = jax.config.read("jax_cuda_visible_devices")
    return {**dataclasses.asdict(launch), "jax_cuda_visible_devices": visible}


def _fit_metrics(trainer: Any) -> dict[str, Any]:
    """``val_history`` (``[{"step", "val_loss", other val_* means}]``), ``val_loss`` (the
    last, or None), ``lrs`` (the lr each step applied, when the optimizer keeps it in its
    state) and, for a mixture of experts, ``router`` (its losses and expert loads, one value
    per step)."""
    # every val_* mean (a mixture of experts' val_lm_loss, val_aux_loss, ...), by step
    val = [
        {"step": v["step"], **{k: x for k, x in v.items() if k.startswith("val_")}}
        for v in trainer.val_history
    ]
    lrs = [row["lr"] for row in trainer.metrics_history if "lr" in row]
    out = {"val_history": val, "val_loss": val[-1]["val_loss"] if val else None, "lrs": lrs}
    # A mixture of experts' per-step metrics (jtp.recipes.objective): {name: [one per step]}
    names = [n for n in ROUTER_METRICS if any(n in row for row in trainer.metrics_history)]
    if names:
        out["router"] = {n: [row.get(n) for row in trainer.metrics_history] for n in names}
    return out


def _run_and_exit(argv: list[str]) -> None:
    """Run ``main``; in a multi-process job, shut the runtime down and leave at once.

    XLA's CPU collectives (gloo) sometimes hang in their destructors at interpreter exit,
    after all work and the distributed shutdown are done (seen here about 1 run in 10): a
    finished job must not hang, so it exits without interpreter teardown once its output
    is flushed.
    """
    code: int | str | None = 0
    try:
        with one_line_errors("jtp.train"):  # a user's mistake: one line and exit 2
            main(argv)
    except SystemExit as stop:  # that, or e.g. 143 after a SIGTERM checkpoint
        code = stop.code
    import jax

    if jax.process_count() > 1:
        from jtp.distributed import watching

        with watching("the distributed runtime's shutdown (a barrier of all processes)"):
            jax.distributed.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)


def run() -> None:
    """The ``python -m jtp.train`` entry point."""
    retain_host_memory()  # on CPU, before jax starts (its docstring says why)
    _run_and_exit(sys.argv[1:])
