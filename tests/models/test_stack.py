"""Scanned layers and remat policies (jtp.models.stack): the scanned Llama computes what the
unrolled one does from the same weights, traces one block whatever its depth, and each remat
policy gives the gradients of no remat while trading memory for recomputation as documented,
read off the compiled program.

Tolerances: 1e-6 norm-relative. Scanned and unrolled run the same ops in the same order on
the same values; only XLA's fusion of the two programs may differ (seen: logits and loss
equal, gradients within 3e-7). A remat policy recomputes the same ops (seen: equal bitwise).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err, unrolled_copy

import jtp
from jtp.analysis.dtypes import dots
from jtp.models.llama import Llama, LlamaConfig, cross_entropy
from jtp.models.stack import REMAT_POLICIES, remat_name
from jtp.parallel.names import path_str
from jtp.parallel.stacked import layer_names

CFG = LlamaConfig(n_layers=3)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 17), dtype=np.int32)


def loss_and_grads(model: Llama, tokens=TOKENS):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, {path_str(p): v.get_value() for p, v in nnx.to_flat_state(grads)}


def with_remat(model: Llama, remat: str) -> Llama:
    """The same weights under another remat policy (the policy is config, not state)."""
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    out.config = dataclasses.replace(model.config, remat=remat)
    return out


def test_scanned_equals_unrolled_with_the_same_weights():
    scanned = Llama(CFG, rngs=nnx.Rngs(0))
    assert scanned.layers.attention.wq.kernel.get_value().shape == (3, 128, 128)
    unrolled = unrolled_copy(scanned)
    assert unrolled.layers[2].attention.wq.kernel.get_value().shape == (128, 128)
    loss_s, logits_s, grads_s = loss_and_grads(scanned)
    loss_u, logits_u, grads_u = loss_and_grads(unrolled)
    assert abs(float(loss_s) - float(loss_u)) <= 1e-6 * float(loss_u)
    assert rel_err(logits_s, logits_u) <= 1e-6
    restacked = {  # the unrolled gradients, stacked like the scanned ones
        name: np.stack([grads_u[n] for n in per]) if per else grads_u[name]
        for name, g in grads_s.items()
        for per in [layer_names(name, g.shape[0], grads_u)]
    }
    names = sorted(grads_s)
    assert rel_err([restacked[n] for n in names], [grads_s[n] for n in names]) <= 1e-6


# Gemma-like: sliding layers (window 5 of 16 tokens, local RoPE base) and global ones in
# one scan, with soft-caps, a score scalar and Gemma's norms (narrower: compiles faster).
MIXED = dataclasses.replace(
    CFG,
    dim=64,
    n_heads=8,
    n_kv_heads=4,
    ffn_hidden=128,
    sliding_window=5,
    sliding_layers=(True, False),
    local_rope_theta=100.0,
    attn_softcap=5.0,
    final_softcap=10.0,
    query_pre_attn_scalar=32.0,
    norm_offset=True,
    sandwich_norms=True,
    embed_scale=True,
    activation="gelu_tanh",
)


def test_layers_of_two_kinds_in_one_scan():
    """One scanned block for sliding and global layers (the kind read per layer, the
    attention picked by jax.lax.cond, remat "dots" around it) computes the logits and
    gradients of the unrolled model, whose layers know their kind when traced (same 1e-6
    as above; seen equal); the program holds one scan and one cond (the two attentions)."""
    scanned = with_remat(Llama(MIXED, rngs=nnx.Rngs(0)), "dots")
    loss_s, logits_s, grads_s = loss_and_grads(scanned)
    loss_u, logits_u, grads_u = loss_and_grads(unrolled_copy(scanned))
    assert abs(float(loss_s) - float(loss_u)) <= 1e-6 * float(loss_u)
    assert rel_err(logits_s, logits_u) <= 1e-6
    names = sorted(grads_s)
    restacked = [
        np.stack([grads_u[n] for n in layer_names(name, 3, grads_u)])
        if layer_names(name, 3, grads_u)
        else grads_u[name]
        for name in names
    ]
    assert rel_err(restacked, [grads_s[n] for n in names]) <= 1e-6
    graphdef, state = nnx.split(scanned)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(TOKENS[:, :-1]))(state))
    assert jaxpr.count(" cond[") == 1 and jaxpr.count(" scan[") == 1


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_every_remat_policy_gives_the_gradients_of_none(scan):
    model = Llama(dataclasses.replace(CFG, scan_layers=scan), rngs=nnx.Rngs(0))
    loss0, _, grads0 = loss_and_grads(with_remat(model, "none"))
    names = sorted(grads0)
    for policy in REMAT_POLICIES[1:]:
        loss, _, grads = loss_and_grads(with_remat(model, policy))
        assert abs(float(loss) - float(loss0)) <= 1e-6 * float(loss0), policy
        assert rel_err([grads[n] for n in names], [grads0[n] for n in names]) <= 1e-6, policy


def _compiled_grad(config: LlamaConfig, batch: int = 8, seq: int = 128):
    """The compiled gradient of the loss, on shapes only (nothing allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)

    def grad(s, t):
        return jax.grad(lambda s: cross_entropy(nnx.merge(graphdef, s)(t[:, :-1]), t[:, 1:]))(s)

    return jax.jit(grad).lower(state, tokens).compile()


def test_remat_policies_trade_memory_for_recomputation():
    """From the compiled programs (B 8, T 128, D 128, 8 heads): what a policy keeps per
    layer (the growth of the peak from 2 to 24 layers, / 22) orders full < minimal < dots <
    none: the block's input (B T D floats, 0.5 MB), plus the attention output (1 MB), plus
    the projections' outputs, plus everything (scores included). At 24 layers the peak
    orders the same way; the FLOPs the other way round (a scan body counts once in XLA's
    cost analysis, alike for all four). At a few layers the peak is set by one block's
    backward instead, where "full" recomputes the most: it can exceed "minimal" there."""
    config = LlamaConfig(n_layers=2, dim=128, n_heads=8, n_kv_heads=4, max_seq_len=128)
    peak, per_layer, flops = {}, {}, {}
    for policy in REMAT_POLICIES:
        shallow = _compiled_grad(dataclasses.replace(config, remat=policy))
        deep = _compiled_grad(dataclasses.replace(config, remat=policy, n_layers=24))
        peak[policy] = jtp.peak_memory_per_device(deep)
        temps = [jtp.memory_breakdown(c)["temps"] for c in (shallow, deep)]
        per_layer[policy] = (temps[1] - temps[0]) / 22
        flops[policy] = deep.cost_analysis()["flops"]
    x_btd = 8 * 128 * 128 * 4
    assert per_layer["full"] == pytest.approx(x_btd, rel=0.05), per_layer
    assert per_layer["minimal"] == pytest.approx(2 * x_btd, rel=0.05), per_layer
    assert per_layer["full"] < per_layer["minimal"] < per_layer["dots"] < per_layer["none"]
    assert peak["full"] < peak["minimal"] < peak["dots"] < peak["none"], peak
    assert flops["full"] > flops["minimal"] > flops["dots"] > flops["none"], flops


def test_a_scanned_model_traces_one_block_whatever_its_depth():
    """The step's jaxpr holds the block's matmuls once (in a scan body) at 2 layers and at
    12; unrolled, once per layer. jtp.analysis.dtypes.dots counts a scan body once per trip."""

    def matmuls(n_layers, scan):
        config = dataclasses.replace(CFG, n_layers=n_layers, scan_layers=scan)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(TOKENS[:, :-1]))(state)
        return len(dots(jaxpr)), sum(d.flops for d in dots(jaxpr)), str(jaxpr).count("dot_general")

    two, twelve = matmuls(2, True), matmuls(12, True)
    assert two[2] == twelve[2]  # the same program text
    assert twelve[1] == pytest.approx(matmuls(12, False)[1])  # trips counted: the same FLOPs
    assert matmuls(12, False)[2] > 6 * two[2]


def test_remat_takes_the_old_booleans_and_refuses_other_names():
    assert LlamaConfig(remat=True).remat == "full" and LlamaConfig(remat=False).remat == "none"
    assert [remat_name(p) for p in REMAT_POLICIES] == list(REMAT_POLICIES)
    with pytest.raises(ValueError, match=r"remat='all' must be one of \('none', 'full'"):
        LlamaConfig(remat="all")
