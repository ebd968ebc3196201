"""The progress bar: the trainer's host-side view of a fit.

Fed at the logging interval only, with metrics already fetched in one batch, so it never
forces a device sync of its own. On a terminal it is a rich progress bar, one per epoch;
elsewhere (a log file, a pipe) one plain line per update, which is what log readers and
``grep`` want:

    epoch 0 [12/64] loss 1.234 val_loss 1.31 lr 0.003 | 5.1 it/s 164 samples/s 20992 tokens/s
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _fmt(value: float) -> str:
    return f"{value:.4g}"


class ProgressBar:
    """Loss, the last validation's ``val_*``, lr, it/s, samples/s and tokens/s.

    Args:
      enabled: draw anything at all (the trainer passes False off process 0).
      stream: where to draw (default stderr).
      terminal: draw a live rich bar (True) or plain lines (False); default: whether
        ``stream`` is a terminal.
    """

    def __init__(
        self, enabled: bool = True, stream: TextIO | None = None, *, terminal: bool | None = None
    ):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        if terminal is None:
            terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.terminal = terminal
        self._t0, self._steps0 = time.perf_counter(), 0
        self._val: dict[str, float] = {}  # shown until the next validation replaces them
        self._progress: Any = None
        self._task: Any = None

    def start_epoch(self) -> None:
        self._t0, self._steps0 = time.perf_counter(), 0
        self._task = None  # the next update opens this epoch's bar

    def update(
        self,
        epoch: int,
        done: int,
        total: int | None,
        metrics: dict[str, float],
        samples: int,
        tokens: int | None = None,
    ) -> None:
        """``done`` of ``total`` optimizer steps of ``epoch``; ``samples`` (and ``tokens``)
        per optimizer step give the throughput."""
        if not self.enabled:
            return
        self._val.update({k: v for k, v in metrics.items() if k.startswith("val_")})
        train = {k: v for k, v in metrics.items() if not k.startswith("val_")}
        shown = {"loss": train.pop("loss")} if "loss" in train else {}
        shown.update(self._val)
        shown.update(train)
        rate = (done - self._steps0) / max(time.perf_counter() - self._t0, 1e-9)
        speed = f"{rate:.2f} it/s {rate * samples:.1f} samples/s"
        if tokens:
            speed += f" {rate * tokens:.0f} tokens/s"
        info = " ".join(f"{k} {_fmt(v)}" for k, v in shown.items()) + f" | {speed}"
        if not self.terminal:
            self.stream.write(f"epoch {epoch} [{done}{f'/{total}' if total else ''}] {info}\n")
            self.stream.flush()
            return
        progress = self._rich()
        if self._task is None:
            self._task = progress.add_task("", total=total, epoch=epoch, info=info)
        progress.update(self._task, completed=done, total=total, info=info)
        progress.refresh()

    def _rich(self) -> Any:
        if self._progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class BarAndMetrics(Progress):
                """One bar row per epoch; the metrics on a line of their own beneath (as
                Lightning's RichProgressBar), so a narrow terminal squeezes neither."""

                def get_renderables(self) -> Any:
                    yield self.make_tasks_table(self.tasks)
                    if self.tasks:
                        yield Text(self.tasks[-1].fields.get("info", ""))

            self._progress = BarAndMetrics(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream, force_terminal=True),
                auto_refresh=False,  # redrawn at the logging interval only
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._progress.start()
        return self._progress

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = self._task = None
