"""One ``Trainer.fit`` in progress: its compiled step, metrics, logger, progress bar, clock.

The pieces of a fit that hold state across steps but take no decisions (those are in
:mod:`jtp.training.policy`): the loop hands them batches and decisions.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jax

from jtp.training.checkpoint import Checkpointer
from jtp.training.metrics import MetricsBuffer
from jtp.training.progress import MetricsLogger, ProgressBar, next_run_dir

if TYPE_CHECKING:
    from jtp.training.trainer import Trainer


class FitRun:
    """Use as a context manager: leaving it flushes metrics, closes the bar and waits for
    checkpoint writes, also when the loop raises (a non-finite loss, an agreed stop)."""

    def __init__(self, trainer: Trainer, ckpt: Checkpointer | None):
        o = trainer.options
        self.trainer, self.ckpt = trainer, ckpt
        if trainer.is_global_zero and o.logger:
            trainer.log_dir = next_run_dir(o.default_root_dir)
        logger = MetricsLogger(trainer.log_dir, o.logger) if trainer.log_dir else None
        self.metrics = MetricsBuffer(logger, o.checkpoint_dir)
        self.bar = ProgressBar(o.enable_progress_bar and trainer.is_global_zero)
        self.compiled: jax.stages.Compiled | None = None
        self._t_start = self._t_compiled = time.perf_counter()
        self._epoch = None

    def __enter__(self) -> FitRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None or issubclass(exc[0], SystemExit):
                self.metrics.flush()
        finally:
            self.bar.close()
            if self.ckpt is not None:
                self.ckpt.close()
        self._t_end = time.perf_counter()

    def train_step(self, batches: list[Any], epoch: int, index: int) -> None:
        """Run the compiled step on ``batches``; keep its metrics on the device."""
        if self._t_compiled == self._t_start:
            self._t_compiled = time.perf_counter()
        if epoch != self._epoch:
            self.bar.start_epoch()
            self._epoch = epoch
        state = self.trainer._state
        try:
            *new_state, metrics = self.compiled(*state.arrays(), batches)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"batch {index} of epoch {epoch} does not match the compiled train step "
                f"(shapes/shardings must stay fixed; use drop_last=True): {err}"
            ) from err
        state.update(*new_state)
        self.metrics.add(self.trainer.global_step + 1, epoch, metrics)

    def log(self, epoch: int, done: int, total: int, batches: list[Any]) -> None:
        """Fetch the pending metrics (raises on a non-finite loss) and refresh the bar."""
        latest = self.metrics.flush()
        rows = sum(int(jax.tree.leaves(b)[0].shape[0]) for b in batches)
        self.bar.update(epoch, done, total if total > 0 else None, latest, rows)

    def stop(self, exit_code: int) -> None:
        """Leave ``fit`` after an agreed stop (the step is saved): exit with ``exit_code``."""
        raise SystemExit(exit_code)

    def seconds(self) -> tuple[float, float | None]:
        """(whole fit incl. compile, steady state from the end of the compile)."""
        end = getattr(self, "_t_end", time.perf_counter())
        steady = end - self._t_compiled if self.compiled is not None else None
        return end - self._t_start, steady
