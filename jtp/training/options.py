"""The Trainer's options, validated up front (Lightning's names where Lightning has one)."""

from __future__ import annotations

import dataclasses

from jtp.errors import check_fields
from jtp.training.loggers import require
from jtp.training.precision import PRECISIONS, policy
from jtp.training.steps import GRAD_REDUCE

LOGGERS = ("csv", "jsonl", "tensorboard", "wandb", None)


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """Everything ``jtp.Trainer(strategy, **options)`` takes besides the strategy.

    Each field is also a flag of ``python -m jtp.train`` (``--log-every-n-steps``), its help
    the entry below and its values the field's ``choices`` metadata (jtp.cli.flags).

    Attributes:
      max_epochs: epochs to run (stops earlier at ``max_steps``).
      max_steps: optimizer steps to run in total; ``-1`` for no limit.
      gradient_clip_val: clip gradients by their global norm (computed over the whole,
        sharded gradient: identical to clipping the unsharded one).
      accumulate_grad_batches: k loader batches make one optimizer step, equal to one step
        on a batch k times larger; the k micro-batches are looped over inside the compiled
        step (see ``grad_reduce``).
      grad_reduce: when gradients cross the "data" axis with k > 1: ``"per_step"`` (once
        per optimizer step, whatever k; holds one unreduced param-sized gradient per
        device) or ``"per_micro_batch"`` (k times; the accumulator keeps the parameters'
        layout). ``None``: per_step, but per_micro_batch under fsdp (whose point is to not
        hold whole gradients), as torchtitan does.
      log_every_n_steps: fetch metrics from the devices, log and refresh the progress bar
        every this many optimizer steps (the only host syncs in the loop).
      stop_check_every_n_steps: in a multi-process run, agree on stop requests (SIGTERM,
        SIGINT, preemption) every this many optimizer steps; ``None``: every
        ``log_every_n_steps`` (the loop syncs there anyway). One process: every step.
      enable_progress_bar: show the progress bar (process 0 only; rich on a terminal, one
        line per update elsewhere): loss, val loss, lr, it/s, samples/s and tokens/s.
      logger: ``"csv"``, ``"jsonl"``, ``"tensorboard"`` (event files; needs ``tensorboardX``:
        ``pip install 'jtp[tensorboard]'``), ``"wandb"`` (a Weights & Biases run, process 0
        only; ``pip install 'jtp[wandb]'``; project, name, offline mode from ``WANDB_*``) or
        ``None``: per-step metrics under ``log_dir``.
      default_root_dir: runs go to ``<default_root_dir>/version_N``.
      seed: seeds Python's and NumPy's global RNGs for user code; jax randomness is explicit
        (``nnx.Rngs``) and the loaders' order is a function of their own ``seed``.
      track_grad_norm: log the global gradient norm each step. Off by default: on XLA's CPU
        backend the norm's reduction materialises one parameter-sized temporary.
      precision: ``"32-true"``; ``"bf16-mixed"`` (fp32 parameters and optimizer state;
        matmuls and activations in bf16: parameters, float batch inputs and every stock Flax
        layer are cast inside the step; the loss in fp32); ``"bf16-true"`` (parameters and
        optimizer state stored in bf16, the same bf16 compute); ``"transformer-engine"``
        (alias ``"fp8-mixed"``: as bf16-mixed, and the linear layers' matmuls in float8,
        e4m3 forward and e5m2 gradients with current per-tensor scales; for Hopper and
        later GPUs). See ``jtp.training.precision``.
      checkpoint_dir: save sharded, asynchronous, atomic checkpoints here (orbax): every
        ``checkpoint_every_n_steps`` optimizer steps, at the end of ``fit`` and on an agreed
        stop (then exit with 128 + signal); ``keep_last`` complete ones are kept.
      checkpoint_every_n_steps: with ``checkpoint_dir``, save every this many optimizer
        steps; ``None``: only at the end of ``fit`` and on an agreed stop.
      keep_last: with ``checkpoint_dir``, the complete checkpoints kept (older ones deleted).
      check_replicas: verify with :func:`jtp.check_replicas` that every device of a tensor
        group holds the same rows, for this many first batches of each fit. ``None``: 2 in
        a multi-process run (where a process-dependent loader would go wrong), else 0.
      val_check_interval: validate during ``fit`` after every this many optimizer steps
        (counted across epochs, as Lightning does with ``check_val_every_n_epoch=None``).
      check_val_every_n_epoch: validate during ``fit`` at the end of every this many epochs.
        Validation in ``fit`` runs only when one of the two is set (Lightning defaults to
        every epoch; here it is asked for); it uses ``val_dataloader``/``validation_step``,
        reads the parameters without changing them, and runs at the same steps in every
        process. Its means (``val_*``) are logged with the step they follow.
      limit_val_batches: evaluate at most this many batches in ``validate``/``test`` and in
        validation during ``fit``.
      report_memory: print the per-device peak memory at the end of ``fit``.
      collective_timeout: in a multi-process run, seconds a step, an agreement, a replica
        check or a save may wait on the other processes before this process ends with
        status 124, naming the step and what it waited on (``jtp.distributed.Watchdog``;
        NCCL's watchdog and torch's collective timeout do the same). ``None``: wait
        forever. Compiles are not timed; raise it above your longest checkpoint save.
    """

    max_epochs: int = 1
    max_steps: int = -1
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    grad_reduce: str | None = dataclasses.field(default=None, metadata={"choices": GRAD_REDUCE})
    log_every_n_steps: int = 10
    stop_check_every_n_steps: int | None = None
    enable_progress_bar: bool = True
    logger: str | None = dataclasses.field(default="csv", metadata={"choices": LOGGERS})
    default_root_dir: str = "runs"
    seed: int | None = 0
    track_grad_norm: bool = False
    precision: str = dataclasses.field(default="32-true", metadata={"choices": PRECISIONS})
    checkpoint_dir: str | None = None
    checkpoint_every_n_steps: int | None = None
    keep_last: int = 3
    check_replicas: int | None = None
    val_check_interval: int | None = None
    check_val_every_n_epoch: int | None = None
    limit_val_batches: int | None = None
    report_memory: bool = True
    collective_timeout: float | None = 600.0

    def __post_init__(self) -> None:
        check_fields(self)  # every float finite
        positive = ("accumulate_grad_batches", "log_every_n_steps", "keep_last")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        optional = (
            "stop_check_every_n_steps",
            "checkpoint_every_n_steps",
            "val_check_interval",
            "check_val_every_n_epoch",
            "limit_val_batches",
        )
        if not isinstance(self.val_check_interval, int | None):
            raise ValueError(
                f"val_check_interval={self.val_check_interval!r} must be an int number of "
                "optimizer steps (for once per epoch: check_val_every_n_epoch=1)"
            )
        for name in optional:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 or None")
        if self.collective_timeout is not None and not self.collective_timeout > 0:
            raise ValueError(
                f"collective_timeout={self.collective_timeout} must be > 0 seconds or None"
            )
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val={self.gradient_clip_val} must be > 0 or None")
        policy(self.precision)  # an unknown name raises, listing the choices
        if self.grad_reduce not in (*GRAD_REDUCE, None):
            raise ValueError(f"grad_reduce={self.grad_reduce!r} must be one of {GRAD_REDUCE}")
        if self.logger not in LOGGERS:
            raise ValueError(
                f"logger={self.logger!r}: logger must be 'csv', 'jsonl', 'tensorboard', 'wandb' "
                "or None"
            )
        require(self.logger)  # a missing tensorboardX / wandb fails here, before any compile

    @property
    def validates_in_fit(self) -> bool:
        return self.val_check_interval is not None or self.check_val_every_n_epoch is not None

    def grad_reduce_for(self, *, fsdp: bool) -> str:
        """The gradient reduction in force (see ``grad_reduce``)."""
        if self.grad_reduce is not None:
            return self.grad_reduce
        return "per_micro_batch" if fsdp else "per_step"
