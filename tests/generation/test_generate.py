"""``jtp.generate``: transformers' greedy tokens on the committed fixtures on several meshes,
the cache's logits against the full forward, a model fresh from ``Trainer.fit``, one
compile per bucket, sampling, and errors before any compile.

Greedy parity with transformers: ``tests/fixtures/hf/*/generate.json`` holds transformers'
tokens (``scripts/make_generate_fixtures.py``, float32) and, per token, the gap between its
best and second-best logit. jtp's float32 logits differ from transformers' by at most
2.1e-6 of the largest (test_hf.py), far below the smallest gap (1.4e-2); a different token
where the gap is under TIE would be a tie that either library may break its own way, and
anywhere else a bug. (No fixture has such a tie: the test asserts equality everywhere it
is not one.)
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jtp
from jtp.generation.generate import Sampling, _compiled, bucket
from jtp.models.cache import init_cache
from jtp.models.llama import Llama, LlamaConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
TIE = 1e-4  # logit units: 50x the largest jtp/transformers difference seen
CASES = [(name, "1x8") for name in ["llama3", "llama_tied", "mistral", "qwen2", "qwen3", "phi3"]]
CASES += [(name, "2x4-fsdp") for name in ["llama3", "mistral", "qwen3"]]
CASES += [("llama3", "1x1"), ("qwen2", "4x2"), ("llama_kv2", "1x8"), ("llama_kv2", "2x4-fsdp")]
MESHES = {
    "1x1": ((1, 1), False),
    "1x8": ((1, 8), False),
    "2x4-fsdp": ((2, 4), True),
    "4x2": ((4, 2), False),
}
SMALL = LlamaConfig(
    vocab_size=128, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_hidden=128, max_seq_len=64
)
# Gemma-like: three layers, sliding (window 4, shorter than the 9-token sequences), global,
# sliding, each kind with its RoPE base; soft-caps, a score scalar, Gemma's norms, tied.
GEMMA_SMALL = dataclasses.replace(
    SMALL,
    n_layers=3,
    sliding_window=4,
    sliding_layers=(True, False),
    local_rope_theta=50.0,
    attn_softcap=4.0,
    final_softcap=8.0,
    query_pre_attn_scalar=12.0,
    norm_offset=True,
    sandwich_norms=True,
    embed_scale=True,
    activation="gelu_tanh",
    qk_norm=True,
    tie_embeddings=True,
)


def mesh_of(shape):
    return jtp.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])


def naive_greedy(model, prompt, n):
    """The reference without a cache: the whole sequence through ``Llama.__call__`` for
    each new token, argmax of the last position."""
    forward = nnx.jit(lambda m, tokens: m(tokens))
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(forward(model, jnp.asarray([seq], jnp.int32))[0, -1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize("name,mesh_case", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_greedy_equals_transformers(name, mesh_case):
    """All four prompts in one batch (left-padded, each with its own positions; on 4x2 the
    batch of 4 spans the data axis): transformers' tokens, eos included where it stops."""
    with open(os.path.join(FIXTURES, name, "generate.json")) as f:
        ref = json.load(f)
    shape, fsdp = MESHES[mesh_case]
    model = jtp.hf.load_pretrained(
        os.path.join(FIXTURES, name), mesh_of(shape), fsdp=fsdp, max_seq_len=32
    )
    got = jtp.generate(
        model,
        ref["prompts"],
        max_new_tokens=ref["max_new_tokens"],
        eos_token_id=ref["eos_token_id"],
    )
    for ours, theirs, gaps in zip(got, ref["new_tokens"], ref["top2_gaps"], strict=True):
        first = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None
        )
        if first is None:
            assert ours == theirs
        else:
            assert gaps[first] < TIE, f"token {first}: {ours} vs {theirs} (gap {gaps[first]})"


CACHED = {
    "llama": SMALL,
    "llama-unrolled": dataclasses.replace(SMALL, scan_layers=False),
    "gemma": GEMMA_SMALL,
    "gemma-unrolled": dataclasses.replace(GEMMA_SMALL, scan_layers=False),
    # Mixtral's routing in sparse, dense, sparse layers (test_generate_moe.py: the tokens)
    "moe-unrolled-mixed": dataclasses.replace(
        SMALL,
        n_layers=3,
        n_experts=8,
        experts_per_token=2,
        moe_ffn_hidden=32,
        moe_layers=(True, False),
        scan_layers=False,
        gating="mixtral",
    ),
}


@pytest.mark.parametrize("config", list(CACHED.values()), ids=list(CACHED))
def test_cache_logits_equal_the_full_forward(config):
    """Prefill of left-padded prompts, then one decode step, through the model's one
    forward with a cache (scanned: a scan over layers carrying each layer's slice; unrolled:
    one block after the other): every real position's logits equal ``model(tokens)`` on the
    unpadded sequence (float32; the same matmuls on other shapes: seen 1e-6 of the largest
    logit, bound 1e-5). Gemma-like: the window of the sliding layers (4 slots back from each
    query, counted past the left padding), their own RoPE base, the soft-caps and norms are
    the full forward's too; without the window the decoded logits move by O(1)."""
    model = Llama(config, rngs=nnx.Rngs(0))
    prompts = [[5, 9, 3], [1, 2, 3, 4, 5, 6, 7, 8]]
    t, slots = 8, 16
    tokens = np.zeros((2, t), np.int32)
    lengths = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        tokens[i, t - len(p) :] = p
    pad = t - lengths
    valid = (np.arange(slots)[None] >= pad[:, None]) & (np.arange(slots)[None] < t)
    positions = np.maximum(np.arange(t)[None] - pad[:, None], 0)

    @nnx.jit
    def cached(model, tokens, positions, cache, index, valid):
        return model(tokens, cache=cache, positions_bt=positions, cache_index=index, valid_bs=valid)

    forward = nnx.jit(lambda m, tokens: m(tokens))
    logits, cache = cached(
        model, tokens, positions, init_cache(model, 2, slots), 0, jnp.asarray(valid)
    )
    nxt = np.array([[11], [12]], np.int32)
    valid[:, t] = True
    step, _ = cached(model, nxt, lengths[:, None], cache, t, jnp.asarray(valid))
    for i, p in enumerate(prompts):
        want = np.asarray(forward(model, jnp.asarray([p + [int(nxt[i, 0])]], jnp.int32))[0])
        got = np.concatenate([np.asarray(logits[i, pad[i] :]), np.asarray(step[i])])
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    if config.sliding_window is not None:  # the window bites on the 9-token sequence
        wide = Llama(dataclasses.replace(config, sliding_window=None), rngs=nnx.Rngs(0))
        full = np.asarray(forward(wide, jnp.asarray([prompts[1] + [12]], jnp.int32))[0, -1])
        assert np.abs(np.asarray(step[1, 0]) - full).max() >= 0.05 * np.abs(full).max()


def test_a_model_fresh_from_fit_generates_as_its_forward_does():
    """A tiny Llama trained two steps on 2 x 4 with fsdp (the trainer's sharded model, as
    fit leaves it): greedy generation equals the cache-free reference."""
    from jtp.recipes import LlamaTask, LlamaTaskConfig

    task = LlamaTask(LlamaTaskConfig(seq_len=16, batch_size=8, samples=16, fsdp=True))
    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(2, 4, fsdp=True),
        max_steps=2,
        logger=None,
        enable_progress_bar=False,
    )
    trainer.fit(task)
    prompts = [[5, 9, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    got = jtp.generate(trainer.model, prompts, max_new_tokens=3)
    assert got == [naive_greedy(trainer.model, p, 3) for p in prompts]


def test_unrolled_layers_generate_as_their_forward_does():
    """The cached forward's unrolled path (``scan_layers=False``: one block after the other,
    the cache stacked from per-layer slices)."""
    model = Llama(dataclasses.replace(SMALL, scan_layers=False), rngs=nnx.Rngs(0))
    prompts = [[5, 9, 3], [7]]
    got = jtp.generate(model, prompts, max_new_tokens=4)
    assert got == [naive_greedy(model, p, 4) for p in prompts]


def test_one_compile_per_bucket():
    """Prompts of 3 and 6 tokens share the 8-token bucket, 5 and 7 new tokens the 16-slot
    cache, 3 and 4 prompts the 4-row batch: one program each for prefill and decode,
    compiled once. A 9-token prompt is the next bucket (16 tokens, 32 slots)."""
    model = Llama(SMALL, rngs=nnx.Rngs(0))
    _compiled.cache_clear()
    jtp.generate(model, [[1, 2, 3]] * 3, max_new_tokens=5)
    jtp.generate(model, [[1, 2, 3, 4, 5, 6], [7], [8], [9]], max_new_tokens=7)
    prefill, decode = _compiled(nnx.split(model)[0], None, Sampling(), 16, None)
    assert _compiled.cache_info().currsize == 1
    assert prefill._cache_size() == decode._cache_size() == 1
    jtp.generate(model, [list(range(1, 10))], max_new_tokens=5)
    assert _compiled.cache_info().currsize == 2
    assert bucket(3) == bucket(6) == 8 and bucket(9) == 16 and bucket(3, 3) == 9
    assert bucket(3, minimum=1) == 4 and bucket(1, 2, minimum=1) == 2


def test_sampling():
    """top_k=1 and a tiny top_p are greedy at any temperature; a seed repeats its draw;
    temperature 1 over a random model's spread-out logits differs between seeds."""
    model = Llama(SMALL, rngs=nnx.Rngs(0))
    prompts = [[5, 9, 3], [7]]
    greedy = jtp.generate(model, prompts, max_new_tokens=8)
    assert jtp.generate(model, prompts, max_new_tokens=8, temperature=0.7, top_k=1) == greedy
    assert jtp.generate(model, prompts, max_new_tokens=8, temperature=2.0, top_p=1e-6) == greedy
    a = jtp.generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=1)
    assert a == jtp.generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=1)
    assert a != jtp.generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=2)


def test_eos_stops_each_sequence():
    model = Llama(SMALL, rngs=nnx.Rngs(0))
    (greedy,) = jtp.generate(model, [[5, 9, 3]], max_new_tokens=8)
    eos = greedy[3]
    (stopped,) = jtp.generate(model, [[5, 9, 3]], max_new_tokens=8, eos_token_id=eos)
    assert stopped == greedy[: greedy.index(eos) + 1]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompts=[]), "at least one prompt"),
        (dict(prompts=[[1], []]), "at least one token"),
        (dict(prompts=[[1, 500]]), "token id 500 outside the vocabulary"),
        (dict(prompts=[[1] * 60]), "more than the model's max_seq_len 64"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(prompts=[1, 2, 3]), r"a list of token ids \(\[\[1, 2, 3\]\] for one prompt\)"),
        (dict(prompts="hello"), "a list of prompts"),
        (dict(prompts=[["a", "b"]]), "token ids are ints, got 'a'"),
        (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be an int"),
        (dict(temperature=float("nan")), "must be finite"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    model = Llama(SMALL, rngs=nnx.Rngs(0))
    args = dict(prompts=[[1, 2]], max_new_tokens=8) | kwargs
    with pytest.raises(jtp.InputError, match=message):  # a ValueError, named
        jtp.generate(model, args.pop("prompts"), **args)


def test_a_decode_step_costs_one_all_reduce_per_column_row_pair():
    """Read off the compiled decode loop on 1 x 8 (3 layers): inside the layer loop, two
    all-reduces of the (B * 1, D) activation over "tensor" per trip (attention's wq/wk/wv ->
    wo and the MLP's w1/w3 -> w2; the linears see one token axis,
    jtp.models.feedforward.per_token), as in training; per token outside it, the embedding
    lookup's all-reduce (its table is split on the vocabulary) and the argmax across the
    vocabulary shards (value and index, B x 8 each). No weight, logits or cache crosses."""
    import numpy as np

    from jtp.generation.generate import generate_timed

    config = LlamaConfig(
        vocab_size=128, dim=64, n_layers=3, n_heads=8, n_kv_heads=8, ffn_hidden=128, max_seq_len=64
    )
    mesh = jtp.make_mesh(1, 8)
    model = jtp.sharded_init(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, jtp.plans.llama(config))
    generate_timed(model, [[1, 2, 3]], max_new_tokens=4)
    graphdef, state = nnx.split(model)
    prefill, decode = _compiled(graphdef, mesh, Sampling(), 16, None)
    lengths = jtp.shard_batch(np.ones((1,), np.int32), mesh)
    carry = prefill(
        state, jtp.shard_batch(np.zeros((1, 8), np.int32), mesh), lengths, jax.random.key(0)
    )
    compiled = decode.lower(state, carry, lengths, jnp.int32(4)).compile()
    colls = jtp.collectives(compiled, mesh)
    assert all(c.axes == ("tensor",) for c in colls)
    in_layers = [c for c in colls if c.trips == 3]
    assert [(c.kind, c.shapes) for c in in_layers] == [("all-reduce", ((1, 64),))] * 2
    per_token = sorted((c.kind, c.shapes) for c in colls if c.trips == 1)
    assert per_token == [("all-gather", ((1, 8),))] * 2 + [("all-reduce", ((1, 1, 64),))]
