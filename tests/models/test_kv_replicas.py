"""KV heads replicated when the tensor axis is wider than the kv heads (``kv_replicas``).

A Llama with 2 kv heads (16 query heads) on tensor 8 (each kv head computed 4 times) and on
2x4 with fsdp (twice): the same loss, logits, gradients and AdamW step as the unsharded
model with ``kv_replicas=1``, to the tolerances of ``test_llama.py`` (its docstring and
docs/testing.md: fp32 sums in another order, 1e-5 norm-relative). Read off the program:
each device computes one kv head (its k/v projections are E columns wide), ``wk`` / ``wv``
are whole on every tensor rank, the forward still has one all-reduce per attention and
one per MLP, and the KV cache holds one kv head per device. The logits of an HF checkpoint
with 2 kv heads equal transformers' on 1x8 and 2x4 in ``test_hf.py`` (fixture
``llama_kv2``), and greedy generation equals transformers' tokens in
``tests/generation/test_generate.py``.
"""

import collections
import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import adamw, assert_adamw_step_matches, make_fns, rel_err
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jtp
from jtp.capacity import layouts
from jtp.capacity.measure import analytic_floor
from jtp.models.cache import init_cache
from jtp.models.llama import Llama, LlamaConfig, cross_entropy

CFG = LlamaConfig(
    vocab_size=128, dim=64, n_layers=2, n_heads=16, n_kv_heads=2, ffn_hidden=128, max_seq_len=32
)
B, T = 4, 16
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T + 1), dtype=np.int32)


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:]), logits


def step_on(mesh, config, fsdp=False):
    """One AdamW step of ``config`` on ``mesh`` (None: one device), and its compiled program."""
    plan = jtp.plans.llama(config)
    factory = lambda: Llama(config, rngs=nnx.Rngs(0))  # noqa: E731
    model = factory() if mesh is None else jtp.sharded_init(factory, mesh, plan, fsdp=fsdp)
    graphdef, params = nnx.split(model, nnx.Param)
    adamw_step, _ = make_fns(graphdef, loss_fn)
    if mesh is None:
        return params, jax.jit(adamw_step)(params, adamw().init(params), TOKENS), None
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    out_sh = (None, None, None, param_sh, jtp.opt_state_shardings(adamw(), params))
    with jtp.activation_rules(mesh, plan.activations):
        state = jtp.init_opt_state(adamw(), params)
        step = jax.jit(adamw_step, out_shardings=out_sh)
        tokens = jtp.shard_batch(TOKENS, mesh)
        compiled = step.lower(params, state, tokens).compile()
        return params, step(params, state, tokens), compiled


@pytest.mark.parametrize("shape,fsdp,replicas", [((1, 8), False, 4), ((2, 4), True, 2)])
def test_training_step_equals_the_unsharded_model(shape, fsdp, replicas):
    mesh = jtp.make_mesh(*shape)
    config = jtp.plans.replicate_kv(CFG, mesh)
    assert config.kv_replicas == replicas
    ref_params, (loss0, logits0, grads0, new0, opt0), _ = step_on(None, CFG)
    params, (loss, logits, grads, new, opt), compiled = step_on(mesh, config, fsdp)
    assert rel_err(params, ref_params) == 0.0  # the parameters do not depend on kv_replicas
    assert abs(float(loss) - float(loss0)) <= 1e-5 * float(loss0)
    assert rel_err(logits, logits0) < 1e-5
    # The copies' gradients summed back into the one wk / wv: the unsharded gradients.
    ref = dict(params=ref_params, grads=grads0, new=new0, adam=opt0[0])
    assert_adamw_step_matches(dict(params=params, grads=grads, new=new, adam=opt[0]), ref)

    attn = params["layers"]["attention"]
    kernel = attn["wk"]["kernel"].get_value()  # (L, D, K * E), whole K * E on each device
    assert kernel.sharding.shard_shape(kernel.shape)[2] == CFG.n_kv_heads * CFG.head_dim
    assert attn["wq"]["kernel"].get_value().sharding.spec[2] == "tensor"
    # Per device and layer, the forward's projections: q, k and v one head each (E columns:
    # each device computes only the kv head its queries use), wo and w2 full D, w1 and w3
    # ffn_hidden / tensor.
    t, e = shape[1], CFG.head_dim
    rows = B // shape[0] * T
    dots = collections.Counter(
        m.group(1)
        for line in compiled.as_text().splitlines()
        if "/while/body/" in line and "transpose(" not in line
        for m in [re.search(r"= f32\[([\d,]+)\]\{[^}]*\} dot\(", line)]
        if m
    )
    heads = CFG.n_heads // t  # query heads per device (2 or 4: never E columns wide)
    assert dots[f"{rows},{heads * e}"] == 1, dots  # wq
    assert dots[f"{rows},{e}"] == 2, dots  # wk, wv: one kv head, not all K
    assert dots[f"{rows},{CFG.ffn_hidden // t}"] == 2, dots  # w1, w3


def test_forward_one_all_reduce_per_pair_and_the_cache_holds_one_kv_head():
    mesh = jtp.make_mesh(1, 8)
    config = jtp.plans.replicate_kv(CFG, mesh)
    plan = jtp.plans.llama(config)
    graphdef, state = nnx.split(
        jtp.sharded_init(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, plan)
    )
    with jtp.activation_rules(mesh, plan.activations):
        compiled = (
            jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
            .lower(state, jtp.shard_batch(TOKENS[:, :-1], mesh))
            .compile()
        )
    colls = [c for c in jtp.collectives(compiled, mesh) for _ in range(c.trips)]
    in_layers = [c for c in colls if "while" in c.op_name]
    assert [c.kind for c in in_layers] == ["all-reduce"] * 2 * CFG.n_layers, in_layers
    assert not [c for c in colls if c.kind == "all-gather" and "layers" in c.op_name], colls

    # The cache as jtp.generate lays it out: the plan's "heads" split behind the layer axis.
    cache = init_cache(nnx.merge(graphdef, state), batch=2, slots=16)
    assert cache.k.shape == (CFG.n_layers, 2, 16, CFG.n_kv_heads * 4, CFG.head_dim)
    sharding = NamedSharding(mesh, P(None, *plan.activations["heads"]))
    assert sharding.shard_shape(cache.k.shape) == (CFG.n_layers, 2, 16, 1, CFG.head_dim)


def test_replicas_follow_the_mesh_and_bad_sizes_say_what_to_do():
    assert jtp.plans.replicate_kv(CFG, 1).kv_replicas == 1
    assert jtp.plans.replicate_kv(CFG, 2).kv_replicas == 1  # 2 kv heads split 2 ways
    assert jtp.plans.replicate_kv(CFG, 8).kv_replicas == 4
    back = jtp.plans.replicate_kv(jtp.plans.replicate_kv(CFG, 8), 2)  # from a checkpoint
    assert back == CFG
    assert "layers.*.attention.wk" in jtp.plans.llama(CFG)
    assert "layers.*.attention.wk" not in jtp.plans.llama(dataclasses.replace(CFG, kv_replicas=4))
    with pytest.raises(ValueError, match=r"set kv_replicas=4 \(jtp.plans.replicate_kv"):
        jtp.plans.check_llama(CFG, jtp.make_mesh(1, 8))
    three = LlamaConfig(dim=96, n_heads=24, n_kv_heads=3)  # 8 is no multiple of 3
    with pytest.raises(ValueError, match="a tensor size dividing 3 or a multiple of it"):
        jtp.plans.check_llama(three, jtp.make_mesh(1, 8))
    with pytest.raises(ValueError, match="kv_replicas 3 must be >= 1 and n_kv_heads"):
        dataclasses.replace(CFG, kv_replicas=3)  # 6 kv heads do not divide 16 query heads


def test_planner_offers_wider_tensor_and_counts_the_copies():
    sizes = {c.tensor for c in layouts(8, 8, 16, 2, 8, 16, ("none",))}
    assert sizes == {1, 2, 4, 8}  # 4 and 8: kv heads replicated
    # 3 kv heads: 2 and 4 neither divide them nor are multiples of them
    assert {c.tensor for c in layouts(12, 12, 12, 3, 12, 12, ("none",))} == {1, 3, 6, 12}

    def floor(t, fsdp=False):
        config = next(
            c for c in layouts(8, 8, 16, 2, 8, 16, ("none",)) if c.tensor == t and c.fsdp == fsdp
        )
        return analytic_floor(CFG, 8, config, "32-true")

    kv = CFG.n_layers * 2 * CFG.n_kv_heads * CFG.head_dim * CFG.dim  # wk + wv parameters
    rest = CFG.num_params() - kv
    assert floor(2) == 16 * (rest + kv) / 2  # kv heads split: nothing replicated
    assert floor(8) == 16 * (rest / 8 + kv)  # a whole wk / wv on each tensor rank
    assert floor(4, fsdp=True) == 16 * (rest / 8 + kv / 2)  # split on "data" only


def test_sequence_and_loss_parallel_with_replicated_kv_heads_give_transformers_logits():
    """The checkpoint with 2 kv heads on 1x8 (4 copies) with sequence and loss parallelism:
    transformers' float32 logits to test_hf.py's bounds (1e-4 of the largest logit, KL 1e-6;
    seen 1.4e-6 and 8e-13: float32 sums in another order)."""
    from test_hf import errors, load, logits_of, reference

    tokens, want = reference("llama_kv2")
    model, mesh = load("llama_kv2", (1, 8), sp=True, lp=True)
    assert model.config.kv_replicas == 4
    err, kl = errors(np.asarray(logits_of(model, mesh, tokens, sp=True, lp=True)), want)
    assert err <= 1e-4 and kl <= 1e-6
