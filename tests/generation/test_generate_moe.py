"""``jtp.generate`` with a mixture-of-experts model: prefill and decode through the KV cache
run the same block forward, the sparse layers' MoE feed-forward included (dropless: each
token is routed alone, so the padding of a prefill and the one-token decode steps change
no token's experts). Greedy tokens must equal the argmax of a full, cache-free forward
re-run each step (exact: the same tokens), scanned and unrolled, with dense and sparse
layers mixed, on one device and sharded.
"""

import dataclasses

import jax.numpy as jnp
import pytest
from flax import nnx

import jtp
from jtp.models.llama import Llama, LlamaConfig
from jtp.models.plans import llama as llama_plan

SMALL = LlamaConfig(
    vocab_size=128,
    dim=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    ffn_hidden=128,
    max_seq_len=64,
    n_experts=8,
    experts_per_token=2,
    moe_ffn_hidden=32,
)
CONFIGS = {
    # Qwen3-MoE's routing, every layer sparse, scanned
    "scanned": dataclasses.replace(SMALL, norm_topk_prob=True),
    # Mixtral's routing; sparse, dense, sparse, unrolled
    "unrolled-mixed": dataclasses.replace(
        SMALL, n_layers=3, moe_layers=(True, False), scan_layers=False, gating="mixtral"
    ),
    # Qwen2-MoE's shared expert, a dense layer first
    "unrolled-shared": dataclasses.replace(
        SMALL, moe_layers=(False, True), scan_layers=False, shared_expert_hidden=48
    ),
}
PROMPTS = [[5, 9, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [7]]


def naive_greedy(model, prompt, n):
    """Without a cache: the whole sequence through the model for each new token."""
    forward = nnx.jit(lambda m, tokens: m(tokens))
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(forward(model, jnp.asarray([seq], jnp.int32))[0, -1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize("name", CONFIGS)
def test_moe_greedy_generation_equals_the_full_forward(name):
    model = Llama(CONFIGS[name], rngs=nnx.Rngs(0))
    got = jtp.generate(model, PROMPTS, max_new_tokens=5)
    assert got == [naive_greedy(model, p, 5) for p in PROMPTS]


@pytest.mark.parametrize("name", ["unrolled-mixed"])
def test_sharded_moe_generates_as_one_device(name):
    """On 2 x 4 with the ready plan (fsdp): the tokens of the unsharded model."""
    config = CONFIGS[name]
    mesh = jtp.make_mesh(2, 4)
    plan = llama_plan(config)
    model = jtp.sharded_init(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, plan, fsdp=True)
    want = jtp.generate(Llama(config, rngs=nnx.Rngs(0)), PROMPTS, max_new_tokens=4)
    assert jtp.generate(model, PROMPTS, max_new_tokens=4) == want
