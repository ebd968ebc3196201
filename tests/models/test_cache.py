"""One forward with or without a key/value cache (jtp.models.cache): a prompt through an
empty cache gives the logits of ``model(tokens)``, scanned and unrolled, with sliding
windows of one kind or two, Gemma's local RoPE, soft-caps and norms; the cache holds the
prompt's keys and values in its first slots and nothing after them.

Tolerance: 1e-6 norm-relative. Both run the same blocks on the same values; only the
attention differs in form (a causal kernel against an explicit mask over S >= T slots,
the unwritten ones masked: their weights are exactly 0). Seen: equal bitwise, eager and
jitted. Left padding and a decode step are checked against the cache-free forward in
``tests/generation/test_generate.py``.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtp.models import Decoder, DecoderConfig, KVCache, init_cache

SMALL = DecoderConfig(
    vocab_size=128, dim=64, n_layers=3, n_heads=8, n_kv_heads=4, ffn_hidden=128, max_seq_len=64
)
GEMMA = dataclasses.replace(
    SMALL,
    sliding_window=4,  # shorter than the 12-token prompt: the window bites
    sliding_layers=(True, False),
    local_rope_theta=50.0,
    attn_softcap=4.0,
    final_softcap=8.0,
    query_pre_attn_scalar=12.0,
    norm_offset=True,
    sandwich_norms=True,
    embed_scale=True,
    activation="gelu_tanh",
    tie_embeddings=True,
)
CONFIGS = {
    "llama": SMALL,
    "llama-unrolled": dataclasses.replace(SMALL, scan_layers=False),
    "gemma": GEMMA,  # both kinds in one scan: the kind is traced
    "mistral-unrolled": dataclasses.replace(SMALL, sliding_window=4, scan_layers=False),
}
TOKENS = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 12), dtype=np.int32)


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_a_prompt_through_an_empty_cache_is_the_forward(config):
    model = Decoder(config, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, tokens: m(tokens))
    cached = nnx.jit(lambda m, tokens, cache: m(tokens, cache=cache))
    want = np.asarray(forward(model, TOKENS))
    got, cache = cached(model, TOKENS, init_cache(model, 2, 16))
    assert np.abs(np.asarray(got) - want).max() <= 1e-6 * np.abs(want).max()
    assert isinstance(cache, KVCache)
    assert cache.k.shape == cache.v.shape == (3, 2, 16, config.n_kv_heads, config.head_dim)
    assert np.all(np.abs(np.asarray(cache.k[:, :, :12])).max(axis=(-2, -1)) > 0)
    assert not np.any(np.asarray(cache.k[:, :, 12:])) and not np.any(np.asarray(cache.v[:, :, 12:]))


def test_cache_arguments_without_a_cache_are_an_error():
    model = Decoder(SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pass a cache"):
        model(jnp.asarray(TOKENS), valid_bs=jnp.ones((2, 12), bool))
