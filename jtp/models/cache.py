"""The key/value cache generation runs on: prefill (the whole prompt) and decode (one token)
alike go through the decoder's own forward (:class:`jtp.models.decoder.Decoder`), which takes
the cache as an argument and returns it extended; nothing here computes a block.

The cache holds every layer's keys and values, ``(L, B, S, K, E)``: S slots per sequence,
written left to right. Each sequence has its own positions (the forward's ``positions_bt``:
prompts of different lengths are left-padded to one length, and a pad slot is never
attended to: ``valid_bs``), so RoPE and the mask follow the sequence, not the slot. Keys and
values are marked "heads" like the training forward's, so a plan lays the cache out as it
lays out attention (kv heads split over "tensor", batch over "data"); this module names no
mesh.

For every position, the cached forward gives the logits of the cache-free forward on the
unpadded sequence (``tests/generation/test_generate.py``), sliding windows, soft-caps, score
scale and Gemma's norms included. A sliding layer's window is counted in slots: a
sequence's slots and positions advance together (padding only on the left), so a slot
distance is a position distance. The cache keeps every slot of every layer (a sliding layer
could keep a ring of W slots: not done).

The cache is not split over a "context" axis: under the activation rules of a mesh with one
(context parallelism, training's and evaluation's) a cached forward is refused
(``Decoder.__call__``), where it would otherwise gather every piece without saying so.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jtp.models.layer_kinds import by_kind
from jtp.parallel.activations import shard_activation


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values, ``(L, B, S, K, E)`` each (inside a block: one layer's, ``(B, S, K,
    E)``), in the compute dtype (K is ``config.cached_kv_heads``: each kv head's copies too
    when ``kv_replicas`` > 1)."""

    k: jax.Array
    v: jax.Array

    def write(self, k_new: jax.Array, v_new: jax.Array, index: jax.Array | int) -> KVCache:
        """One layer's cache with the new tokens' keys and values (B, T, K, E) in slots
        ``index .. index + T - 1`` (cast to the cache's dtype)."""
        at = (0, index, 0, 0)  # (B, S, K, E): the new tokens' slots
        k_bske = jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), at)
        v_bske = jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), at)
        return KVCache(shard_activation(k_bske, "heads"), shard_activation(v_bske, "heads"))


def init_cache(model: nnx.Module, batch: int, slots: int, dtype: Any = None) -> KVCache:
    """An empty cache of ``slots`` positions per sequence for ``model`` (a
    :class:`~jtp.models.decoder.Decoder`): zeros, since unwritten slots are masked; in the
    compute dtype, else the parameters'."""
    c = model.config
    dtype = dtype or c.dtype or c.param_dtype
    shape = (c.n_layers, batch, slots, c.cached_kv_heads, c.head_dim)  # (L, B, S, K, E)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """Where one call's T new tokens go in the cache and which slots each may attend to: the
    same for every layer (built once per call, :meth:`at`)."""

    index: jax.Array | int  # the first new token's slot
    attend_bts: jax.Array  # (B, T, S) bool: a valid slot at or before the token's own
    window_bts: jax.Array | None  # attend_bts within a sliding window; None: it masks nothing

    @classmethod
    def at(cls, index: jax.Array | int, t: int, valid_bs: jax.Array, window: int | None) -> Slots:
        """T new tokens written from slot ``index``; ``valid_bs`` (B, S) bool: which slots
        hold a token of each sequence, the new ones included; ``window``: a sliding layer's
        W (a query in slot i sees slots i - W < j <= i), None: no window."""
        s = valid_bs.shape[1]
        slots_t = index + jnp.arange(t)  # the new tokens' slots
        causal_ts = jnp.arange(s)[None, :] <= slots_t[:, None]  # (T, S)
        attend_bts = causal_ts[None] & valid_bs[:, None, :]  # (B, T, S)
        window_bts = None  # a window of at least S slots masks nothing
        if window is not None and window < s:
            near_ts = slots_t[:, None] - jnp.arange(s)[None, :] < window  # (T, S)
            window_bts = attend_bts & near_ts[None]
        return cls(index, attend_bts, window_bts)

    def mask(self, sliding: bool | jax.Array) -> jax.Array:
        """The (B, T, S) mask of a layer: windowed on a sliding one (``sliding`` as
        :func:`~jtp.models.layer_kinds.by_kind` takes it)."""
        if self.window_bts is None:
            return self.attend_bts
        return by_kind(sliding, self.window_bts, self.attend_bts)
