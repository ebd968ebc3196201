"""Expert parallelism's token exchange: each (token, expert) pair travels to the device that
holds its expert and its output travels back, by two all-to-alls over the "expert" axis.

:func:`exchange` runs inside a ``jax.shard_map`` body where the expert axis is manual (the
MoE placement, :mod:`jtp.parallel.experts`, calls it). Device ``i`` along the axis holds
experts ``i * E/X .. (i+1) * E/X - 1`` (their weights never move: no weight is gathered) and
its own ``N`` tokens, routed to ``k`` experts each. With ``M = N * k`` pairs:

1. the pairs are sorted by global expert, which groups them by destination device;
2. the per-expert pair counts are all-gathered over the axis (``X * E`` int32: the only
   other thing that crosses it), so every device knows what it will receive and where;
3. all-to-all #1 sends each pair's row (its token's hidden vector, ``D`` values) to its
   expert's device; there the rows are put in local-expert order and run through the
   model's grouped SwiGLU (``grouped``, ``jax.lax.ragged_dot``); all-to-all #2 sends each
   output row back to where it came from; the rows are unsorted and the model's
   ``combine`` weights and sums each token's ``k`` outputs.

Three ways to size the exchange (bytes per device per all-to-all, ``b`` the dtype's size):

- ``ragged`` (GPU, TPU: ``jax.lax.ragged_all_to_all``): exactly the pairs move, ``M * D * b``
  sent (the share ``(X - 1) / X`` of it leaving the device on balanced routing). The receive
  buffer is the dropless worst case, ``X * M`` rows (every device sending all its pairs to
  one), allocated but not moved.
- padded (CPU, whose XLA has no ``ragged-all-to-all`` thunk): a plain ``jax.lax.all_to_all``
  of fixed buffers, one of ``M`` rows per destination so that nothing is ever dropped:
  ``X * M * D * b`` per all-to-all, ``X`` times the ragged bytes. Same values as ragged
  (a test compares them); it exists so that the CPU test suite runs the real exchange.
- ``capacity_factor``: GShard's fixed buffers, ``C = capacity(N, k, E, factor)`` pairs per
  expert from each device (:func:`jtp.models.moe.capacity` of this device's ``N``), a plain
  all-to-all of ``E * C * D * b`` (``~ factor * M * D * b``); pairs past ``C`` on their
  source device are dropped (their output is 0, the token keeps its other experts') and
  counted. The capacity is per source device: the result is the one-device model's with
  ``capacity_factor`` applied to each device's tokens on their own.

The backward pass is the same exchange reversed (the transpose of an all-to-all is an
all-to-all): two more all-to-alls of the same sizes carry the gradients of the rows.

Dimension letters as in :mod:`jtp.models.moe`: N tokens, K = k, M = N * k pairs, D width,
E experts (``n_experts``), L = E / X local experts, X the axis size, C capacity, R received
rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Grouped = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
Combine = Callable[[jax.Array, jax.Array], jax.Array]


def exchange(
    x_nd: jax.Array,
    weights_nk: jax.Array,
    experts_nk: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    w3: jax.Array,
    *,
    grouped: Grouped,
    combine: Combine,
    axis: str,
    n_experts: int,
    capacity_factor: float | None = None,
    ragged: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """This device's tokens through the experts of every device along ``axis``.

    Call inside ``jax.shard_map`` with ``axis`` manual.

    Args:
      x_nd: (N, D) this device's tokens.
      weights_nk: (N, K) float32 routing weights.
      experts_nk: (N, K) int32 global expert ids in ``[0, n_experts)``.
      w1, w3: (L, D, F') and w2: (L, F', D): this device's experts, ``L = n_experts / X``
        (``F'`` may be a tensor shard of F: the outputs are then partial sums, which the
        caller reduces).
      grouped: ``(x_md, group_sizes_l, w1, w2, w3) -> y_md``, rows sorted by local expert;
        rows past ``sum(group_sizes)`` must give 0 (``ragged_dot`` does).
      combine: ``(y_nkd, weights_nk) -> y_nd``, the model's weighting and sum over k.
      axis: the mesh axis the experts are split over.
      n_experts: E, all experts.
      capacity_factor: None: dropless; else at most ``capacity(N, K, E, factor)`` pairs of
        this device per expert, the rest dropped and counted.
      ragged: dropless only: ``jax.lax.ragged_all_to_all`` (True) or fixed worst-case
        buffers (False); None: ragged unless the default backend is the CPU.

    Returns:
      ``(y_nd, dropped)``: this device's tokens' outputs (N, D) and the pairs dropped over
      the whole axis (int32 scalar; 0 when dropless).

    Example (inside ``jax.shard_map(..., mesh=mesh)`` over a mesh with an "expert" axis)::

      y_nd, dropped = exchange(x_nd, w_nk, e_nk, w1, w2, w3, grouped=swiglu,
                               combine=moe._combine, axis="expert", n_experts=8)
    """
    n, d = x_nd.shape
    k = experts_nk.shape[1]
    x_size = jax.lax.axis_size(axis)
    local = w1.shape[0]
    if local * x_size != n_experts:
        raise ValueError(
            f"exchange: {local} local experts x axis {axis!r} of size {x_size} != "
            f"n_experts {n_experts}; each device must hold n_experts / {x_size} experts"
        )
    m = n * k
    expert_m = experts_nk.reshape(m)  # (M,) pair m = token m // k's choice m % k
    order_m = stable_argsort(expert_m)  # (M,) sorted position -> pair
    expert_sorted_m = expert_m[order_m]  # (M,) ascending: grouped by destination device
    x_sorted_md = x_nd[order_m // k]  # (M, D)
    counts_e = jnp.bincount(expert_m, length=n_experts).astype(jnp.int32)  # (E,)
    weights = (w1, w2, w3)
    if capacity_factor is not None:
        c = capacity(n, k, n_experts, capacity_factor)  # as the model's
        y_sorted_md, dropped = _with_capacity(
            x_sorted_md, expert_sorted_m, counts_e, weights, grouped, axis, c
        )
    else:
        if ragged is None:
            ragged = jax.default_backend() != "cpu"
        counts_xe = jax.lax.all_gather(counts_e, axis)  # (X, E) every source's pairs
        move = _ragged if ragged else _padded
        y_sorted_md = move(x_sorted_md, expert_sorted_m, counts_xe, weights, grouped, axis)
        dropped = jnp.zeros((), jnp.int32)
    inverse_m = jnp.zeros_like(order_m).at[order_m].set(jnp.arange(m))  # (M,)
    y_nkd = y_sorted_md[inverse_m].reshape(n, k, d)  # (M, D) -> (N, K, D)
    return combine(y_nkd, weights_nk), dropped


def capacity(n_tokens: int, k: int, n_experts: int, factor: float) -> int:
    """Pairs of one device each expert takes: :func:`jtp.models.moe.capacity`'s formula,
    ``ceil(factor * N * k / E)``, at least 1 (spelt again here: jtp.parallel sits below
    jtp.models; a test checks the two agree)."""
    return max(1, math.ceil(factor * n_tokens * k / n_experts))


def stable_argsort(key: jax.Array) -> jax.Array:
    """A stable argsort whose index operand is made from ``key`` (``jnp.argsort``'s iota is
    not): under the trainer's per-data-rank ``vmap`` of a placement's ``shard_map`` (jax
    0.12) sort refuses operands that vary over different manual axes. The exchange's and
    ``jtp.models.moe``'s sort of pairs by expert."""
    iota = jnp.arange(key.shape[0], dtype=jnp.int32) + key * 0  # (M,) varies as key
    return jax.lax.sort((key, iota), num_keys=1, is_stable=True)[1]


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _local_counts(counts_xe: jax.Array, axis: str) -> jax.Array:
    """(X sources, L): the pairs each source sends to each of this device's experts."""
    x_size = counts_xe.shape[0]
    counts_xxl = counts_xe.reshape(x_size, x_size, -1)  # (source, destination, L)
    me = jax.lax.axis_index(axis)
    return jax.lax.dynamic_index_in_dim(counts_xxl, me, axis=1, keepdims=False)  # (X, L)


def _through_local_experts(
    rows_rd: jax.Array,
    starts_s: jax.Array,
    counts_sl: jax.Array,
    weights: tuple[jax.Array, jax.Array, jax.Array],
    grouped: Grouped,
) -> jax.Array:
    """Received rows (R, D) through this device's experts, in place: (R, D).

    Source ``s``'s rows start at row ``starts_s[s]``, ``counts_sl[s, l]`` of them for local
    expert ``l`` in expert order; other rows are padding (their output is 0). The rows are
    put in local-expert order (padding last) for the grouped matmuls, then put back.
    """
    r = rows_rd.shape[0]
    n_local = counts_sl.shape[1]
    seg_len = counts_sl.reshape(-1)  # (S * L,) segments (source, expert), in row order
    seg_start = (starts_s[:, None] + _exclusive_cumsum(counts_sl, axis=1)).reshape(-1)
    rows_r = jnp.arange(r, dtype=jnp.int32) + seg_start[0] * 0  # varies as the counts do
    # The last segment starting at or before each row (empty segments share a start with
    # the next one): a count of segment starts, summed along the rows.
    starts_r = jnp.zeros((r + 1,), jnp.int32).at[seg_start].add(1)[:r]  # (R,)
    seg_r = jnp.clip(jnp.cumsum(starts_r) - 1, 0, seg_len.shape[0] - 1)  # (R,)
    valid_r = (rows_r >= seg_start[seg_r]) & (rows_r < seg_start[seg_r] + seg_len[seg_r])
    key_r = jnp.where(valid_r, seg_r % n_local, n_local)  # (R,) local expert; padding: L
    order_r = stable_argsort(key_r)  # (R,)
    group_sizes_l = jnp.sum(counts_sl, axis=0).astype(jnp.int32)  # (L,)
    y_rd = grouped(rows_rd[order_r], group_sizes_l, *weights)  # (R, D), padding rows 0
    inverse_r = jnp.zeros_like(order_r).at[order_r].set(jnp.arange(r))
    return y_rd[inverse_r]


def _padded(x_md, expert_m, counts_xe, weights, grouped, axis):
    """Dropless with fixed buffers: ``M`` rows per destination (the worst case), two plain
    all-to-alls of (X * M, D)."""
    m, d = x_md.shape
    x_size, n_experts = counts_xe.shape
    n_local = n_experts // x_size
    me = jax.lax.axis_index(axis)
    dest_counts_x = counts_xe[me].reshape(x_size, n_local).sum(-1)  # (X,) my pairs per device
    dest_m = expert_m // n_local  # (M,) ascending
    pos_m = jnp.arange(m) - _exclusive_cumsum(dest_counts_x)[dest_m]  # (M,) rank in its block
    send_xmd = jnp.zeros((x_size, m, d), x_md.dtype).at[dest_m, pos_m].set(x_md)
    recv_rd = jax.lax.all_to_all(  # (X * M, D): block s = source s's pairs for my experts
        send_xmd.reshape(x_size * m, d), axis, 0, 0, tiled=True
    )
    counts_sl = _local_counts(counts_xe, axis)  # (X, L)
    starts_s = jnp.arange(x_size) * m
    y_rd = _through_local_experts(recv_rd, starts_s, counts_sl, weights, grouped)
    back_xmd = jax.lax.all_to_all(y_rd, axis, 0, 0, tiled=True).reshape(x_size, m, d)
    return back_xmd[dest_m, pos_m]  # (M, D) in sorted order


def _ragged(x_md, expert_m, counts_xe, weights, grouped, axis):
    """Dropless, moving exactly the pairs: ``jax.lax.ragged_all_to_all`` there and back.
    Received rows are packed source after source into a worst-case (X * M, D) buffer."""
    del expert_m  # the sorted rows' destinations are read off the counts
    m, d = x_md.shape
    x_size, n_experts = counts_xe.shape
    me = jax.lax.axis_index(axis)
    pairs_xx = counts_xe.reshape(x_size, x_size, -1).sum(-1)  # (source, destination)
    sent_at_xx = _exclusive_cumsum(pairs_xx, axis=1)  # where a source's block for dst starts
    lands_at_xx = _exclusive_cumsum(pairs_xx, axis=0)  # where it lands in dst's buffer
    mine, to_me = pairs_xx[me], pairs_xx[:, me]  # (X,) I send to each; each sends to me
    recv_at = lands_at_xx[:, me]  # (X,) where each source's rows start in my buffer
    recv_rd = jax.lax.ragged_all_to_all(
        x_md,
        jnp.zeros((x_size * m, d), x_md.dtype),
        sent_at_xx[me],  # input_offsets
        mine,  # send_sizes
        lands_at_xx[me],  # output_offsets (on each destination)
        to_me,  # recv_sizes
        axis_name=axis,
    )
    counts_sl = _local_counts(counts_xe, axis)  # (X, L)
    y_rd = _through_local_experts(recv_rd, recv_at, counts_sl, weights, grouped)
    return jax.lax.ragged_all_to_all(
        y_rd,
        jnp.zeros((m, d), y_rd.dtype),
        recv_at,  # input_offsets: each source's block of outputs
        to_me,  # send_sizes
        sent_at_xx[:, me],  # output_offsets: where the source sent them from
        mine,  # recv_sizes
        axis_name=axis,
    )


def _with_capacity(x_md, expert_m, counts_e, weights, grouped, axis, c):
    """At most ``c`` pairs of this device per expert, in fixed (E, C, D) buffers: two plain
    all-to-alls of (E * C, D); returns ``(y (M, D), dropped over the axis)``."""
    m, d = x_md.shape
    n_experts = counts_e.shape[0]
    x_size = jax.lax.axis_size(axis)
    n_local = n_experts // x_size
    pos_m = jnp.arange(m) - _exclusive_cumsum(counts_e)[expert_m]  # (M,) rank in its expert
    send_ecd = jnp.zeros((n_experts, c, d), x_md.dtype)
    send_ecd = send_ecd.at[expert_m, pos_m].set(x_md, mode="drop")  # past C: dropped
    recv_rd = jax.lax.all_to_all(send_ecd.reshape(n_experts * c, d), axis, 0, 0, tiled=True)
    recv_lrd = recv_rd.reshape(x_size, n_local, c, d).swapaxes(0, 1)  # (L, X, C, D)
    sizes_l = jnp.full((n_local,), x_size * c, jnp.int32)  # empty slots are zero rows
    y_lrd = grouped(recv_lrd.reshape(-1, d), sizes_l, *weights).reshape(n_local, x_size, c, d)
    y_rd = y_lrd.swapaxes(0, 1).reshape(n_experts * c, d)  # (X, L, C, D) -> (E * C, D)
    back_ecd = jax.lax.all_to_all(y_rd, axis, 0, 0, tiled=True).reshape(n_experts, c, d)
    y_md = back_ecd.at[expert_m, pos_m].get(mode="fill", fill_value=0)  # dropped: 0
    dropped = jax.lax.psum(jnp.sum(pos_m >= c).astype(jnp.int32), axis)
    return y_md, dropped
