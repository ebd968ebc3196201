"""Metric files under ``<default_root_dir>/version_N``: CSV, JSON lines or TensorBoard.

Loggers are fed at the logging interval only, with rows already fetched from the devices
in one transfer, so they never force a device sync of their own. A row is ``{"step",
"epoch", name: value, ...}``; validation means (``val_*``) join the row of the step they
follow, so columns can appear after the first row.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any


class MetricsLogger:
    """Appends one row per training step to ``<run_dir>/metrics.csv`` or ``metrics.jsonl``.

    CSV: when a row brings a column the file lacks (the first ``val_loss``), the file is
    rewritten once under the wider header, as Lightning's CSVLogger does.
    """

    def __init__(self, run_dir: str, fmt: str = "csv"):
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"logger must be 'csv', 'jsonl', 'tensorboard' or None, got {fmt!r}")
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

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Event files TensorBoard reads (``tensorboard --logdir runs``), written by
    tensorboardX: one scalar per metric and step."""

    def __init__(self, run_dir: str):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError(
                "logger='tensorboard' needs tensorboardX: pip install 'jtp[tensorboard]' "
                "(or pip install tensorboardX)"
            ) from None
        os.makedirs(run_dir, exist_ok=True)
        self.path = run_dir
        self._writer = SummaryWriter(logdir=run_dir)

    def log(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            step = int(row["step"])
            for name, value in row.items():
                if name != "step":
                    self._writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        self._writer.close()


def make_logger(run_dir: str, fmt: str) -> MetricsLogger | TensorBoardLogger:
    """The logger ``Trainer(logger=fmt)`` names, writing under ``run_dir``."""
    return TensorBoardLogger(run_dir) if fmt == "tensorboard" else MetricsLogger(run_dir, fmt)


def next_run_dir(root: str) -> str:
    """``root/version_N`` with the first unused N, as Lightning's loggers do."""
    n = 0
    while os.path.exists(os.path.join(root, f"version_{n}")):
        n += 1
    return os.path.join(root, f"version_{n}")
