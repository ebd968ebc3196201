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
``Llama.__call__`` on the unpadded sequence (``tests/models/test_decode.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jtp.models.llama import Llama
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


def _attend(q_bthe, k_bske, v_bske, mask_bts):
    # Grouped-query attention over the cache; XLA's kernel: the fused ones take no mask.
    mask_b1ts = mask_bts[:, None, :, :]  # (B, 1, T, S): one mask for every head
    return jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, mask=mask_b1ts)


def _block(block, x_btd, cos_btf, sin_btf, k_bske, v_bske, index, mask_bts):
    """One block over the new tokens; writes their keys and values at slot ``index``."""
    attn = block.attention
    q_bthe, k_new, v_new = attn.qkv(block.attention_norm(x_btd), cos_btf, sin_btf)
    at = (0, index, 0, 0)  # (B, S, K, E): the new tokens' slots
    k_bske = shard_activation(
        jax.lax.dynamic_update_slice(k_bske, k_new.astype(k_bske.dtype), at), "heads"
    )
    v_bske = shard_activation(
        jax.lax.dynamic_update_slice(v_bske, v_new.astype(v_bske.dtype), at), "heads"
    )
    out_bthe = _attend(q_bthe, k_bske.astype(q_bthe.dtype), v_bske.astype(q_bthe.dtype), mask_bts)
    h_btd = x_btd + attn.out(shard_activation(out_bthe, "heads"))
    return h_btd + block.feed_forward(block.ffn_norm(h_btd)), k_bske, v_bske


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
    cos_btf, sin_btf = rope_at(positions_bt, c.head_dim, c.rope_theta, c.rope_scaling)
    slots_t = index + jnp.arange(t)  # the new tokens' slots
    causal_ts = jnp.arange(s)[None, :] <= slots_t[:, None]  # (T, S)
    mask_bts = causal_ts[None] & valid_bs[:, None, :]  # (B, T, S)
    x_btd = model.tok_embeddings(tokens_bt)  # (B, T, D)
    args = (cos_btf, sin_btf)
    if n_layers(model.layers) is None:  # unrolled: one block after the other
        ks, vs = [], []
        for i, block in enumerate(model.layers):
            x_btd, k, v = _block(block, x_btd, *args, cache.k[i], cache.v[i], index, mask_bts)
            ks.append(k)
            vs.append(v)
        new = KVCache(jnp.stack(ks), jnp.stack(vs))
    else:  # stacked: scan over the layers, each with its slice of the cache

        def body(block, x, kv):
            x, k, v = _block(block, x, *args, *kv, index, mask_bts)
            return x, (k, v)

        x_btd, (k, v) = scan_blocks(model.layers, body, x_btd, (cache.k, cache.v))
        new = KVCache(k, v)
    h_btd = model.norm(x_btd)
    if model.output is None:  # tied: h @ table.T
        return model.tok_embeddings.attend(h_btd), new
    return model.output(h_btd), new
