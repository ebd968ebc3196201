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
    python -m jtp.train --devices 8 --model llama --data DIR --seq-len 128 --batch-size 32 \
        --data-parallel 2 --tensor-parallel 4 --max-steps 300 --lr-schedule cosine \
        --warmup-steps 30 --val-check-interval 100        # DIR from python -m jtp.prepare

``main(argv)`` is importable (tests call it) and returns the metrics dict it writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from jtp.cli import train_text
from jtp.cli.output import write_json
from jtp.training.precision import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jtp.train",
        description="Train the Lightning docs' FeedForward example with tensor parallelism.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices to use; on CPU, force this many host devices (before jax starts)",
    )
    p.add_argument(
        "--data-parallel",
        type=_size,
        default="auto",
        help="size of the 'data' mesh axis, or 'auto'",
    )
    p.add_argument(
        "--tensor-parallel", type=_size, default="auto",
        help="size of the 'tensor' mesh axis, or 'auto'",
    )  # fmt: skip
    p.add_argument("--fsdp", action="store_true", help="2D: also shard params over 'data'")
    p.add_argument(
        "--model", choices=("feedforward", "llama"), default="feedforward", help="what to train"
    )
    p.add_argument("--preset", default="tiny", help="llama: tiny | llama3-8b | llama3-70b")
    p.add_argument(
        "--hf", default=None, help="llama: fine-tune this Hugging Face checkpoint directory"
    )
    p.add_argument("--seq-len", type=int, default=32, help="llama: tokens per sample")
    p.add_argument(
        "--sequence-parallel", action="store_true", help="llama: split the residual on T"
    )
    p.add_argument(
        "--loss-parallel", action="store_true", help="llama: cross-entropy on vocab shards"
    )
    p.add_argument("--remat", action="store_true", help="llama: recompute blocks in backward")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="32-true",
        help="parameter/compute dtypes",
    )
    p.add_argument("--dim", type=int, default=8192, help="FeedForward input/output features")
    p.add_argument("--hidden-dim", type=int, default=8192, help="FeedForward hidden features")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size")
    p.add_argument("--samples", type=int, default=64, help="RandomDataset length")
    p.add_argument("--max-epochs", type=int, default=1, help="epochs to train")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed")
    p.add_argument("--log-every", type=int, default=10, help="metric fetch/log interval (steps)")
    p.add_argument(
        "--accumulate-grad-batches", type=int, default=1,
        help="loader batches per optimizer step (looped inside the compiled step)",
    )  # fmt: skip
    p.add_argument("--root-dir", default="runs", help="run directory root (metrics.csv)")
    p.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    p.add_argument(
        "--explain", action="store_true", help="print every parameter's layout before training"
    )
    p.add_argument(
        "--check-replicas", type=int, default=None,
        help="verify tensor groups hold identical rows for N first batches "
        "(default: 2 with several processes, else 0)",
    )  # fmt: skip
    p.add_argument(
        "--metrics-json", default=None, help="write mesh, losses, memory, ... as JSON here"
    )
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", default=None, help="save sharded checkpoints here")
    g.add_argument("--checkpoint-every", type=int, default=None, help="save every N steps")
    g.add_argument("--keep-last", type=int, default=3, help="complete checkpoints to keep")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    g.add_argument(
        "--export", default=None, help="after training, write consolidated params (safetensors)"
    )
    g.add_argument(
        "--export-hf", default=None, help="after training, write a Hugging Face checkpoint here"
    )
    train_text.add_flags(p)
    d = p.add_argument_group("multiple processes (jax.distributed)")
    d.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    d.add_argument("--num-processes", type=int, default=None, help="processes in the job")
    d.add_argument("--process-id", type=int, default=None, help="this process's index")
    d.add_argument(
        "--stop-check-every", type=int, default=None,
        help="agree on SIGTERM/SIGINT across processes every N steps (default: --log-every)",
    )  # fmt: skip
    d.add_argument(
        "--heartbeat-timeout", type=int, default=20,
        help="seconds without a heartbeat before a peer counts as dead (then all exit)",
    )  # fmt: skip
    return p


def _size(value: str) -> int | str:
    """An argparse type for mesh axis sizes: 'auto' or a positive int."""
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'auto' or a positive integer")
    return size


def _init_distributed(args: argparse.Namespace) -> bool:
    """Start jax's distributed runtime before any other jax call, when asked to.

    Explicit flags, or the standard environment (``JAX_COORDINATOR_ADDRESS`` /
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``) or a detected cluster (SLURM, ...), which
    ``jax.distributed.initialize()`` reads itself.
    """
    import jax

    explicit = args.coordinator is not None
    from_env = "JAX_COORDINATOR_ADDRESS" in os.environ or "SLURM_JOB_ID" in os.environ
    if not (explicit or from_env):
        return False
    if args.devices is not None:  # per-process CPU devices must be set before the backend
        jax.config.update("jax_num_cpu_devices", args.devices)
    kwargs: dict[str, Any] = {"heartbeat_timeout_seconds": args.heartbeat_timeout}
    if explicit:
        kwargs.update(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    jax.distributed.initialize(**kwargs)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.hf and args.model != "llama":
        raise SystemExit("--hf loads a Llama-family checkpoint: add --model llama")
    train_text.check(args)
    # Each process's devices are forced inside _init_distributed; there all devices are used.
    distributed = _init_distributed(args)
    from jtp.cli.devices import select_devices

    devices = None if distributed or args.devices is None else select_devices(args.devices)

    import jax

    from jtp.cli.recipes import FeedForwardConfig, FeedForwardTask, LlamaTask, LlamaTaskConfig
    from jtp.mesh import ModelParallelStrategy, mesh_shape
    from jtp.training.trainer import Trainer

    strategy = ModelParallelStrategy(
        args.data_parallel, args.tensor_parallel, fsdp=args.fsdp, devices=devices
    )
    common = dict(
        samples=args.samples, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        fsdp=args.fsdp, **train_text.task_options(args),
    )  # fmt: skip
    if args.model == "llama":
        task = LlamaTask(
            LlamaTaskConfig(
                preset=args.preset,
                seq_len=args.seq_len,
                remat=args.remat,
                sequence_parallel=args.sequence_parallel,
                loss_parallel=args.loss_parallel,
                hf=args.hf,
                data=args.data,
                **common,
            )  # fmt: skip
        )
    else:
        task = FeedForwardTask(
            FeedForwardConfig(dim=args.dim, hidden_dim=args.hidden_dim, **common)
        )
    trainer = Trainer(
        strategy,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        log_every_n_steps=args.log_every,
        accumulate_grad_batches=args.accumulate_grad_batches,
        stop_check_every_n_steps=args.stop_check_every,
        enable_progress_bar=not args.no_progress,
        default_root_dir=args.root_dir,
        seed=args.seed,
        precision=args.precision,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every_n_steps=args.checkpoint_every,
        keep_last=args.keep_last,
        check_replicas=args.check_replicas,
        **train_text.trainer_options(args),
    )
    mesh = strategy.mesh
    if jax.process_index() == 0:
        print(
            f"mesh {mesh_shape(mesh)} on {mesh.devices.size} "
            f"{mesh.devices.flat[0].platform} devices, fsdp={args.fsdp}"
        )
    if args.explain and jax.process_index() == 0:
        from jtp.analysis.explain import explain

        print(explain(task.model_factory(), mesh, task.plan, fsdp=args.fsdp))
    trainer.fit(task, resume=args.resume)
    if args.export:
        from jtp.checkpoint.consolidated import save_consolidated

        save_consolidated(trainer.model, args.export)
    if args.export_hf:  # config.json and tokenizer files carried over from --hf
        from jtp.models.hf import save_pretrained

        save_pretrained(trainer.model, args.export_hf, source=args.hf)
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
        **train_text.fit_metrics(trainer),
        "config": vars(args),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
    }
    write_json(args.metrics_json, metrics, announce=False)
    return metrics


def _run_and_exit(argv: list[str]) -> None:
    """Run ``main``; in a multi-process job, shut the runtime down and leave at once.

    XLA's CPU collectives (gloo) sometimes hang in their destructors at interpreter exit,
    after all work and the distributed shutdown are done (seen here about 1 run in 10): a
    finished job must not hang, so it exits without interpreter teardown once its output
    is flushed.
    """
    code: int | str | None = 0
    try:
        main(argv)
    except SystemExit as stop:  # e.g. 143 after a SIGTERM checkpoint
        code = stop.code
    import jax

    if jax.process_count() > 1:
        jax.distributed.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)


def run() -> None:
    """The ``python -m jtp.train`` entry point."""
    _run_and_exit(sys.argv[1:])
