"""Step metrics held on the device until the logging interval, then fetched in one transfer.

The loop never reads a device value per step (that would stall the host behind the
devices); it keeps the metric arrays of the last few steps and fetches them together.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from jtp.training.loggers import Logger


class MetricsBuffer:
    """Pending ``(step, epoch, {name: device scalar})`` rows; :meth:`flush` fetches them.

    Validation means (host floats, ``val_*``) are attached to the step they follow and join
    that step's row; they are also kept in ``validations`` (``{"step", "epoch", ...}``).
    """

    def __init__(self, logger: Logger | None, checkpoint_dir: str | None):
        self.logger, self.checkpoint_dir = logger, checkpoint_dir
        self.pending: list[tuple[int, int, dict[str, Any]]] = []
        self.losses: list[float] = []  # one per optimizer step, in order
        self.history: list[dict[str, float]] = []
        # perf_counter when each step's row reached the host: with a logging interval of
        # 1 the differences are step times (a row waits for its step to finish)
        self.fetched_at: list[float] = []
        self.validations: list[dict[str, float]] = []
        self._attached: dict[int, dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        self.pending.append((step, epoch, metrics))

    def attach(self, step: int, epoch: int, means: dict[str, float]) -> None:
        """Validation ``means`` measured after optimizer step ``step``."""
        self.validations.append({"step": step, "epoch": epoch, **means})
        self._attached[step] = means

    def flush(self) -> dict[str, float]:
        """Fetch, record and log the pending rows; the newest row's metrics.

        Raises ``FloatingPointError`` on a non-finite loss. The loss is the same replicated
        value in every process, so every process raises at the same step.
        """
        if not self.pending:
            return {}
        fetched = jax.device_get([m for _, _, m in self.pending])
        now = time.perf_counter()
        rows = []
        for (step, epoch, _), values in zip(self.pending, fetched, strict=True):
            row = {k: float(v) for k, v in values.items()}
            row.update(self._attached.pop(step, {}))
            self.losses.append(row["loss"])
            self.history.append(row)
            self.fetched_at.append(now)
            rows.append({"step": step, "epoch": epoch, **row})
        self.pending = []
        if self.logger is not None:
            self.logger.log(rows)
        bad = next((r for r in rows if not np.isfinite(r["loss"])), None)
        if bad is not None:
            keeps = f" ({self.checkpoint_dir} keeps the last good checkpoint)"
            raise FloatingPointError(
                f"non-finite loss {bad['loss']} at step {bad['step']} (epoch {bad['epoch']}); "
                f"training stopped{keeps if self.checkpoint_dir else ''}. Lower the learning "
                "rate, clip gradients (gradient_clip_val) or check the data"
            )
        return {k: v for k, v in rows[-1].items() if k not in ("step", "epoch")}
