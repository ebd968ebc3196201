"""A whole MoE Llama on meshes with an "expert" axis against one device: one training
step's loss and gradients, the compiled step's all-to-alls over "expert", and
``python -m jtp.train --expert-parallel``.

Tolerance 2e-6, norm-relative (``rel_err``) for the gradients, 2e-6 relative for the loss:
test_moe's decoder tolerance (the same float32 ops on the same values, summed in another
order: the batch split over data x expert sums each gradient's rows per device then over
devices, the tensor split sums partial products, the exchange reorders nothing but rows);
routing is computed from the same numbers on both sides, and the same expert loads are
asserted, so no near-tie flipped.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err

import jtp
from jtp.models.decoder import cross_entropy
from jtp.models.llama import PRESETS, Llama
from jtp.models.moe import load_balancing_loss
from jtp.models.plans import llama as llama_plan
from jtp.parallel.activations import activation_rules
from jtp.parallel.names import path_str
from jtp.parallel.plan import TPPlan

TOL = 2e-6
CONFIG = dataclasses.replace(
    PRESETS["tiny"], n_layers=2, n_experts=8, experts_per_token=2, moe_ffn_hidden=64
)
MESHES = {
    "d2e2t2": dict(data=2, expert=2, tensor=2),
    "e8": dict(expert=8),
    "e4t2": dict(expert=4, tensor=2),
}
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 17), dtype=np.int32)


def _loss(graphdef, tokens):
    def loss(params):
        logits, stats = nnx.merge(graphdef, params)(tokens[:, :-1], router_stats=True)
        ce = cross_entropy(logits, tokens[:, 1:])
        return ce + 0.01 * load_balancing_loss(stats), stats.expert_tokens

    return loss


def _flat(grads):
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def _one_device():
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    (loss, load), grads = jax.jit(jax.value_and_grad(_loss(graphdef, TOKENS), has_aux=True))(params)
    return float(loss), np.asarray(load), _flat(grads)


def _sharded(mesh):
    """Loss, expert loads, gradients and the compiled step on ``mesh``."""
    plan = llama_plan(CONFIG)
    dense = {k: v for k, v in plan.styles.items() if "feed_forward" not in k}
    rules = {k: v for k, v in plan.activations.items() if k != "ffn_hidden"}
    plan = TPPlan(dense, rules)  # main's plan names the dense MLP of every layer
    model = jtp.sharded_init(lambda: Llama(CONFIG, rngs=nnx.Rngs(0)), mesh, plan)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jtp.shard_batch(TOKENS, mesh)
    step = jax.jit(jax.value_and_grad(_loss(graphdef, tokens), has_aux=True))
    with activation_rules(mesh, plan.activations):
        compiled = step.lower(params).compile()
    (loss, load), grads = compiled(params)
    return float(loss), np.asarray(load), _flat(grads), compiled, params


@pytest.fixture(scope="module")
def reference():
    return _one_device()


@pytest.mark.parametrize("shape", list(MESHES.values()), ids=list(MESHES))
def test_training_step_equals_one_device(shape, reference):
    mesh = jtp.make_mesh(**shape)
    ref_loss, ref_load, ref_grads = reference
    loss, load, grads, compiled, params = _sharded(mesh)
    np.testing.assert_array_equal(load, ref_load)  # same routing: no near-tie flipped
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    errors = {name: rel_err(grads[name], ref_grads[name]) for name in ref_grads}
    assert max(errors.values()) <= TOL, errors
