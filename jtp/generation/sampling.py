"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def sample(logits_bv: jax.Array, sampling: Any, key: jax.Array) -> jax.Array:
    """The next token of each row, ``(B,)`` int32. Greedy (argmax, the lowest id on a tie)
    when ``sampling.temperature`` is 0; else a draw from softmax(logits / temperature)
    restricted to the ``top_k`` largest and to the smallest set whose probability reaches
    ``top_p`` (the most probable token always stays)."""
    logits_bv = logits_bv.astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits_bv.shape[-1]:
        kth_b1 = jax.lax.top_k(logits_bv, sampling.top_k)[0][:, -1:]  # (B, 1)
        logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]  # descending
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # mass of the better tokens
        keep_bv = before_bv < sampling.top_p  # the first token always (0 < top_p)
        cutoff_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)
