"""Global batches: rows split on "data" (and "expert"), the sequence on "context" where the
mesh has it, replicated across each tensor-parallel group."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.mesh import CONTEXT, batch_axes, batch_axes_text, batch_ranks, context_size


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """``P("data", None, ...)``: rows on the data axis (``P(("data", "expert"), ...)`` on a
    mesh with an expert axis), everything else whole; on a mesh with a context axis a
    leaf's second dimension (the sequence) is split over "context"."""
    rest = [None] * (ndim - 1)
    if CONTEXT in mesh.shape and ndim > 1:
        rest[0] = CONTEXT
    return NamedSharding(mesh, P(batch_axes(mesh), *rest))


def shard_batch(x: Any, mesh: Mesh) -> Any:
    """Place a host array (or pytree of arrays) as global arrays sharded ``P("data", ...)``.

    ``x`` is the *global* batch, the same in every process; each process transfers only the
    rows its own devices hold (``make_array_from_callback``), so this is also correct when a
    tensor group spans processes. Every device of one tensor group receives the same rows.
    On a mesh with a context axis each leaf's second dimension (the sequence) is split into
    that many pieces, one per device of a context group (same rows, its own piece); lay the
    sequence out in the balanced order first for causal models
    (:func:`jtp.parallel.context.next_token_pieces`).
    """
    n_data, pieces = batch_ranks(mesh), context_size(mesh)

    def place(leaf: Any) -> jax.Array:
        arr = np.asarray(leaf)
        if arr.ndim == 0:
            raise ValueError("shard_batch: a batch leaf is a scalar; it needs a leading batch dim")
        if arr.shape[0] % n_data:
            raise ValueError(
                f"shard_batch: batch dimension {arr.shape[0]} (shape {arr.shape}) is not "
                f"divisible by {batch_axes_text(mesh)} of size {n_data}"
            )
        if pieces > 1 and arr.ndim > 1 and arr.shape[1] % pieces:
            raise ValueError(
                f"shard_batch: sequence dimension {arr.shape[1]} (shape {arr.shape}) is not "
                f"divisible by mesh axis {CONTEXT!r} of size {pieces}"
            )
        sharding = batch_sharding(mesh, arr.ndim)
        return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

    return jax.tree.map(place, x)
