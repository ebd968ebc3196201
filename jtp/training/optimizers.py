"""The optimizer the ready-made tasks train with: AdamW under a learning-rate schedule
(constant after a warmup, or cosine), its hyperparameters kept in the optimizer state so the
trainer logs the rate it applied. Any ``optax.GradientTransformation`` works with the
Trainer; these are the defaults ``jtp train`` exposes as flags."""

from __future__ import annotations

from typing import Any

import optax

from jtp.errors import InputError
from jtp.training.module import TrainModule

LR_SCHEDULES = ("constant", "cosine")
FINAL_LR_RATIO = 0.1  # cosine decays to lr / 10 (nanoGPT's and Chinchilla's choice)


def lr_schedule(
    kind: str, lr: float, *, warmup_steps: int = 0, total_steps: int | None = None
) -> optax.ScalarOrSchedule:
    """``constant`` (after an optional linear warmup from 0) or ``cosine``: linear warmup
    from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * FINAL_LR_RATIO`` at
    ``total_steps`` (the run's optimizer steps; the warmup counts in them)."""
    if kind not in LR_SCHEDULES:
        raise InputError(f"--lr-schedule {kind!r}: choose one of {LR_SCHEDULES}")
    if warmup_steps < 0:
        raise InputError(f"--warmup-steps {warmup_steps} must be >= 0")
    if kind == "constant":
        return optax.warmup_constant_schedule(0.0, lr, warmup_steps) if warmup_steps else lr
    if total_steps is None or total_steps <= warmup_steps:
        raise InputError(
            f"--lr-schedule cosine: --warmup-steps {warmup_steps} must be below the run's "
            f"{total_steps} optimizer steps"
        )
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, total_steps, end_value=lr * FINAL_LR_RATIO
    )


def adamw(config: Any, module: TrainModule) -> optax.GradientTransformation:
    """AdamW with ``config``'s ``lr``, ``lr_schedule``, ``warmup_steps`` and
    ``weight_decay``, its hyperparameters kept in the optimizer state
    (``optax.inject_hyperparams``) so the trainer logs the lr applied. A cosine schedule
    decays over the trainer's ``estimated_stepping_batches``."""
    total = module.trainer.estimated_stepping_batches if config.lr_schedule == "cosine" else None
    schedule = lr_schedule(
        config.lr_schedule, config.lr, warmup_steps=config.warmup_steps, total_steps=total
    )
    # Only lr and weight decay live in the state: the betas and eps stay Python constants,
    # as in optax.adamw. In the state they would take the parameters' dtype, and under
    # bf16-true b2 = 0.999 rounds to 1.0 in bf16 (Adam's bias correction then divides by 0).
    static = ("b1", "b2", "eps", "eps_root")
    adamw_ = optax.inject_hyperparams(optax.adamw, static_args=static)
    return adamw_(learning_rate=schedule, weight_decay=config.weight_decay)
