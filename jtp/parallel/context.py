"""Context parallelism: each sequence split into pieces over the "context" axis, attention
across the pieces, the causal work balanced.

Everything but attention is per token: with the sequence split over "context" (the
activation rules add it to every mark's sequence dimension,
:func:`jtp.parallel.activations.sequence_spec`), the norms, projections, feed-forwards, the
logits and the loss each run on a device's own tokens, and the weights' gradients are summed
over the axis like over "data". Attention needs every earlier key: :func:`attend_pieces`
gathers the keys and values of the whole sequence over "context" (one all-gather of K and V
per layer; the backward reduce-scatters their gradients) and attends the device's queries
against them (MaxText's default strategy). Keys are K kv heads (grouped-query), so the
gathered (B, T, K, E) is a fraction of the (B, T/C, D) activations; the queries, the scores
and everything else stay split.

**Balance.** A causal mask gives the last piece of a plainly split sequence all the work
(its queries see every key) and the first almost none. The batch is therefore laid out in
the *balanced order* (:func:`balanced_order`, the "zigzag" of ring-flash-attention and
torchtitan): the sequence is cut into 2C chunks and piece c holds chunks c and 2C - 1 - c,
one early and one late, so every device computes the same number of unmasked (query, key)
pairs (2C + 1 chunk pairs' worth, the diagonal ones half). The model learns where its tokens
sit from ``positions``: RoPE is taken at them and the masks compare them, so the order is a
property of the batch, not of the model (the same batch on one device gives the same
numbers). :func:`next_token_pieces` makes such a batch from a sequence of T + 1 tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jtp.errors import InputError
from jtp.mesh import CONTEXT, DATA
from jtp.parallel.activations import active_layout, batch_spec, sequence_spec

HEADS = "heads"  # the mark (and rule) of q, k, v: (B, T, heads, E)


def balanced_order(seq_len: int, pieces: int) -> np.ndarray:
    """(T,) int32: the position of each token of a sequence laid out for ``pieces``
    context pieces, piece c (the c-th T / C tokens) holding chunks c and 2C - 1 - c of the
    2C chunks of length T / 2C. ``pieces`` 1: ``arange(T)``."""
    if pieces == 1:
        return np.arange(seq_len, dtype=np.int32)
    chunks = 2 * pieces
    if seq_len % chunks:
        raise InputError(
            f"context parallelism over {pieces} devices cuts each sequence into {chunks} "
            f"chunks (two per device, balanced); sequence length {seq_len} is not divisible "
            f"by {chunks}: pick a --seq-len that is"
        )
    chunk = seq_len // chunks
    order = [c for piece in range(pieces) for c in (piece, chunks - 1 - piece)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in order]).astype(np.int32)


def next_token_pieces(tokens_t: np.ndarray, pieces: int) -> dict[str, np.ndarray]:
    """One next-token sample (T + 1 token ids) as ``{"inputs", "labels", "positions"}``,
    each (T,) in :func:`balanced_order`: the input at position p, the token after it and p.
    The loss (a mean over tokens) does not depend on the order."""
    tokens_t = np.asarray(tokens_t)
    order = balanced_order(tokens_t.shape[-1] - 1, pieces)
    return {
        "inputs": tokens_t[..., :-1][..., order],
        "labels": tokens_t[..., 1:][..., order],
        "positions": order,
    }


class NextTokenPieces:
    """A map-style dataset of (T + 1,) token samples, each as :func:`next_token_pieces`
    for ``pieces`` context pieces (what the Llama task trains on a mesh with a context
    axis)."""

    def __init__(self, dataset: Any, pieces: int):
        self.dataset, self.pieces = dataset, pieces

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return next_token_pieces(self.dataset[index], self.pieces)


def context_active() -> bool:
    """Whether activation rules of a mesh with a context axis are active (while tracing)."""
    layout = active_layout()
    return layout is not None and CONTEXT in layout[0].shape


STRATEGIES = ("all-gather", "ring")


def attend_pieces(
    attend: Callable[..., jax.Array],
    q_bthe: jax.Array,
    k_bske: jax.Array,
    v_bske: jax.Array,
    positions_bt: jax.Array | None,
    *,
    strategy: str = "all-gather",
    ring: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """``attend(q, k, v, q_pos_t, k_pos_s) -> (B, T, H, E)``, by position, across the
    context pieces when a mesh with a context axis is active.

    There: one ``shard_map`` over the mesh, q, k and v laid out as the "heads" rule says
    (batch over the batch axes, pieces over "context", heads over "tensor"). ``strategy``
    "all-gather": each device all-gathers the keys, values and positions of its context
    group ((B, T, K, E): the whole sequence, in the batch's order) and attends its own
    queries to them with ``attend``. "ring": ``ring(q, k, v, q_pos_t, k_pos_s, axis_name=,
    axis_size=)`` (:func:`jtp.models.ring.ring_attention`) passes the blocks around the
    context group instead. Elsewhere: ``attend`` on the whole sequence. ``positions_bt``:
    (B, T) int, every row alike (the batch's order); None: the sequence is in order (a
    plain split, unbalanced)."""
    if strategy not in STRATEGIES:
        raise InputError(f"context attention {strategy!r} must be one of {STRATEGIES}")
    b, t = q_bthe.shape[:2]
    if positions_bt is None:
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    layout = active_layout()
    if layout is None or CONTEXT not in layout[0].shape:
        positions_t = positions_bt[0]
        return attend(q_bthe, k_bske, v_bske, positions_t, positions_t)
    mesh, rules, data_mapped = layout
    heads = rules.get(HEADS, P(DATA, None, None, None))
    spec = sequence_spec(batch_spec(heads, mesh, data_mapped=data_mapped), mesh)
    pieces = int(mesh.shape[CONTEXT])
    _check_pieces(t, pieces, "the context axis's ")
    pos_spec = P(spec[0], spec[1])

    def body(q_bthe, k_bske, v_bske, pos_bt):
        q_pos_t = pos_bt[0]  # (T/C,): rows share the order
        if strategy == "ring":
            return ring(
                q_bthe, k_bske, v_bske, q_pos_t, q_pos_t, axis_name=CONTEXT, axis_size=pieces
            )
        # (B, T/C, K, E) -> (B, T, K, E): the context group's pieces, in mesh order
        k_all = jax.lax.all_gather(k_bske, CONTEXT, axis=1, tiled=True)
        v_all = jax.lax.all_gather(v_bske, CONTEXT, axis=1, tiled=True)
        k_pos_s = jax.lax.all_gather(q_pos_t, CONTEXT, axis=0, tiled=True)  # (T,)
        return attend(q_bthe, k_all, v_all, q_pos_t, k_pos_s)

    # check_vma off: the blockwise kernel's lax.cond skips a tile by returning its carry,
    # whose varying axes the type check cannot match with the computed branch's.
    return jax.shard_map(
        body, mesh=mesh, in_specs=(spec, spec, spec, pos_spec), out_specs=spec, check_vma=False
    )(q_bthe, k_bske, v_bske, positions_bt)


def _check_pieces(seq_len: int, pieces: int, what: str = "") -> None:
    """The one rule of a sequence cut in pieces: T divides into C of them."""
    if seq_len % pieces:
        raise InputError(f"sequence length {seq_len} is not divisible by {what}{pieces} pieces")


# Per-device attention work (what the balanced order balances), for tests and benchmarks.

ORDERS = ("balanced", "plain")  # the sequence in balanced_order, or split as it comes
TILE = 512  # the blockwise kernel's tile (jtp.models.blockwise.BLOCK; a test checks they agree)


def piece_positions(seq_len: int, pieces: int, order: str = "balanced") -> np.ndarray:
    """(C, T / C) int32: the positions each device of a context group holds, device c the
    c-th row; ``order`` "balanced" (:func:`balanced_order`) or "plain" (``arange(T)`` cut in
    C consecutive pieces: what an unbalanced split gives)."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r} must be one of {ORDERS}")
    _check_pieces(seq_len, pieces)
    if order == "plain":
        return np.arange(seq_len, dtype=np.int32).reshape(pieces, -1)
    return balanced_order(seq_len, pieces).reshape(pieces, -1)


def attention_tiles(
    seq_len: int,
    pieces: int,
    *,
    block: int = TILE,
    order: str = "balanced",
    window: int | None = None,
) -> np.ndarray:
    """(C,) int: how many (query block, key block) tiles the blockwise kernel computes on
    each device of a context group, causal attention of one sequence of ``seq_len`` tokens.

    The rule of :func:`jtp.models.blockwise.blockwise_attention` (its ``_tile_mask``, which
    ``lax.cond`` skips on): device c attends its T / C queries (positions
    :func:`piece_positions` row c) to the T gathered keys (every piece, in mesh order), in
    blocks of ``min(block, T / C)`` queries and ``min(block, T)`` keys, padded blocks holding
    position 0 (padded keys never attend); a tile is computed when some query at q and key
    at k of it attend: ``k <= q`` and, with a sliding ``window`` W, ``q - W < k``. The
    backward visits the same tiles."""
    q_tn = piece_positions(seq_len, pieces, order)  # (C, T/C)
    k_s = q_tn.reshape(-1)  # (T,): the gathered keys, pieces in mesh order
    bq, bk = min(block, q_tn.shape[1]), min(block, seq_len)
    n, m = -(-q_tn.shape[1] // bq), -(-seq_len // bk)
    q_cnq = np.pad(q_tn, [(0, 0), (0, n * bq - q_tn.shape[1])]).reshape(pieces, n, bq)
    left = seq_len if window is None else window - 1  # keys q - left <= k <= q attend
    tiles = np.zeros(pieces, dtype=np.int64)
    for j in range(m):
        keys = np.sort(k_s[j * bk : (j + 1) * bk])  # the valid keys of block j
        # for each query, whether some key of the block lies in [q - left, q]
        attends = np.searchsorted(keys, q_cnq, side="right") > np.searchsorted(
            keys, q_cnq - left, side="left"
        )
        tiles += attends.any(axis=-1).sum(axis=-1)  # (C,): query blocks that compute tile j
    return tiles


def attention_work(
    seq_len: int,
    pieces: int,
    *,
    block: int = TILE,
    order: str = "balanced",
    window: int | None = None,
    heads: int = 1,
    head_dim: int = 1,
) -> np.ndarray:
    """(C,) float: forward attention FLOPs each device of a context group computes for one
    sequence with the blockwise kernel: :func:`attention_tiles` times a tile's
    ``4 * block_q * block_k * heads * head_dim`` (the scores and the weighted values; the
    backward's five tile matmuls follow the same tiles). ``max / min`` over the devices is
    the imbalance the balanced order removes: with ``order="plain"`` the last device
    computes every tile below the diagonal, the first almost none."""
    bq, bk = min(block, seq_len // pieces), min(block, seq_len)
    tiles = attention_tiles(seq_len, pieces, block=block, order=order, window=window)
    return tiles * 4.0 * bq * bk * heads * head_dim
