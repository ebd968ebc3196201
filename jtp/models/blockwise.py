"""Blockwise (flash-style) attention in pure JAX: O(T) memory, forward and backward.

XLA's attention materialises the (B, H, T, S) scores and saves them for the backward: at
T = 8192 that is 256 MiB per head and sequence in float32. Here the keys are visited in
blocks with an online softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022):
each query block keeps a running maximum, a running sum and an unnormalised output, so at any
time only one (block_q, block_k) tile of scores per head exists. A ``jax.custom_vjp`` saves
what FlashAttention-2 saves (q, k, v, the output and the per-row log-sum-exp, all O(T)) and
recomputes each tile's probabilities in the backward, so the backward never holds T^2 either.

The arithmetic is that of ``jax.nn.dot_product_attention``'s XLA path: scores and softmax in
float32 (bf16 x bf16 products accumulated in float32), probabilities cast to the values'
dtype for the second matmul. Tiles above the causal diagonal (or outside a local window) are
skipped with ``lax.cond``, which halves causal attention's work on backends that run one
branch (CPU, GPU). It is what cuDNN's fused kernel does in memory, written for any backend:
the capacity planner compiles it on CPU to size what a GPU runs with cuDNN. Gemma 2's score
soft-capping (``tanh(s / cap) * cap`` before the mask), which cuDNN's kernel lacks, is
applied to each tile, with its derivative ``1 - (capped / cap)^2`` in the backward.

Dimension letters: B batch, T queries, S keys, K kv heads, R = H / K queries per kv head,
E head dim, N query blocks, M key blocks, Q / C a query / key block's length.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BLOCK = 512  # tile length: (B, H, 512, 512) float32 scores are 1 MiB per head and sequence
_MASKED = float(jnp.finfo(jnp.float32).min)  # a finite -inf: exp(masked - max) is 0, not nan


def _window(local_window_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if isinstance(local_window_size, int):
        return (local_window_size, local_window_size)
    return None if local_window_size is None else tuple(local_window_size)


def blockwise_attention(
    q_bthe: jax.Array,
    k_bske: jax.Array,
    v_bske: jax.Array,
    *,
    is_causal: bool = True,
    local_window_size: int | tuple[int, int] | None = None,
    block_q: int = BLOCK,
    block_k: int = BLOCK,
    scale: float | None = None,
    softcap: float | None = None,
    q_positions: jax.Array | None = None,
    k_positions: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query attention of (B, T, H, E) queries over (B, S, K, E) keys and values
    (query head h uses kv head h // (H / K)) -> (B, T, H, E), with the masks of
    ``jax.nn.dot_product_attention`` (``is_causal``: key s <= query t; ``local_window_size``
    (left, right): t - left <= s <= t + right). Sequences are padded to whole blocks.
    ``scale`` multiplies the scores (None: ``E ** -0.5``); ``softcap``: the scaled scores
    become ``tanh(s / cap) * cap`` before the mask (None: not capped).

    ``q_positions`` (T,) and ``k_positions`` (S,) int: where each query and key sits in
    its sequence when that is not its index (context parallelism's balanced pieces,
    :mod:`jtp.parallel.context`): the masks compare positions, and a tile is skipped when no
    pair of it attends by position, so the work a device does is that of its positions.
    None: the indices (every row of the batch shares the positions).

    Example::

      out = blockwise_attention(q, k, v, block_q=128, block_k=128)
    """
    b, t, h, e = q_bthe.shape
    s, kv = k_bske.shape[1], k_bske.shape[2]
    if h % kv:
        raise ValueError(f"blockwise_attention: {h} query heads not divisible by {kv} kv heads")
    bq, bk = min(block_q, t), min(block_k, s)
    scale = 1.0 / math.sqrt(e) if scale is None else float(scale)
    static = (is_causal, _window(local_window_size), bq, bk, s, softcap, scale)
    q_nbqkre = _blocks(q_bthe.reshape(b, t, kv, h // kv, e), bq)  # (N, B, Q, K, R, E)
    k_mbcke, v_mbcke = _blocks(k_bske, bk), _blocks(v_bske, bk)  # (M, B, C, K, E)
    positions = None
    if q_positions is not None or k_positions is not None:
        q_pos = jnp.arange(t) if q_positions is None else q_positions
        k_pos = jnp.arange(s) if k_positions is None else k_positions
        # (T,) -> (N, Q) and (S,) -> (M, C): the blocks' positions
        positions = (_blocks(q_pos[None], bq)[:, 0], _blocks(k_pos[None], bk)[:, 0])
    out_nbqkre = _attend(static, q_nbqkre, k_mbcke, v_mbcke, positions)
    return _unblocks(out_nbqkre, t).reshape(b, t, h, e)


def _blocks(x, block):
    """(B, T, ...) -> (N, B, block, ...): T zero-padded to N whole blocks, blocks first."""
    t = x.shape[1]
    n = -(-t // block)
    x = jnp.pad(x, [(0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, block, *x.shape[2:]), 1, 0)


def _unblocks(x, t):
    """(N, B, block, ...) -> (B, T, ...), the padding dropped."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _tile_mask(static, i, j, q_pos_q=None, k_pos_c=None):
    """(Q, C) bool: which (query, key) pairs of query block i and key block j attend, and
    whether any does (a scalar: the tile can be skipped when not). ``q_pos_q``, ``k_pos_c``:
    the blocks' positions when they are not the indices."""
    is_causal, window, bq, bk, s, _, _ = static
    k_index = j * bk + jnp.arange(bk)[None, :]  # (1, C)
    mask = k_index < s  # padded keys never attend
    q_pos = i * bq + jnp.arange(bq)[:, None] if q_pos_q is None else q_pos_q[:, None]  # (Q, 1)
    k_pos = k_index if k_pos_c is None else k_pos_c[None, :]  # (1, C)
    if is_causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= (q_pos <= k_pos + window[0]) & (q_pos >= k_pos - window[1])
    return mask, jnp.any(mask)


def _scores(static, q_bqkre, k_bcke, mask_qc):
    """(B, K, R, Q, C) float32 scaled (and soft-capped) scores, masked entries at a finite
    minimum."""
    s_bkrqc = jnp.einsum(
        "bqkre,bcke->bkrqc", q_bqkre, k_bcke, preferred_element_type=jnp.float32
    ) * jnp.float32(static[-1])
    softcap = static[-2]
    if softcap is not None:
        s_bkrqc = jnp.tanh(s_bkrqc / softcap) * softcap
    return jnp.where(mask_qc, s_bkrqc, _MASKED)


def _forward(static, q_nbqkre, k_mbcke, v_mbcke, positions, out_dtype=None):
    """Output (N, B, Q, K, R, E) (in ``out_dtype``, None: the queries') and log-sum-exp
    (N, B, K, R, Q) float32, by query block."""
    n, m_blocks = q_nbqkre.shape[0], k_mbcke.shape[0]
    # One barrier over every input, the block indices included, so that each tile depends on
    # the queries. Differentiated inside an outer scan (scanned layers), JAX linearizes the
    # scan and then hoists out of it whatever depends only on its loop-invariant operands
    # (``_scan_known_hoisting`` in jax/_src/lax/control_flow/loops.py): the masks depend on
    # the indices alone (and on k, v, positions when those are loop-invariant), so each
    # tile's mask, broadcast to (B, K, R, Q, C), would be computed ahead for all N x M
    # tiles, O(T^2) memory. A barrier's outputs are unknown to that partial evaluation as
    # soon as one input is, so nothing inside is hoisted. It changes no value.
    block_ids = (jnp.arange(n), jnp.arange(m_blocks))
    q_nbqkre, k_mbcke, v_mbcke, positions, (i_n, j_m) = jax.lax.optimization_barrier(
        (q_nbqkre, k_mbcke, v_mbcke, positions, block_ids)
    )
    q_pos_nq, k_pos_mc = (None, None) if positions is None else positions

    def query_block(_, xs):
        i, q_bqkre, q_pos_q = xs
        b, bq, kv, r, e = q_bqkre.shape
        init = (
            jnp.full((b, kv, r, bq), _MASKED, jnp.float32),  # running max
            jnp.zeros((b, kv, r, bq), jnp.float32),  # running sum of exp
            jnp.zeros((b, kv, r, bq, e), jnp.float32),  # unnormalised output
        )

        def key_block(carry, ys):
            j, k_bcke, v_bcke, k_pos_c = ys
            mask_qc, any_ = _tile_mask(static, i, j, q_pos_q, k_pos_c)

            def update(carry):
                m, total, acc = carry
                s_bkrqc = _scores(static, q_bqkre, k_bcke, mask_qc)
                m_new = jnp.maximum(m, s_bkrqc.max(-1))
                p_bkrqc = jnp.where(mask_qc, jnp.exp(s_bkrqc - m_new[..., None]), 0.0)
                scale = jnp.exp(m - m_new)
                pv = jnp.einsum(
                    "bkrqc,bcke->bkrqe",
                    p_bkrqc.astype(v_bcke.dtype),
                    v_bcke,
                    preferred_element_type=jnp.float32,
                )
                return m_new, total * scale + p_bkrqc.sum(-1), acc * scale[..., None] + pv

            return jax.lax.cond(any_, update, lambda c: c, carry), None

        ys = (j_m, k_mbcke, v_mbcke, k_pos_mc)
        (m, total, acc), _ = jax.lax.scan(key_block, init, ys)
        total = jnp.where(total == 0.0, 1.0, total)  # a row with no key to attend: output 0
        out_bkrqe = (acc / total[..., None]).astype(out_dtype or q_bqkre.dtype)
        return None, (jnp.einsum("bkrqe->bqkre", out_bkrqe), m + jnp.log(total))

    _, (out, lse) = jax.lax.scan(query_block, None, (i_n, q_nbqkre, q_pos_nq))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(static, q_nbqkre, k_mbcke, v_mbcke, positions):
    return _forward(static, q_nbqkre, k_mbcke, v_mbcke, positions)[0]


def _attend_fwd(static, q_nbqkre, k_mbcke, v_mbcke, positions):
    out, lse = _forward(static, q_nbqkre, k_mbcke, v_mbcke, positions)
    return out, (q_nbqkre, k_mbcke, v_mbcke, positions, out, lse)  # O(T): no (T, S) tile


def _attend_bwd(static, residuals, dout_nbqkre):
    """The custom_vjp's backward: :func:`_grads`, each gradient in its operand's dtype."""
    q_nbqkre, k_mbcke = residuals[:2]
    dq, dk, dv = _grads(static, residuals, dout_nbqkre)
    dtype = k_mbcke.dtype
    return dq.astype(q_nbqkre.dtype), dk.astype(dtype), dv.astype(dtype), None  # positions: ints


def _grads(static, residuals, dout_nbqkre):
    """FlashAttention-2's backward: for each key block, visit the query blocks, recompute
    the tile's probabilities from the saved log-sum-exp, accumulate dK and dV for the key
    block and add each tile's dQ into a float32 (N, B, Q, K, R, E) accumulator. Returns
    dQ, dK, dV in float32. The log-sum-exp and output may be those of a longer key
    sequence than ``residuals``' keys (ring attention: :mod:`jtp.models.ring`): the
    gradients are then this key block's share."""
    q_nbqkre, k_mbcke, v_mbcke, positions, out_nbqkre, lse_nbkrq = residuals
    q_pos_nq, k_pos_mc = (None, None) if positions is None else positions
    scale, softcap = jnp.float32(static[-1]), static[-2]
    # D = rowsum(dO * O): the softmax backward's correction, (N, B, K, R, Q) float32.
    d_nbkrq = jnp.einsum(
        "nbqkre,nbqkre->nbkrq", dout_nbqkre.astype(jnp.float32), out_nbqkre.astype(jnp.float32)
    )
    n = q_nbqkre.shape[0]

    def key_block(dq_acc, xs):
        j, k_bcke, v_bcke, k_pos_c = xs

        def query_block(carry, ys):
            i, q_bqkre, do_bqkre, lse_bkrq, d_bkrq, q_pos_q = ys
            mask_qc, any_ = _tile_mask(static, i, j, q_pos_q, k_pos_c)

            def grads(carry):
                dk, dv = carry
                s_bkrqc = _scores(static, q_bqkre, k_bcke, mask_qc)
                p_bkrqc = jnp.where(mask_qc, jnp.exp(s_bkrqc - lse_bkrq[..., None]), 0.0)
                dv = dv + jnp.einsum(
                    "bkrqc,bqkre->bcke",
                    p_bkrqc.astype(do_bqkre.dtype),
                    do_bqkre,
                    preferred_element_type=jnp.float32,
                )
                dp_bkrqc = jnp.einsum(
                    "bqkre,bcke->bkrqc", do_bqkre, v_bcke, preferred_element_type=jnp.float32
                )
                ds_bkrqc = p_bkrqc * (dp_bkrqc - d_bkrq[..., None])  # d loss / d capped score
                if softcap is not None:  # d tanh(u / c) * c / du = 1 - tanh^2 = 1 - (capped / c)^2
                    # (masked entries hold a huge finite score whose square overflows: 0 there)
                    dcap_bkrqc = jnp.where(mask_qc, 1.0 - jnp.square(s_bkrqc / softcap), 0.0)
                    ds_bkrqc = ds_bkrqc * dcap_bkrqc
                ds_bkrqc = (ds_bkrqc * scale).astype(q_bqkre.dtype)
                dk = dk + jnp.einsum(
                    "bkrqc,bqkre->bcke", ds_bkrqc, q_bqkre, preferred_element_type=jnp.float32
                )
                dq = jnp.einsum(
                    "bkrqc,bcke->bqkre", ds_bkrqc, k_bcke, preferred_element_type=jnp.float32
                )
                return (dk, dv), dq

            def skip(carry):
                return carry, jnp.zeros(q_bqkre.shape, jnp.float32)

            return jax.lax.cond(any_, grads, skip, carry)

        zeros = jnp.zeros(k_bcke.shape, jnp.float32)
        ys = (jnp.arange(n), q_nbqkre, dout_nbqkre, lse_nbkrq, d_nbkrq, q_pos_nq)
        (dk, dv), dq_nbqkre = jax.lax.scan(query_block, (zeros, zeros), ys)
        return dq_acc + dq_nbqkre, (dk, dv)

    m_blocks = k_mbcke.shape[0]
    dq0 = jnp.zeros(q_nbqkre.shape, jnp.float32)
    xs = (jnp.arange(m_blocks), k_mbcke, v_mbcke, k_pos_mc)
    dq, (dk, dv) = jax.lax.scan(key_block, dq0, xs)
    return dq, dk, dv


_attend.defvjp(_attend_fwd, _attend_bwd)
