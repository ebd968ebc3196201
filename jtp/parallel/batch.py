"""Global batches: rows split on "data" (and "expert"), replicated across each tensor-parallel
group."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.mesh import batch_axes, batch_axes_text, batch_ranks


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """``P("data", None, ...)``: rows on the data axis (``P(("data", "expert"), ...)`` on a
    mesh with an expert axis), everything else whole."""
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def shard_batch(x: Any, mesh: Mesh) -> Any:
    """Place a host array (or pytree of arrays) as global arrays sharded ``P("data", ...)``.

    ``x`` is the *global* batch, the same in every process; each process transfers only the
    rows its own devices hold (``make_array_from_callback``), so this is also correct when a
    tensor group spans processes. Every device of one tensor group receives the same rows.
    """
    n_data = batch_ranks(mesh)

    def place(leaf: Any) -> jax.Array:
        arr = np.asarray(leaf)
        if arr.ndim == 0:
            raise ValueError("shard_batch: a batch leaf is a scalar; it needs a leading batch dim")
        if arr.shape[0] % n_data:
            raise ValueError(
                f"shard_batch: batch dimension {arr.shape[0]} (shape {arr.shape}) is not "
                f"divisible by {batch_axes_text(mesh)} of size {n_data}"
            )
        sharding = batch_sharding(mesh, arr.ndim)
        return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

    return jax.tree.map(place, x)
