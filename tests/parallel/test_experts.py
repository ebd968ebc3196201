"""Experts placed by the plan (jtp.parallel.experts): a MoE Llama's loss and gradients on
data x tensor meshes equal one device's, and the program moves no expert weight.

Tolerance: 1e-5 of each gradient's largest entry (seen <= 2e-6). Both sides compute in
float32; placing the experts changes only the order of sums (a tensor group's partial
outputs meet in a psum; the data-parallel mean of the gradients; an expert's rows grouped
per device rather than per batch), each a few hundred roundings of 6e-8 at these sizes, on
any x86-64 CPU. A pair sent to the wrong expert or counted twice moves gradients by O(1).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import jtp
from jtp.analysis.collectives import collectives
from jtp.models.decoder import cross_entropy
from jtp.models.llama import PRESETS, Llama
from jtp.models.moe import load_balancing_loss
from jtp.models.plans import experts, llama
from jtp.parallel.activations import activation_rules, per_data_rank
from jtp.parallel.names import path_str

TOKENS = np.random.default_rng(0).integers(0, 256, (8, 17), dtype=np.int32)
RTOL = 1e-5  # of each gradient's largest entry: see the module docstring


def moe_config(n_experts: int = 8, **kw):
    return dataclasses.replace(
        PRESETS["tiny"],
        n_layers=2,
        n_experts=n_experts,
        experts_per_token=2,
        moe_ffn_hidden=64,
        **kw,
    )


def loss_fn(graphdef):
    def loss(params, tokens):
        model = nnx.merge(graphdef, params)
        if not model.config.n_experts:  # the dense model the MoE one is compared with
            return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        logits, stats = model(tokens[:, :-1], router_stats=True)
        return cross_entropy(logits, tokens[:, 1:]) + 0.01 * load_balancing_loss(stats)

    return loss


def flat(tree) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def one_device(config):
    graphdef, params = nnx.split(Llama(config, rngs=nnx.Rngs(0)), nnx.Param)
    value, grads = jax.jit(jax.value_and_grad(loss_fn(graphdef)))(params, TOKENS)
    return float(value), flat(grads)


def placed(config, mesh, **plan_kw):
    """Loss, gradients and the compiled forward and backward on ``mesh``."""
    plan = llama(config, mesh=mesh, **plan_kw)
    model = jtp.sharded_init(
        lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, plan, fsdp=plan_kw.get("fsdp", False)
    )
    graphdef, params = nnx.split(model, nnx.Param)
    step = jax.jit(jax.value_and_grad(loss_fn(graphdef)))
    forward = jax.jit(loss_fn(graphdef))
    with activation_rules(mesh, plan.activations):
        compiled = step.lower(params, TOKENS).compile()
        compiled_forward = forward.lower(params, TOKENS).compile()
    value, grads = compiled(params, TOKENS)
    return float(value), flat(grads), compiled_forward, model


def assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        scale = float(np.max(np.abs(g))) or 1.0
        np.testing.assert_allclose(got[name], g, rtol=0, atol=RTOL * scale, err_msg=name)


CASES = [
    # E split over tensor 8 alone: tests/training/test_moe_training.py (tensor8 cases)
    pytest.param(8, (2, 4), {"sequence_parallel": True}, id="E-split-2x4-sp"),
    pytest.param(8, (2, 4), {"fsdp": True}, id="E-split-2x4-fsdp"),
    pytest.param(8, (8, 1), {}, id="data8"),
    pytest.param(2, (2, 4), {}, id="F-split-2x4"),
]


@pytest.mark.parametrize("n_experts, shape, plan_kw", CASES)
def test_placed_experts_equal_one_device(n_experts, shape, plan_kw):
    """8 experts: each of a tensor group's devices holds 8/T whole ones; 2 experts on a
    wider tensor axis: every expert's hidden width split. Loss and every gradient as on
    one device, and each parameter where the plan put it."""
    config = moe_config(n_experts)
    want_loss, want = one_device(config)
    mesh = jtp.make_mesh(data=shape[0], tensor=shape[1])
    got_loss, got, _, model = placed(config, mesh, **plan_kw)
    assert abs(got_loss - want_loss) <= RTOL * abs(want_loss)
    assert_grads_close(got, want)
    w1 = nnx.state(model, nnx.Param)["layers"]["feed_forward"]["experts"]["w1"].get_value()
    spec = experts(n_experts, mesh)
    assert tuple(w1.sharding.spec)[1:] == (*spec[:2], spec[2]) or plan_kw.get("fsdp")


def _tensor_ops(compiled, mesh, kind):
    return sum(
        r.trips for r in collectives(compiled, mesh) if r.kind == kind and r.axes == ("tensor",)
    )


@pytest.mark.parametrize("n_experts", [8, 2], ids=["E-split", "F-split"])
def test_a_moe_layer_costs_the_all_reduce_of_a_dense_feed_forward(n_experts):
    """The forward of the MoE model on 2x4 has exactly the dense model's collectives over
    "tensor": one all-reduce per attention and one per feed-forward (each counted once per
    trip of the layer scan), no all-gather over "tensor" beyond the dense model's (the
    logits'), so no expert weight moves; and nothing over "data" in the forward but what
    the dense model has there."""
    mesh = jtp.make_mesh(data=2, tensor=4)
    *_, moe, _ = placed(moe_config(n_experts), mesh)
    *_, dense, _ = placed(moe_config(0), mesh)
    for kind in ("all-reduce", "all-gather", "all-to-all"):
        assert _tensor_ops(moe, mesh, kind) == _tensor_ops(dense, mesh, kind), kind
    assert (
        _tensor_ops(moe, mesh, "all-reduce") == 2 * 2 + _tensor_ops(dense, mesh, "all-reduce") - 4
    )
    weight_shapes = {(n_experts, 64, 64), (n_experts, 64, 64 // 4)}
    for r in collectives(moe, mesh):
        assert not set(r.shapes) & weight_shapes, r


def test_without_the_rule_the_routing_gathers_the_batch():
    """Why the plan places the experts even with no tensor split: on data 8 without the
    "experts" rule, the sort over all (token, expert) pairs makes XLA assemble every pair's
    token row (M, D) on every device (an all-reduce over "data" in the forward: seen
    (256, 128) f32 per layer; and the top-k gathers the (N, E) probabilities); with it each
    device routes and sorts its own tokens, and only (E,) sums cross "data"."""
    config = moe_config(8)
    mesh = jtp.make_mesh(data=8, tensor=1)
    plan = llama(config, mesh=mesh)
    model = jtp.sharded_init(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, plan)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.device_put(TOKENS, jax.sharding.NamedSharding(mesh, jax.P("data")))

    def over_data(rules):
        with activation_rules(mesh, rules, check_unused=False):
            compiled = jax.jit(loss_fn(graphdef)).lower(params, tokens).compile()
        return [r for r in collectives(compiled, mesh) if r.axes == ("data",)]

    without = over_data({k: v for k, v in plan.activations.items() if k != "experts"})
    assert any(len(s) == 2 and s[-1] == config.dim for r in without for s in r.shapes)
    # With it: only the router stats' per-expert sums and the loss's mean cross "data".
    for r in over_data(plan.activations):
        assert all(int(np.prod(s)) <= config.n_experts for s in r.shapes), r


def test_capacity_on_a_tensor_group_drops_what_one_device_drops():
    """With a capacity factor and no data split, each device applies the capacity to the
    pairs of its own experts, as one device does to all: the same outputs and the same
    count of dropped pairs, summed over the tensor group."""
    config = moe_config(8, capacity_factor=0.5)
    graphdef, params = nnx.split(Llama(config, rngs=nnx.Rngs(0)), nnx.Param)

    def run(params):
        logits, stats = nnx.merge(graphdef, params)(TOKENS[:, :-1], router_stats=True)
        return logits, stats.dropped

    want_logits, want_dropped = jax.jit(run)(params)
    assert int(want_dropped) > 0
    mesh = jtp.make_mesh(data=1, tensor=8)
    plan = llama(config, mesh=mesh)
    model = jtp.sharded_init(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, plan)
    graphdef, params = nnx.split(model, nnx.Param)
    with activation_rules(mesh, plan.activations):
        logits, dropped = jax.jit(run)(params)
    assert int(dropped) == int(want_dropped)
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-5 * np.abs(want_logits).max())


def test_placed_experts_run_per_data_rank():
    """Inside the trainer's per-data-rank vmap (gradient accumulation reducing once),
    "data" is the vmapped axis: the placement leaves it to the vmap, and each rank's loss
    and gradients are those of its rows on one device (the grouped matmuls' own batching
    rule takes only all-batched operands: jtp.models.grouped)."""
    config = moe_config(8)
    mesh = jtp.make_mesh(data=2, tensor=4)
    plan = llama(config, mesh=mesh)
    model = jtp.sharded_init(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, plan)
    graphdef, params = nnx.split(model, nnx.Param)
    by_rank = TOKENS.reshape(2, 4, 17)  # (data, rows per rank, T + 1)

    def per_rank(tokens):
        with per_data_rank():
            return jax.value_and_grad(loss_fn(graphdef))(params, tokens)

    with activation_rules(mesh, plan.activations):
        losses, grads = jax.jit(jax.vmap(per_rank, spmd_axis_name="data"))(by_rank)
    ref_graphdef, ref_params = nnx.split(Llama(config, rngs=nnx.Rngs(0)), nnx.Param)
    ref = jax.jit(jax.value_and_grad(loss_fn(ref_graphdef)))
    wants = [ref(ref_params, by_rank[r]) for r in range(2)]
    for r, (want_loss, want_grads) in enumerate(wants):
        assert abs(float(losses[r]) - float(want_loss)) <= RTOL * abs(float(want_loss))
        got = {k: v[r] for k, v in flat(grads).items()}
        assert_grads_close(got, flat(want_grads))


@pytest.mark.parametrize(
    "n_experts, shape", [(8, (2, 4)), (2, (1, 8))], ids=["E-split-2x4", "F-split-tensor8"]
)
def test_generation_with_placed_experts_gives_one_devices_tokens(n_experts, shape):
    """jtp.generate applies the "experts" rule in prefill and decode (a MoE layer on a
    mesh without it would sort every sequence's pairs together): greedy tokens as on one
    device."""
    config = moe_config(n_experts)
    prompts = [[1, 5, 9, 3], [2, 7], [4, 4, 4, 4, 4, 8], [9]]
    want = jtp.generate(Llama(config, rngs=nnx.Rngs(0)), prompts, max_new_tokens=6)
    mesh = jtp.make_mesh(data=shape[0], tensor=shape[1])
    model = jtp.sharded_init(
        lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, llama(config, mesh=mesh)
    )
    assert jtp.generate(model, prompts, max_new_tokens=6) == want


@pytest.mark.parametrize(
    "shape", [(2, 1, 4), (2, 4, 1), (1, 4, 2)], ids=["2x4-tensor", "2x4-expert", "expert4-tensor2"]
)
def test_a_capacity_counts_each_devices_tokens_once(shape):
    """With a capacity factor the mesh computes what one device computes on each batch
    shard's rows alone (the capacity applies to a device's tokens): logits equal those
    per-shard runs', and the dropped pairs their sum, counted once however many devices
    of a tensor group or an expert exchange saw them."""
    data, expert, tensor = shape
    config = moe_config(8, capacity_factor=0.5)
    graphdef, params = nnx.split(Llama(config, rngs=nnx.Rngs(0)), nnx.Param)

    def run(params, tokens):
        logits, stats = nnx.merge(graphdef, params)(tokens, router_stats=True)
        return logits, stats.dropped

    shards = data * expert  # batch rows split over data x expert
    rows = TOKENS[:, :-1].reshape(shards, -1, TOKENS.shape[1] - 1)
    per_shard = [jax.jit(run)(params, r) for r in rows]
    want_logits = np.concatenate([np.asarray(logits) for logits, _ in per_shard])
    want_dropped = sum(int(d) for _, d in per_shard)
    assert want_dropped > 0
    mesh = jtp.make_mesh(data=data, tensor=tensor, expert=expert)
    plan = llama(config, mesh=mesh)
    model = jtp.sharded_init(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh, plan)
    graphdef, params = nnx.split(model, nnx.Param)
    with activation_rules(mesh, plan.activations):
        logits, dropped = jax.jit(run)(params, TOKENS[:, :-1])
    assert int(dropped) == want_dropped
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-5 * np.abs(want_logits).max())
