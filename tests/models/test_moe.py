"""The mixture-of-experts feed-forward (jtp.models.moe) against a dense reference written
here: every token through every expert, weighted by its gate (0 for experts it did not
choose), the gates computed in transformers' order (softmax over E in float32, top-k,
renormalised where the family does). Outputs and gradients of the dropless (grouped matmul)
and capacity paths, the dropped-token count, the load-balancing and z losses against
transformers' formula, the forward's matmul FLOPs read off the program, and a decoder of MoE
blocks scanned and unrolled.

Tolerances, norm-relative (``rel_err``): 1e-6 for the layer. Module and reference are
float32 and multiply the same numbers; they sum them in another order (per-group matmuls vs
dense ones, k terms vs E terms with zeros, a softmax over the k chosen logits vs over E then
renormalised): about one float32 ulp (1.2e-7) of values O(1); seen: outputs 1e-7, gradients
1.7e-7. 2e-6 for the decoder, scanned vs unrolled: the same ops on the same values in two
programs that XLA fuses differently, through three layers and a vocabulary-wide softmax;
seen: logits 4.6e-7, gradients 6.8e-7 (the dense decoder's: equal logits, 3e-7 gradients).
Routing is the same in both (same expert loads), so no near-tie flipped.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err, unrolled_copy

from jtp.analysis.dtypes import dot_flops_by_dtype, dots
from jtp.models.decoder import cross_entropy
from jtp.models.llama import PRESETS, Llama
from jtp.models.moe import (
    MoEFeedForward,
    RouterStats,
    capacity,
    load_balancing_loss,
    router_z_loss,
)
from jtp.parallel.names import path_str
from jtp.parallel.stacked import layer_names

D, F, E, K = 16, 32, 8, 2
X = jax.random.normal(jax.random.key(1), (2, 12, D))  # (B, T, D): N = 24 tokens
TOL = 1e-6
DECODER_TOL = 2e-6

# (gating, norm_topk_prob, shared expert width): Mixtral; OLMoE (and Qwen3-MoE's default);
# Qwen3-30B-A3B; Qwen2-MoE with its shared expert.
FAMILIES = {
    "mixtral": ("mixtral", True, 0),
    "olmoe": ("softmax_topk", False, 0),
    "qwen3_moe": ("softmax_topk", True, 0),
    "qwen2_moe": ("softmax_topk", False, 24),
}


def make(family: str, **kw) -> MoEFeedForward:
    gating, norm, shared = FAMILIES[family]
    return MoEFeedForward(
        D,
        F,
        E,
        K,
        rngs=nnx.Rngs(0),
        gating=gating,
        norm_topk_prob=norm,
        shared_hidden_dim=shared,
        **kw,
    )


def swiglu(x_nd, w1, w3, w2):
    return (jax.nn.silu(x_nd @ w1) * (x_nd @ w3)) @ w2  # (N, D)


def reference_gates(logits_ne, gating: str, norm: bool, keep_ne=None):
    """(N, E) gate of each token for each expert, as transformers computes it: softmax over
    E in float32, top-k, renormalised (Mixtral always, the others where norm_topk_prob).
    ``keep_ne``: which (token, expert) pairs survive a capacity (dropped: gate 0)."""
    probs_ne = jax.nn.softmax(logits_ne, axis=-1)
    top_nk, idx_nk = jax.lax.top_k(probs_ne, K)
    if gating == "mixtral" or norm:
        top_nk = top_nk / top_nk.sum(-1, keepdims=True)
    gates_ne = jnp.sum(jax.nn.one_hot(idx_nk, E) * top_nk[..., None], axis=1)  # (N, E)
    return gates_ne if keep_ne is None else gates_ne * keep_ne


def reference(params: dict, x_btd, gating: str, norm: bool, keep_ne=None):
    """Every token through every expert (N, E, D), weighted by its gate and summed."""
    x_nd = x_btd.reshape(-1, D)
    gates_ne = reference_gates(x_nd @ params["router"], gating, norm, keep_ne)
    y_nd = sum(
        gates_ne[:, e, None] * swiglu(x_nd, params["w1"][e], params["w3"][e], params["w2"][e])
        for e in range(E)
    )
    if "shared_gate" in params:
        shared = swiglu(x_nd, params["shared_w1"], params["shared_w3"], params["shared_w2"])
        y_nd = y_nd + jax.nn.sigmoid(x_nd @ params["shared_gate"]) * shared
    return y_nd.reshape(x_btd.shape)


def params_of(moe: MoEFeedForward) -> dict:
    """The module's weights under the reference's names."""
    p = {
        "router": moe.router.kernel.get_value(),
        "w1": moe.experts.w1.get_value(),
        "w2": moe.experts.w2.get_value(),
        "w3": moe.experts.w3.get_value(),
    }
    if moe.shared_expert is not None:
        p["shared_gate"] = moe.shared_expert_gate.kernel.get_value()
        for name in ("w1", "w2", "w3"):
            p[f"shared_{name}"] = getattr(moe.shared_expert, name).kernel.get_value()
    return p


# The module's parameter paths under the reference's names.
NAMES = {
    "router.kernel": "router",
    "experts.w1": "w1",
    "experts.w2": "w2",
    "experts.w3": "w3",
    "shared_expert_gate.kernel": "shared_gate",
    "shared_expert.w1.kernel": "shared_w1",
    "shared_expert.w2.kernel": "shared_w2",
    "shared_expert.w3.kernel": "shared_w3",
}


def with_params(moe: MoEFeedForward, p: dict) -> MoEFeedForward:
    """A copy of ``moe`` holding ``p`` (the reference's names; traced values welcome), for
    differentiating module and reference alike."""
    graphdef, state = nnx.split(moe)
    flat = [(k, v.replace(p[NAMES[path_str(k)]])) for k, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.mark.parametrize("family", FAMILIES)
def test_dropless_equals_the_dense_reference(family):
    moe = make(family)
    y, stats = moe(X)
    gating, norm, _ = FAMILIES[family]
    assert rel_err(y, reference(params_of(moe), X, gating, norm)) <= TOL
    # Tokens do spread over the experts (the test would be weak if all chose the same two).
    assert int(jnp.sum(stats.expert_tokens > 0)) >= E - 1
    assert float(stats.tokens) == 24 and float(jnp.sum(stats.expert_tokens)) == 24 * K
    assert int(stats.dropped) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_ample_capacity_equals_the_reference(family):
    """A factor of E / k gives every expert room for every token: nothing dropped."""
    moe = make(family, capacity_factor=E / K)
    y, stats = moe(X)
    gating, norm, _ = FAMILIES[family]
    assert rel_err(y, reference(params_of(moe), X, gating, norm)) <= TOL
    assert int(stats.dropped) == 0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_capacity_drops_the_pairs_past_it_in_token_order_and_counts_them(family):
    """Factor 1: C = ceil(N k / E) pairs per expert, kept in token order; a dropped pair
    adds nothing (its weight is lost, the token keeps its other expert's output)."""
    moe = make(family, capacity_factor=1.0)
    y, stats = moe(X)
    p, n = params_of(moe), 24
    c = capacity(n, K, E, 1.0)
    assert c == 6
    # Which pairs the reference keeps: an expert's first C choosers, by token index.
    chosen_ne = np.asarray(reference_gates(X.reshape(n, D) @ p["router"], "mixtral", True)) > 0
    rank_ne = np.cumsum(chosen_ne, axis=0) - 1  # rank of token i among expert e's choosers
    keep_ne = chosen_ne & (rank_ne < c)
    expected_dropped = int(np.sum(np.maximum(chosen_ne.sum(0) - c, 0)))
    assert expected_dropped > 0  # the routing is uneven enough to drop at this factor
    assert int(stats.dropped) == expected_dropped == int(chosen_ne.sum() - keep_ne.sum())
    gating, norm, _ = FAMILIES[family]
    assert rel_err(y, reference(p, X, gating, norm, jnp.asarray(keep_ne, X.dtype))) <= TOL


@pytest.mark.parametrize("capacity_factor", [None, E / K])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_gradients_equal_the_dense_references(family, capacity_factor):
    """d/d(weights, x) of <y, r> for a fixed random r: through the grouped matmuls (or the
    capacity buffers), the sort and the routing weights (the router's only gradient)."""
    moe = make(family, capacity_factor=capacity_factor)
    gating, norm, _ = FAMILIES[family]
    r = jax.random.normal(jax.random.key(2), X.shape)
    p = params_of(moe)

    def got(p, x):
        return jnp.sum(with_params(moe, p)(x)[0] * r)

    def want(p, x):
        return jnp.sum(reference(p, x, gating, norm) * r)

    g_got = jax.grad(got, argnums=(0, 1))(p, X)
    g_want = jax.grad(want, argnums=(0, 1))(p, X)
    assert float(jnp.linalg.norm(g_want[0]["router"])) > 0  # the router does learn
    for name in p:
        assert rel_err(g_got[0][name], g_want[0][name]) <= TOL, name
    assert rel_err(g_got[1], g_want[1]) <= TOL


def transformers_load_balancing_loss(gate_logits: tuple[np.ndarray, ...]) -> float:
    """transformers' ``load_balancing_loss_func`` (no attention mask), in numpy: the layers'
    logits concatenated, softmax, top-k, one-hot (tokens, k, E) averaged over tokens times
    the mean probability per expert, summed, times E."""
    logits = np.concatenate(gate_logits, axis=0).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    selected = np.argsort(-probs, axis=-1)[:, :K]  # (tokens, k)
    expert_mask = np.eye(E)[selected]  # (tokens, k, E)
    tokens_per_expert = expert_mask.mean(axis=0)  # (k, E)
    router_prob_per_expert = probs.mean(axis=0)  # (E,)
    return float(np.sum(tokens_per_expert * router_prob_per_expert[None]) * E)


def test_load_balancing_and_z_losses_equal_transformers_formula():
    """One layer's stats give transformers' loss on its logits; two layers' stats added give
    its loss on the two layers' logits concatenated (not the sum of the two losses)."""
    a, b = make("qwen3_moe"), make("olmoe")
    b.router.kernel.set_value(3 * b.router.kernel.get_value())  # another, sharper routing
    xb = jax.random.normal(jax.random.key(3), (3, 5, D))
    _, sa = a(X)
    _, sb = b(xb)
    la = np.asarray(X.reshape(-1, D) @ a.router.kernel.get_value())
    lb = np.asarray(xb.reshape(-1, D) @ b.router.kernel.get_value())
    one = transformers_load_balancing_loss((la,))
    both = transformers_load_balancing_loss((la, lb))
    assert abs(float(load_balancing_loss(sa)) - one) <= 1e-6 * one
    assert abs(float(load_balancing_loss(sa + sb)) - both) <= 1e-6 * both
    assert abs(both - (one + transformers_load_balancing_loss((lb,)))) > 1e-3  # not a sum
    lse = np.log(np.sum(np.exp(np.concatenate([la, lb]).astype(np.float64)), axis=-1))
    assert abs(float(router_z_loss(sa + sb)) - np.mean(lse**2)) <= 1e-6 * np.mean(lse**2)
    zero = RouterStats.zeros(E)
    assert float(load_balancing_loss(zero + sa)) == float(load_balancing_loss(sa))


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_forward_matmul_flops_grow_with_k_not_with_the_experts(capacity_factor):
    """Read off the jaxpr: the experts' matmuls cost what k dense SwiGLUs per token do (plus
    the router's N x D x E), not E of them; a capacity factor of 1 adds its rounding."""
    e, n = 16, 24
    moe = MoEFeedForward(D, F, e, K, rngs=nnx.Rngs(0), capacity_factor=capacity_factor)
    flops = sum(d.flops for d in dots(jax.make_jaxpr(lambda x: moe(x)[0])(X)))
    router = 2 * n * D * e
    top_k = 3 * 2 * n * K * D * F + router  # gate, up, down for each (token, expert) pair
    every_expert = 3 * 2 * n * e * D * F + router
    assert top_k <= flops <= 1.2 * top_k
    assert every_expert > 6 * flops


@pytest.mark.parametrize(
    "gating, weighting", [("mixtral", "float32"), ("softmax_topk", "bfloat16")]
)
def test_bf16_experts_in_bf16_router_in_float32_weighting_as_each_family(gating, weighting):
    """With a bf16 compute dtype the experts' grouped matmuls are bf16 and the router's is
    float32 (read off the jaxpr); each expert output is weighted in float32 (Mixtral) or in
    bf16 (the others, weights cast first), as transformers does; the output is bf16."""
    moe = MoEFeedForward(D, F, E, K, rngs=nnx.Rngs(0), gating=gating, dtype=jnp.bfloat16)
    x = X.astype(jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x: moe(x)[0])(x)
    n = 24
    assert dot_flops_by_dtype(jaxpr) == {
        "float32": 2 * n * D * E,
        "bfloat16": 3 * 2 * n * K * D * F,
    }
    weighted = [  # the (N, K, D) products of expert outputs and their weights
        e.outvars[0].aval.dtype.name
        for e in jaxpr.jaxpr.eqns
        if e.primitive.name == "mul" and e.outvars[0].aval.shape == (n, K, D)
    ]
    assert weighted == [weighting]
    assert moe(x)[0].dtype == jnp.bfloat16


def moe_config(**kw):
    return dataclasses.replace(
        PRESETS["tiny"], n_layers=3, n_experts=4, experts_per_token=2, moe_ffn_hidden=64, **kw
    )


def loss_and_grads(model: Llama, tokens):
    """Cross-entropy plus the load-balancing loss, its gradients, the logits and stats."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits, stats = nnx.merge(graphdef, p)(tokens[:, :-1], router_stats=True)
        aux = load_balancing_loss(stats)
        return cross_entropy(logits, tokens[:, 1:]) + 0.01 * aux, (logits, stats)

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, out, {path_str(p): v.get_value() for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("remat", ["full"])  # "none" runs in the other MoE decoder tests
def test_moe_decoder_scanned_equals_unrolled(remat):
    """Forward and backward of a decoder of MoE blocks (Qwen2-MoE-like: shared expert),
    scanned and unrolled from the same weights; the stats of the three layers add up."""
    cfg = moe_config(shared_expert_hidden=32, remat=remat)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9), dtype=np.int32)
    scanned = Llama(cfg, rngs=nnx.Rngs(0))
    assert scanned.layers.feed_forward.experts.w1.get_value().shape == (3, 4, 128, 64)
    loss_s, (logits_s, stats_s), grads_s = loss_and_grads(scanned, tokens)
    loss_u, (logits_u, stats_u), grads_u = loss_and_grads(unrolled_copy(scanned), tokens)
    assert float(stats_s.tokens) == 3 * 16 and float(jnp.sum(stats_s.expert_tokens)) == 96
    np.testing.assert_array_equal(stats_s.expert_tokens, stats_u.expert_tokens)
    assert abs(float(loss_s) - float(loss_u)) <= DECODER_TOL * float(loss_u)
    assert rel_err(logits_s, logits_u) <= DECODER_TOL
    names = sorted(grads_s)
    restacked = [
        np.stack([grads_u[n] for n in per]) if per else grads_u[name]
        for name in names
        for per in [layer_names(name, grads_s[name].shape[0], grads_u)]
    ]
    assert rel_err(restacked, [grads_s[n] for n in names]) <= DECODER_TOL
    assert float(jnp.linalg.norm(grads_s["layers.feed_forward.router.kernel"])) > 0


def test_mixed_dense_and_sparse_layers_run_unrolled_and_are_refused_scanned():
    """Qwen2-MoE's decoder_sparse_step=2 as a pattern: unrolled, layers 1 of 3 sparse; a
    scan needs one structure for all its layers, so the config refuses it, saying how."""
    cfg = moe_config(moe_layers=(False, True), scan_layers=False)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    kinds = [type(layer.feed_forward).__name__ for layer in model.layers]
    assert kinds == ["FeedForward", "MoEFeedForward", "FeedForward"]
    logits, stats = model(jnp.zeros((2, 8), jnp.int32), router_stats=True)
    assert logits.shape == (2, 8, 512) and float(stats.tokens) == 16  # one sparse layer
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    with pytest.raises(ValueError, match="scan_layers=False"):
        dataclasses.replace(cfg, scan_layers=True)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_experts": 4, "experts_per_token": 5}, "experts_per_token 5 must be in 1 .. "),
        ({"n_experts": 4, "gating": "top2"}, "gating='top2' must be one of"),
        ({"n_experts": 4, "capacity_factor": 0.0}, "capacity_factor 0.0 must be > 0"),
        ({"n_experts": 4, "moe_layers": ()}, "moe_layers is empty"),
        ({"n_experts": 4, "router_aux_loss_coef": -1.0}, "router_aux_loss_coef -1.0"),
        ({"shared_expert_hidden": 8}, "shared_expert_hidden needs n_experts > 0"),
        ({"n_experts": -1}, "n_experts -1 must be >= 0"),
        ({"n_experts": 4, "lora_rank": 4}, "LoRA on the feed-forward"),
    ],
)
def test_bad_moe_configs_fail_early(fields, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PRESETS["tiny"], **fields)
