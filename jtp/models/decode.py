"""A Llama forward over new tokens that reads and extends a key/value cache: what
generation runs, prefill (the whole prompt) and decode (one token) alike.

The cache holds every layer's keys and values, ``(L, B, S, K, E)``: S slots per sequence,
written left to right. Each sequence has its own positions (``positions_bt``: prompts of
different lengths are left-padded to one length, and a pad slot is never attended to:
``valid_bs``), so RoPE and the mask follow the sequence, not the slot. Keys and values are
marked "heads" like the training forward's, so a plan lays the cache out as it lays out
attention (kv heads split over "tensor", batch over "data"); this module names no mesh.

The same weights, the same modules (:class:`jtp.models.llama.Attention`'s ``qkv`` and
``out``, the norms, the feed-forward), and for every position the same logits as
``Llama.__call__`` on the unpadded sequence (``tests/generation/test_generate.py``), sliding
windows, soft-caps, score scale and Gemma's norms included. A sliding layer's window is
counted in slots: a sequence's slots and positions advance together (padding only on the
left), so a slot distance is a position distance. The cache keeps every slot of every layer
(a sliding layer could keep a ring of W slots: not done).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jtp.models.attention import softcapped_attention
from jtp.models.layer_kinds import by_kind, layer_kinds
from jtp.models.llama import Llama, scale_embeddings
from jtp.models.rope import rope_at
from jtp.models.stack import scan_blocks
from jtp.parallel.activations import shard_activation
from jtp.parallel.stacked import n_layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, ``(L, B, S, K, E)`` each, in the compute dtype (K is
    ``config.cached_kv_heads``: each kv head's copies too when ``kv_replicas`` > 1)."""

    k: jax.Array
    v: jax.Array


def init_cache(model: Llama, batch: int, slots: int, dtype: Any = None) -> KVCache:
    """An empty cache of ``slots`` positions per sequence (zeros: unwritten slots are masked)."""
    c = model.config
    dtype = dtype or c.dtype or c.param_dtype
    shape = (c.n_layers, batch, slots, c.cached_kv_heads, c.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _attend(attn, q_bthe, k_bske, v_bske, mask_bts):
    # Grouped-query attention over the cache; XLA's kernel: the fused ones take no mask.
    if attn.softcap is not None:  # Gemma 2: no jax kernel caps the scores
        return softcapped_attention(
            q_bthe, k_bske, v_bske, softcap=attn.softcap, scale=attn.scale, is_causal=False,
            mask_bts=mask_bts,
        )  # fmt: skip
    mask_b1ts = mask_bts[:, None, :, :]  # (B, 1, T, S): one mask for every head
    return jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, mask=mask_b1ts, scale=attn.scale)


def _block(block, x_btd, ropes, sliding, k_bske, v_bske, index, masks):
    """One block over the new tokens; writes their keys and values at slot ``index``.
    ``ropes``, ``masks``: (every layer's or the full layers', the sliding layers' or None)."""
    attn = block.attention
    cos_btf, sin_btf = ropes[0] if ropes[1] is None else by_kind(sliding, ropes[1], ropes[0])
    mask_bts = masks[0] if masks[1] is None else by_kind(sliding, masks[1], masks[0])
    q_bthe, k_new, v_new = attn.qkv(block.attention_norm(x_btd), cos_btf, sin_btf)
    at = (0, index, 0, 0)  # (B, S, K, E): the new tokens' slots
    k_bske = shard_activation(
        jax.lax.dynamic_update_slice(k_bske, k_new.astype(k_bske.dtype), at), "heads"
    )
    v_bske = shard_activation(
        jax.lax.dynamic_update_slice(v_bske, v_new.astype(v_bske.dtype), at), "heads"
    )
    out_bthe = _attend(
        attn, q_bthe, k_bske.astype(q_bthe.dtype), v_bske.astype(q_bthe.dtype), mask_bts
    )
    h_btd = x_btd + block.after_attention(attn.out(shard_activation(out_bthe, "heads")))
    f_btd = block.after_ffn(block.feed_forward(block.ffn_norm(h_btd)))
    return h_btd + f_btd, k_bske, v_bske


def forward_cached(
    model: Llama,
    tokens_bt: jax.Array,
    positions_bt: jax.Array,
    cache: KVCache,
    index: jax.Array | int,
    valid_bs: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """Logits ``(B, T, V)`` of ``tokens_bt`` at ``positions_bt``, written into cache slots
    ``index .. index + T - 1``, attending to every earlier slot and themselves where
    ``valid_bs`` (``(B, S)`` bool) says the slot holds a token of that sequence."""
    c = model.config
    t = tokens_bt.shape[1]
    s = cache.k.shape[2]
    rope = rope_at(positions_bt, c.head_dim, c.rope_theta, c.rope_scaling)  # (B, T, E/2) x 2
    local_rope = (
        None if c.local_rope_theta is None
        else rope_at(positions_bt, c.head_dim, c.local_rope_theta)
    )  # fmt: skip
    slots_t = index + jnp.arange(t)  # the new tokens' slots
    causal_ts = jnp.arange(s)[None, :] <= slots_t[:, None]  # (T, S)
    mask_bts = causal_ts[None] & valid_bs[:, None, :]  # (B, T, S)
    window_bts = None  # a window of at least S slots masks nothing
    if c.sliding_window is not None and c.sliding_window < s:
        near_ts = slots_t[:, None] - jnp.arange(s)[None, :] < c.sliding_window  # (T, S)
        window_bts = mask_bts & near_ts[None]
    ropes, masks = (rope, local_rope), (mask_bts, window_bts)
    x_btd = scale_embeddings(c, model.tok_embeddings(tokens_bt))  # (B, T, D)
    kinds, flags = layer_kinds(c)  # one kind for all layers, or each layer's
    if n_layers(model.layers) is None:  # unrolled: one block after the other
        ks, vs = [], []
        for i, block in enumerate(model.layers):
            sliding = kinds[0] if flags is None else bool(flags[i])
            x_btd, k, v = _block(block, x_btd, ropes, sliding, cache.k[i], cache.v[i], index, masks)
            ks.append(k)
            vs.append(v)
        new = KVCache(jnp.stack(ks), jnp.stack(vs))
    else:  # stacked: scan over the layers, each with its slice of the cache (and its kind)

        def body(block, x, per_layer):
            k, v, *own = per_layer
            x, k, v = _block(block, x, ropes, own[0] if own else kinds[0], k, v, index, masks)
            return x, (k, v)

        per_layer = (cache.k, cache.v) + (() if flags is None else (flags,))
        x_btd, (k, v) = scan_blocks(model.layers, body, x_btd, per_layer)
        new = KVCache(k, v)
    return model.head(model.norm(x_btd)), new
