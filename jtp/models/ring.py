"""Ring attention: each device's queries meet every device's keys and values, passed around a
ring of devices one block at a time (Liu et al. 2023, "Ring Attention with Blockwise
Transformers"), forward and backward.

The per-device arithmetic of context parallelism's "ring" strategy
(:mod:`jtp.parallel.context`): inside a ``shard_map`` over the ring's mesh axis (its name is
an argument: this module names no axis), a device holds its piece of the queries, keys and
values. The forward visits the C key/value blocks of the ring in C steps: it attends its
queries to the block it holds (:mod:`jtp.models.blockwise`'s kernel, the masks by position),
merges the step's output into a running one by log-sum-exp, and passes the block on
(``ppermute`` to the next device). No device ever holds more than one other block, so the
keys cost O(T / C) memory, and the transfer of the next block can overlap the current
block's compute where the backend overlaps collectives (GPUs).

The backward (a ``jax.custom_vjp``) saves what FlashAttention-2 saves, the device's own q, k,
v, output and log-sum-exp, and rings again: at each step it computes the gradients of the
block it holds (with the global log-sum-exp, the block's probabilities are exact), adds dK and
dV into accumulators that travel with the block, and after C passes every block's gradients
are back on the device that owns it. The query gradient stays put.

Balance follows from the positions: with context parallelism's balanced order every device
computes the same number of unmasked tiles at every step (the blockwise kernel skips the
rest), so no device waits on another at a step's transfer.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jtp.models.blockwise import BLOCK, _blocks, _forward, _grads, _unblocks, _window

_MASKED = float(jnp.finfo(jnp.float32).min)


def ring_attention(
    q_bthe: jax.Array,
    k_bske: jax.Array,
    v_bske: jax.Array,
    q_pos_t: jax.Array,
    k_pos_s: jax.Array,
    *,
    axis_name: str,
    axis_size: int,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block_q: int = BLOCK,
    block_k: int = BLOCK,
) -> jax.Array:
    """Causal attention of this device's (B, T, H, E) queries at positions ``q_pos_t`` (T,)
    over the keys and values of every device of the ring ``axis_name`` (``axis_size``
    devices), this device's (B, S, K, E) at ``k_pos_s`` (S,) -> (B, T, H, E). A query sees
    the keys at positions ``q - window < k <= q`` (None: every earlier one). ``block_q``,
    ``block_k``: the blockwise kernel's tiles (a block as long as the piece: XLA's dense
    arithmetic, one tile per step). Call inside ``shard_map``."""
    b, t, h, e = q_bthe.shape
    s, kv = k_bske.shape[1], k_bske.shape[2]
    bq, bk = min(block_q, t), min(block_k, s)
    scale = 1.0 / math.sqrt(e) if scale is None else float(scale)
    left = None if window is None else window - 1
    local = None if left is None else (left, 0)
    static = (True, _window(local), bq, bk, s, softcap, scale)
    q_nbqkre = _blocks(q_bthe.reshape(b, t, kv, h // kv, e), bq)  # (N, B, Q, K, R, E)
    k_mbcke, v_mbcke = _blocks(k_bske, bk), _blocks(v_bske, bk)  # (M, B, C, K, E)
    # (T,) -> (N, Q) and (S,) -> (M, C): the blocks' positions
    q_pos_nq, k_pos_mc = _blocks(q_pos_t[None], bq)[:, 0], _blocks(k_pos_s[None], bk)[:, 0]
    ring = (axis_name, axis_size)
    out_nbqkre = _ring(static, ring, q_nbqkre, k_mbcke, v_mbcke, q_pos_nq, k_pos_mc)
    return _unblocks(out_nbqkre, t).reshape(b, t, h, e)


def _pass_on(ring, *xs):
    """Each of ``xs`` sent to the next device of the ring (device i's goes to i + 1)."""
    name, size = ring
    perm = [(i, (i + 1) % size) for i in range(size)]
    return tuple(jax.lax.ppermute(x, name, perm) for x in xs)


def _merge(out, lse, out_i, lse_i):
    """Two softmax-normalised partial outputs (N, B, Q, K, R, E) float32 with their
    log-sum-exps (N, B, K, R, Q) merged into that of the union of their keys."""
    lse_new = jnp.logaddexp(lse, lse_i)

    def weight(l_nbkrq):  # (N, B, K, R, Q) -> (N, B, Q, K, R, 1)
        return jnp.einsum("nbkrq->nbqkr", jnp.exp(l_nbkrq - lse_new))[..., None]

    return out * weight(lse) + out_i * weight(lse_i), lse_new


def _ring_forward(static, ring, q_nbqkre, k_mbcke, v_mbcke, q_pos_nq, k_pos_mc):
    """Output (float32) and log-sum-exp over the whole ring's keys."""
    n, b, bq, kv, r, e = q_nbqkre.shape
    out = jnp.zeros(q_nbqkre.shape, jnp.float32)
    lse = jnp.full((n, b, kv, r, bq), _MASKED, jnp.float32)

    def step(carry, last):
        k_mbcke, v_mbcke, k_pos_mc, out, lse = carry
        positions = (q_pos_nq, k_pos_mc)
        out_i, lse_i = _forward(static, q_nbqkre, k_mbcke, v_mbcke, positions, jnp.float32)
        out, lse = _merge(out, lse, out_i, lse_i)
        if not last:
            k_mbcke, v_mbcke, k_pos_mc = _pass_on(ring, k_mbcke, v_mbcke, k_pos_mc)
        return k_mbcke, v_mbcke, k_pos_mc, out, lse

    carry = (k_mbcke, v_mbcke, k_pos_mc, out, lse)
    if ring[1] > 1:  # C - 1 steps that pass the block on, then the last block's
        carry, _ = jax.lax.scan(lambda c, _: (step(c, False), None), carry, length=ring[1] - 1)
    return step(carry, True)[3:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(static, ring, q_nbqkre, k_mbcke, v_mbcke, q_pos_nq, k_pos_mc):
    out, _ = _ring_forward(static, ring, q_nbqkre, k_mbcke, v_mbcke, q_pos_nq, k_pos_mc)
    return out.astype(q_nbqkre.dtype)


def _ring_fwd(static, ring, q_nbqkre, k_mbcke, v_mbcke, q_pos_nq, k_pos_mc):
    out, lse = _ring_forward(static, ring, q_nbqkre, k_mbcke, v_mbcke, q_pos_nq, k_pos_mc)
    out = out.astype(q_nbqkre.dtype)
    return out, (q_nbqkre, k_mbcke, v_mbcke, q_pos_nq, k_pos_mc, out, lse)


def _ring_bwd(static, ring, residuals, dout_nbqkre):
    """C steps: the held block's dQ share stays, its dK and dV are added to accumulators
    travelling with it; after C passes each block and its gradients are home again."""
    q_nbqkre, k_mbcke, v_mbcke, q_pos_nq, k_pos_mc, out_nbqkre, lse = residuals

    def step(carry, last):
        k_mbcke, v_mbcke, k_pos_mc, dk, dv, dq = carry
        held = (q_nbqkre, k_mbcke, v_mbcke, (q_pos_nq, k_pos_mc), out_nbqkre, lse)
        dq_i, dk_i, dv_i = _grads(static, held, dout_nbqkre)
        dk, dv = dk + dk_i, dv + dv_i
        if last:  # the gradients go home; the block itself is not needed any more
            dk, dv = _pass_on(ring, dk, dv)
        else:
            k_mbcke, v_mbcke, k_pos_mc, dk, dv = _pass_on(ring, k_mbcke, v_mbcke, k_pos_mc, dk, dv)
        return k_mbcke, v_mbcke, k_pos_mc, dk, dv, dq + dq_i

    zeros = jnp.zeros(k_mbcke.shape, jnp.float32)
    carry = (k_mbcke, v_mbcke, k_pos_mc, zeros, zeros, jnp.zeros(q_nbqkre.shape, jnp.float32))
    if ring[1] > 1:
        carry, _ = jax.lax.scan(lambda c, _: (step(c, False), None), carry, length=ring[1] - 1)
    _, _, _, dk, dv, dq = step(carry, True)
    dtype = k_mbcke.dtype
    return dq.astype(q_nbqkre.dtype), dk.astype(dtype), dv.astype(dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
