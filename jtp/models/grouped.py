"""A grouped matmul (``jax.lax.ragged_dot``) that works under ``jax.vmap`` and its gradient.

jax 0.12's batching rule for ``ragged_dot`` takes only operands that are *all* batched on
dimension 0; a MoE layer under the trainer's per-data-rank ``vmap`` (gradient accumulation
reducing once, :func:`jtp.parallel.activations.per_data_rank`) has batched rows and
unbatched expert weights, and fails with "ragged_dot vmap over any dim but 0 - NYI".
:func:`grouped_dot` batches the unbatched operands itself (a broadcast, free for the
size-1 batch of a device's own rank) before handing all three to ``ragged_dot``'s rule, in
the forward and in its derivative (``custom_vmap`` has no reverse mode of its own, so the
derivative is a ``custom_vjp`` whose two halves are such batched calls). Outside ``vmap``
it is ``ragged_dot`` and ``ragged_dot``'s own derivative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap


def _batched(axis_size: int, in_batched: list, *args: jax.Array) -> list[jax.Array]:
    """Every operand batched on dimension 0 (an unbatched one broadcast)."""
    return [
        a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        for a, batched in zip(args, in_batched, strict=True)
    ]


def _dot(x_md: jax.Array, w_edf: jax.Array, sizes_e: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(x_md, w_edf, sizes_e)  # (M, D) x (E, D, F) -> (M, F)


def _dot_vjp(x_md, w_edf, sizes_e, g_mf):
    _, vjp = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes_e), x_md, w_edf)
    return vjp(g_mf)  # (d x (M, D), d w (E, D, F))


_forward, _backward = custom_vmap(_dot), custom_vmap(_dot_vjp)


@_forward.def_vmap
def _forward_vmap(axis_size, in_batched, x_md, w_edf, sizes_e):
    return jax.vmap(_dot)(*_batched(axis_size, in_batched, x_md, w_edf, sizes_e)), True


@_backward.def_vmap
def _backward_vmap(axis_size, in_batched, x_md, w_edf, sizes_e, g_mf):
    args = _batched(axis_size, in_batched, x_md, w_edf, sizes_e, g_mf)
    return jax.vmap(_dot_vjp)(*args), (True, True)


@jax.custom_vjp
def grouped_dot(x_md: jax.Array, w_edf: jax.Array, sizes_e: jax.Array) -> jax.Array:
    """``jax.lax.ragged_dot(x, w, sizes)``: rows of ``x`` (M, D) in groups of ``sizes`` (E,)
    times their group's ``w`` (E, D, F) -> (M, F); rows past ``sum(sizes)`` give 0."""
    return _forward(x_md, w_edf, sizes_e)


def _grouped_fwd(x_md, w_edf, sizes_e):
    return _forward(x_md, w_edf, sizes_e), (x_md, w_edf, sizes_e)


def _grouped_bwd(residuals, g_mf):
    x_md, w_edf, sizes_e = residuals
    d_x, d_w = _backward(x_md, w_edf, sizes_e, g_mf)
    return d_x, d_w, None


grouped_dot.defvjp(_grouped_fwd, _grouped_bwd)
