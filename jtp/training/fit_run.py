"""One ``Trainer.fit`` in progress: its compiled step, metrics, logger, progress bar, clock,
and the validation loader.

The pieces of a fit that hold state across steps but take no decisions (those are in
:mod:`jtp.training.policy`) and own no training state (the Trainer does): the loop hands them
arrays, batches, step numbers and decisions, and takes back the new arrays.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from jtp.checkpoint.sharded import Checkpointer
from jtp.training.loggers import make_logger
from jtp.training.metrics import MetricsBuffer
from jtp.training.options import TrainerOptions
from jtp.training.progress import ProgressBar


class StepBatches(NamedTuple):
    """One optimizer step's loader batches and where they sit in the epochs."""

    epoch: int  # of the last batch
    index: int  # the last batch's index in its epoch
    total: int  # batches in that epoch (-1: the loader has no len)
    batches: list[Any]  # the k global batches
    epoch_ended: int | None  # the epoch whose last batch is among them, if any


class FitRun:
    """Use as a context manager: leaving it flushes metrics, closes the bar and waits for
    checkpoint writes, also when the loop raises (a non-finite loss, an agreed stop)."""

    def __init__(
        self,
        options: TrainerOptions,
        ckpt: Checkpointer | None,
        *,
        log_dir: str | None,
        val_loader: Any = None,
        show_progress: bool = True,
    ):
        """``log_dir``: where this process logs (``None``: it does not); ``val_loader``: the
        one validation loader of the fit (made before the first step, so a bad one fails
        early); ``show_progress``: draw the bar (process 0 only)."""
        self.ckpt, self.val_loader = ckpt, val_loader
        config = dataclasses.asdict(options)
        self.logger = make_logger(log_dir, options.logger, config) if log_dir else None
        self.metrics = MetricsBuffer(self.logger, options.checkpoint_dir)
        self.bar = ProgressBar(options.enable_progress_bar and show_progress)
        self.compiled: jax.stages.Compiled | None = None
        self._t_start = self._t_compiled = time.perf_counter()
        self._epoch = None

    def __enter__(self) -> FitRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        code = _exit_code(*exc)
        try:
            if exc[0] is None or issubclass(exc[0], SystemExit):
                self.metrics.flush()
        except BaseException:  # the last rows' non-finite loss: the fit fails after all
            code = 1
            raise
        finally:
            self.bar.close()
            try:
                if self.logger is not None:
                    self.logger.close(code)
            finally:  # checkpoint writes are waited for even if the logger fails to close
                if self.ckpt is not None:
                    self.ckpt.close()
        self._t_end = time.perf_counter()

    def train_step(self, arrays: tuple[Any, Any, Any], s: StepBatches, step: int) -> tuple:
        """Run the compiled step on the state ``arrays`` (params, opt_state, rest; donated)
        and the batches of ``s``; keep its metrics on the device as those of optimizer
        ``step``; return the new arrays."""
        batches, epoch, index = s.batches, s.epoch, s.index
        if self._t_compiled == self._t_start:
            self._t_compiled = time.perf_counter()
        if epoch != self._epoch:
            self.bar.start_epoch()
            self._epoch = epoch
        try:
            *new_state, metrics = self.compiled(*arrays, batches)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"batch {index} of epoch {epoch} does not match the compiled train step "
                f"(shapes/shardings must stay fixed; use drop_last=True): {err}"
            ) from err
        self.metrics.add(step, epoch, metrics)
        return tuple(new_state)

    def validated(self, step: int, epoch: int, means: dict[str, float]) -> None:
        """Validation ``means`` on the parameters after ``step`` join that step's row."""
        self.metrics.attach(step, epoch, means)

    def log(self, epoch: int, done: int, total: int, batches: list[Any]) -> None:
        """Fetch the pending metrics (raises on a non-finite loss) and refresh the bar."""
        latest = self.metrics.flush()
        rows = sum(int(jax.tree.leaves(b)[0].shape[0]) for b in batches)
        tokens = sum(_tokens(b) for b in batches)
        self.bar.update(epoch, done, total if total > 0 else None, latest, rows, tokens)

    def stop(self, exit_code: int) -> None:
        """Leave ``fit`` after an agreed stop (the step is saved): exit with ``exit_code``."""
        raise SystemExit(exit_code)

    def step_times(self) -> list[float]:
        """Seconds from the start of this fit (before the compile) to when each step's
        metrics reached the host, one per step; consecutive steps' differ by a step's time
        when every step is logged (``log_every_n_steps=1``)."""
        return [t - self._t_start for t in self.metrics.fetched_at]

    def seconds(self) -> tuple[float, float | None]:
        """(whole fit incl. compile, steady state from the end of the compile)."""
        end = getattr(self, "_t_end", time.perf_counter())
        steady = end - self._t_compiled if self.compiled is not None else None
        return end - self._t_start, steady


def _exit_code(kind: type | None, error: BaseException | None, *_: Any) -> int:
    """The exit code a fit leaving with ``error`` gives its run: 0 when it ends normally, the
    code of an agreed stop (128 + signal), 1 when it raises."""
    if kind is None:
        return 0
    if issubclass(kind, SystemExit):
        return error.code if isinstance(error.code, int) else 1
    return 1


def _tokens(batch: Any) -> int:
    """Tokens the model is trained on in one batch of windows, ``(B, T + 1)`` integer ids
    (inputs ``[:-1]``, labels ``[1:]``, as jtp's token datasets yield): B * T. 0 for any
    other batch (no tokens/s on the bar)."""
    leaves = jax.tree.leaves(batch)
    if len(leaves) != 1 or leaves[0].ndim != 2 or not np.issubdtype(leaves[0].dtype, np.integer):
        return 0
    rows, width = leaves[0].shape
    return rows * (width - 1)
