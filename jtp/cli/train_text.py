"""``python -m jtp.train``'s flags for real text: token data, LR schedules, validation
during fit and the logger; mapped onto the task configs and the Trainer's options, and the
figures they add to the metrics JSON."""

from __future__ import annotations

import argparse
from typing import Any

from jtp.cli.recipes import LR_SCHEDULES

LOGGER_CHOICES = ("csv", "jsonl", "tensorboard", "none")


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text data, schedules, validation")
    g.add_argument(
        "--data", default=None, metavar="DIR",
        help="llama: train on DIR/train.bin, validate on DIR/val.bin (python -m jtp.prepare); "
        "the vocabulary comes from DIR/meta.json",
    )  # fmt: skip
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="AdamW lr")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear lr warmup from 0")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument(
        "--val-check-interval", type=int, default=None, metavar="N",
        help="validate every N optimizer steps",
    )  # fmt: skip
    g.add_argument(
        "--check-val-every-n-epoch", type=int, default=None, metavar="N",
        help="validate at the end of every N-th epoch",
    )  # fmt: skip
    g.add_argument(
        "--limit-val-batches", type=int, default=None, metavar="N",
        help="validate on at most N batches",
    )  # fmt: skip
    g.add_argument("--logger", choices=LOGGER_CHOICES, default="csv", help="metrics files")


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """Fields of the task configs (FeedForwardConfig, LlamaTaskConfig) these flags set."""
    return dict(
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
    )  # fmt: skip


def check(args: argparse.Namespace) -> None:
    if args.data and args.model != "llama":
        raise ValueError("--data DIR trains a language model: add --model llama")


def trainer_options(args: argparse.Namespace) -> dict[str, Any]:
    """Trainer options these flags set."""
    return dict(
        val_check_interval=args.val_check_interval,
        check_val_every_n_epoch=args.check_val_every_n_epoch,
        limit_val_batches=args.limit_val_batches,
        logger=None if args.logger == "none" else args.logger,
    )


def fit_metrics(trainer: Any) -> dict[str, Any]:
    """``val_history`` (``[{"step", "val_loss"}]``), ``val_loss`` (the last, or None) and
    ``lrs`` (the lr each step applied, when the optimizer keeps it in its state)."""
    val = [{"step": v["step"], "val_loss": v["val_loss"]} for v in trainer.val_history]
    lrs = [row["lr"] for row in trainer.metrics_history if "lr" in row]
    return {"val_history": val, "val_loss": val[-1]["val_loss"] if val else None, "lrs": lrs}
