"""Validation and test: row-weighted means of an eval step's outputs over a loader.

Each output of the step is taken to be a mean over the batch's rows (as a loss is), so the
mean over the data set weights every batch by its rows. With ``drop_last=False`` the last
batch is completed by wrapping around to the epoch's first rows; those repeats must not count
twice. The batch's mean over its r unique rows U is recovered exactly from two padded
batches of the compiled shape (:meth:`jtp.DataLoader.padded_batches`):
``sum(U) = B * mean(U + [u] * (B - r)) - (B - r) * mean([u] * B)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.training.module import TrainModule
from jtp.training.steps import make_eval_step


def _batch_sums(step: Callable, state: Any, loader: Any, index: int, batch: Any) -> tuple:
    """(sum over this batch's unique rows of each output, number of unique rows)."""
    size = int(jax.tree.leaves(batch)[0].shape[0])
    unique = loader.unique_rows(index) if hasattr(loader, "unique_rows") else size
    if unique == size:
        out = step(state.params, state.rest, batch)
        return jax.tree.map(lambda v: v * size, out), size
    padded, repeated = loader.padded_batches(getattr(loader, "epoch", 0), index)
    first = step(state.params, state.rest, padded)
    second = step(state.params, state.rest, repeated)
    repeats = size - unique
    return jax.tree.map(lambda a, b: size * a - repeats * b, first, second), unique


def evaluate(
    step: Callable,
    state: Any,
    loader: Iterable[Any],
    to_global: Callable[[Any], Any],
    *,
    limit: int | None = None,
    what: str = "the loader",
) -> dict[str, float]:
    """``{name: mean over rows}`` of ``step(params, rest, batch)`` over ``loader`` (at most
    ``limit`` batches). Device values are fetched once, at the end."""
    totals: dict[str, jax.Array] = {}
    rows = 0
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        sums, n = _batch_sums(step, state, loader, i, to_global(batch))
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
        rows += n
    if rows == 0:
        raise ValueError(f"{what} yielded no batches; give it at least one batch")
    return {k: float(v) / rows for k, v in jax.device_get(totals).items()}


class EvalSteps:
    """A module's eval hooks (``validation_step``, ``test_step``), each jitted once and
    reused by every validation of a fit (one compile per batch shape, not per call)."""

    def __init__(self, module: TrainModule, state: Any, mesh: Mesh, *, precision: str):
        self.module, self.state, self.mesh, self.precision = module, state, mesh, precision
        self._jitted: dict[str, Callable] = {}

    def means(
        self, hook: str, loader: Iterable[Any], to_global: Callable[[Any], Any], **kwargs: Any
    ) -> dict[str, float]:
        """:func:`evaluate` of ``hook`` over ``loader`` on the state's current parameters."""
        if hook not in self._jitted:
            step = make_eval_step(
                self.state.graphdef, getattr(self.module, hook), precision=self.precision
            )
            self._jitted[hook] = jax.jit(step, out_shardings=NamedSharding(self.mesh, P()))
        return evaluate(self._jitted[hook], self.state, loader, to_global, **kwargs)
