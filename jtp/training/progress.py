"""Progress bar and metric files: the trainer's only host-side output.

Both are fed at the logging interval only, with metrics already fetched in one batch, so
they never force a device sync of their own.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from typing import Any, TextIO


class ProgressBar:
    """One self-rewriting line: ``epoch 0 [12/64] loss 1.234 | 5.1 it/s 41 samples/s``."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._t0 = time.perf_counter()
        self._steps0 = 0
        self._isatty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def start_epoch(self) -> None:
        self._t0, self._steps0 = time.perf_counter(), 0

    def update(
        self, epoch: int, done: int, total: int | None, metrics: dict[str, float], samples: int
    ) -> None:
        if not self.enabled:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        rate = (done - self._steps0) / dt
        total_s = f"/{total}" if total else ""
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        speed = f"{rate:.2f} it/s {rate * samples:.1f} samples/s"
        line = f"epoch {epoch} [{done}{total_s}] {shown} | {speed}"
        end = "\r" if self._isatty else "\n"
        self.stream.write(line + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._isatty:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLogger:
    """Appends one row per training step to ``<run_dir>/metrics.csv`` or ``metrics.jsonl``."""

    def __init__(self, run_dir: str, fmt: str = "csv"):
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"logger must be 'csv', 'jsonl' or None, got {fmt!r}")
        os.makedirs(run_dir, exist_ok=True)
        self.fmt = fmt
        self.path = os.path.join(run_dir, f"metrics.{fmt}")
        self._fields: list[str] | None = None

    def log(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        with open(self.path, "a", newline="") as f:
            if self.fmt == "jsonl":
                for row in rows:
                    f.write(json.dumps(row) + "\n")
                return
            if self._fields is None:
                self._fields = list(rows[0])
                csv.DictWriter(f, self._fields).writeheader()
            writer = csv.DictWriter(f, self._fields, extrasaction="ignore")
            writer.writerows(rows)


def next_run_dir(root: str) -> str:
    """``root/version_N`` with the first unused N, as Lightning's loggers do."""
    n = 0
    while os.path.exists(os.path.join(root, f"version_{n}")):
        n += 1
    return os.path.join(root, f"version_{n}")
