"""``jtp.infer_plan`` on a mixture of experts: the stacked experts (3-D ``w1``/``w3`` (E, D,
F), ``w2`` (E, F, D)) split over "tensor" on E when the tensor size divides it, else on each
expert's F (the hand plan's rule); the router replicated; a shared expert and the dense
layers of a mixed model paired as dense feed-forwards; ``jtp.explain`` naming where each
expert parameter went and why; the sharded forward equal to the unsharded one (1e-5 of the
largest logit: float32 sums reordered by the tensor split; seen 1.3e-6).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jtp
from jtp.models.llama import PRESETS, Llama
from jtp.recipes import LlamaTaskConfig, resolve
from jtp.recipes.llama import model_shapes

TOKENS = jax.ShapeDtypeStruct((8, 16), jnp.int32)
E_SPLIT = {
    "w1": P("tensor", None, None),
    "w3": P("tensor", None, None),
    "w2": P("tensor", None, None),
}
F_SPLIT = {
    "w1": P(None, None, "tensor"),
    "w3": P(None, None, "tensor"),
    "w2": P(None, "tensor", None),
}
MIXED = dataclasses.replace(
    PRESETS["tiny-moe"],
    n_layers=3,
    moe_layers=(True, False),
    scan_layers=False,
    shared_expert_hidden=64,
)


def factory(config):
    return lambda: Llama(config, rngs=nnx.Rngs(0))


def specs(plan, key):
    return dict(plan[key].specs)


@pytest.mark.parametrize(
    "tensor,n_experts,want", [(8, 8, E_SPLIT), (4, 8, E_SPLIT), (8, 4, F_SPLIT), (4, 6, F_SPLIT)]
)
def test_stacked_experts_split_on_e_or_on_f(tensor, n_experts, want):
    config = dataclasses.replace(PRESETS["tiny-moe"], n_experts=n_experts)
    plan = jtp.infer_plan(factory(config), TOKENS, tensor=tensor)
    assert specs(plan, "layers.*.feed_forward.experts") == want
    assert "layers.*.feed_forward.router" not in plan.styles
    assert plan.reasons["layers.*.feed_forward.router"].startswith("replicated: the router")
    why = plan.reasons["layers.*.feed_forward.experts"]
    assert ("split on E" in why) == (want is E_SPLIT), why
    mesh = jtp.make_mesh(8 // tensor, tensor)
    model = jtp.sharded_init(factory(config), mesh, plan)
    w1, w2 = model.layers.feed_forward.experts.w1, model.layers.feed_forward.experts.w2
    n, e, d, f = w1.shape  # scanned: (L, E, D, F)
    if want is E_SPLIT:
        assert w1.sharding.shard_shape(w1.shape) == (n, e // tensor, d, f)
        assert w2.sharding.shard_shape(w2.shape) == (n, e // tensor, f, d)
    else:
        assert w1.sharding.shard_shape(w1.shape) == (n, e, d, f // tensor)
        assert w2.sharding.shard_shape(w2.shape) == (n, e, f // tensor, d)


def test_mixed_layers_shared_expert_and_the_sharded_forward():
    """Unrolled sparse / dense / sparse with a shared expert, on 2 x 4 with fsdp: experts on
    E, the shared expert and the dense MLP as column/row pairs; the forward as unsharded."""
    plan = jtp.infer_plan(factory(MIXED), TOKENS, tensor=4)
    assert specs(plan, "layers.*.feed_forward.experts") == E_SPLIT  # layers 0 and 2
    styles = {k: type(v).__name__ for k, v in plan.styles.items()}
    assert styles["layers.*.feed_forward.shared_expert.w1"] == "ColwiseParallel"
    assert styles["layers.*.feed_forward.shared_expert.w2"] == "RowwiseParallel"
    assert styles["layers.1.feed_forward.w1"] == "ColwiseParallel"
    assert styles["layers.1.feed_forward.w2"] == "RowwiseParallel"
    mesh = jtp.make_mesh(2, 4)
    sharded = jtp.sharded_init(factory(MIXED), mesh, plan, fsdp=True)
    w1 = sharded.layers[0].feed_forward.experts.w1
    assert w1.sharding.shard_shape(w1.shape)[0] == 8 // 4
    tokens = np.random.default_rng(0).integers(0, 512, (8, 16), dtype=np.int32)
    want = np.asarray(factory(MIXED)()(jnp.asarray(tokens)))
    got = np.asarray(nnx.jit(lambda m, t: m(t))(sharded, jtp.shard_batch(tokens, mesh)))
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"sharded forward: {err:.1e}")
    assert err <= 1e-5


def test_explain_lists_the_expert_parameters_and_why():
    mesh = jtp.make_mesh(1, 8)
    plan = jtp.infer_plan(factory(PRESETS["tiny-moe"]), TOKENS, tensor=8)
    text = str(jtp.explain(factory(PRESETS["tiny-moe"]), mesh, plan))
    for name in ("experts.w1", "experts.w2", "experts.w3", "router.kernel"):
        assert f"layers.feed_forward.{name}" in text or f"layers.*.feed_forward.{name}" in text
    assert "8 stacked experts" in text and "the router of" in text


def test_plan_auto_on_a_moe_preset_follows_the_mesh():
    """``--plan auto``: resolve infers for the mesh's tensor size."""
    config = LlamaTaskConfig(preset="tiny-moe", plan="auto")
    shapes = dataclasses.replace(model_shapes(config), n_experts=4)
    wide = resolve(config, shapes, jtp.make_mesh(1, 8)).plan
    narrow = resolve(config, shapes, jtp.make_mesh(2, 4)).plan
    assert specs(wide, "layers.*.feed_forward.experts") == F_SPLIT
    assert specs(narrow, "layers.*.feed_forward.experts") == E_SPLIT
