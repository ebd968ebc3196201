"""Metric files under ``<default_root_dir>/version_N``: CSV, JSON lines or TensorBoard; or a
Weights & Biases run.

Loggers are fed at the logging interval only, with rows already fetched from the devices
in one transfer, so they never force a device sync of their own. A row is ``{"step",
"epoch", name: value, ...}``; validation means (``val_*``) join the row of the step they
follow, so columns can appear after the first row.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
from typing import Any

# The logger names that need a package jtp does not depend on: (module, extra to install).
_NEEDS = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}


def require(logger: str | None) -> Any:
    """Import the package ``Trainer(logger=logger)`` writes with (``None`` for the file
    loggers), or raise an ``ImportError`` naming the extra to install. The Trainer calls it
    when its options are made, so a missing package fails before anything is built."""
    if logger not in _NEEDS:
        return None
    module, extra = _NEEDS[logger]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"logger={logger!r} needs {module}: pip install 'jtp[{extra}]' "
            f"(or pip install {module})"
        ) from None


class MetricsLogger:
    """Appends one row per training step to ``<run_dir>/metrics.csv`` or ``metrics.jsonl``.

    CSV: when a row brings a column the file lacks (the first ``val_loss``), the file is
    rewritten once under the wider header, as Lightning's CSVLogger does.
    """

    def __init__(self, run_dir: str, fmt: str = "csv"):
        if fmt not in ("csv", "jsonl"):
            raise ValueError(
                f"logger must be 'csv', 'jsonl', 'tensorboard', 'wandb' or None, got {fmt!r}"
            )
        os.makedirs(run_dir, exist_ok=True)
        self.fmt = fmt
        self.path = os.path.join(run_dir, f"metrics.{fmt}")
        self._fields: list[str] = []

    def log(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.fmt == "jsonl":
            with open(self.path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            return
        new = [k for row in rows for k in row if k not in self._fields]
        if new:
            old = self._read()
            self._fields += list(dict.fromkeys(new))
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, self._fields)
                writer.writeheader()
                writer.writerows(old + rows)
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self._fields).writerows(rows)

    def _read(self) -> list[dict[str, str]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def close(self, exit_code: int = 0) -> None:
        pass


class TensorBoardLogger:
    """Event files TensorBoard reads (``tensorboard --logdir runs``), written by
    tensorboardX: one scalar per metric and step."""

    def __init__(self, run_dir: str):
        tensorboardx = require("tensorboard")
        os.makedirs(run_dir, exist_ok=True)
        self.path = run_dir
        self._writer = tensorboardx.SummaryWriter(logdir=run_dir)

    def log(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            step = int(row["step"])
            for name, value in row.items():
                if name != "step":
                    self._writer.add_scalar(name, float(value), step)

    def close(self, exit_code: int = 0) -> None:
        self._writer.close()


class WandbLogger:
    """One Weights & Biases run per fit, as Lightning's ``WandbLogger``: each row's metrics
    logged at its optimizer step, the Trainer's options as the run's config.

    wandb reads its own settings from the environment: ``WANDB_PROJECT``, ``WANDB_NAME``,
    ``WANDB_ENTITY``, ``WANDB_MODE=offline`` (no server; ``wandb sync`` uploads later),
    ``WANDB_DIR``. Without ``WANDB_DIR`` the run's files go to ``<run_dir>/wandb``.
    """

    def __init__(self, run_dir: str, config: dict[str, Any] | None = None):
        wandb = require("wandb")
        os.makedirs(run_dir, exist_ok=True)
        self.path = run_dir
        # WANDB_DIR read now, not when wandb first set itself up in this process.
        self._run = wandb.init(config=config, dir=os.environ.get("WANDB_DIR") or run_dir)

    def log(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._run.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def close(self, exit_code: int = 0) -> None:
        """Finish the run (``exit_code`` != 0: wandb marks it failed)."""
        self._run.finish(exit_code=exit_code)


Logger = MetricsLogger | TensorBoardLogger | WandbLogger


def make_logger(run_dir: str, fmt: str, config: dict[str, Any] | None = None) -> Logger:
    """The logger ``Trainer(logger=fmt)`` names, writing under ``run_dir``; ``config``: what
    the run was (recorded by the loggers that keep one: wandb)."""
    if fmt == "tensorboard":
        return TensorBoardLogger(run_dir)
    if fmt == "wandb":
        return WandbLogger(run_dir, config)
    return MetricsLogger(run_dir, fmt)


def next_run_dir(root: str) -> str:
    """``root/version_N`` with the first unused N, as Lightning's loggers do."""
    n = 0
    while os.path.exists(os.path.join(root, f"version_{n}")):
        n += 1
    return os.path.join(root, f"version_{n}")
