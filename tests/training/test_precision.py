"""The precision module: what each name stores and computes in, and that the casts keep
every parameter's sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import FF_PLAN, ff_factory

import jtp
from jtp.training.options import TrainerOptions
from jtp.training.precision import PRECISIONS, compute_params, policy, stored_params


def test_the_names_and_what_they_mean():
    assert PRECISIONS == ("32-true", "bf16-mixed", "bf16-true", "transformer-engine", "fp8-mixed")
    assert (policy("32-true").param_dtype, policy("32-true").compute_dtype) == (
        jnp.float32,
        jnp.float32,
    )
    assert (policy("bf16-mixed").param_dtype, policy("bf16-mixed").compute_dtype) == (
        jnp.float32,
        jnp.bfloat16,
    )
    assert policy("bf16-true").param_dtype == policy("bf16-true").compute_dtype == jnp.bfloat16


def test_an_unknown_name_lists_the_choices_before_anything_runs():
    with pytest.raises(ValueError, match=r"precision='fp16' must be one of \('32-true'"):
        policy("fp16")
    with pytest.raises(ValueError, match="must be one of"):
        TrainerOptions(precision="fp16")


@pytest.mark.parametrize("name", PRECISIONS)
def test_storage_keeps_each_sharding_and_casts_only_floats(name):
    mesh = jtp.make_mesh(2, 4)
    params = nnx.state(jtp.sharded_init(ff_factory(), mesh, FF_PLAN), nnx.Param)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tree = {"params": params, "count": jax.device_put(jnp.zeros((), jnp.int32), replicated)}
    stored = stored_params(tree, name)
    want = policy(name).param_dtype
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(stored["params"]), strict=True):
        assert b.dtype == want and b.sharding == a.sharding
        # bf16 storage is round-to-nearest of the fp32 value: within 2^-8 relative
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a), rtol=2**-8)
    assert stored["count"].dtype == jnp.int32
    abstract = jax.eval_shape(lambda t: t, tree)
    assert jax.tree.leaves(stored_params(abstract, name)["params"])[0].dtype == want


def test_mixed_computes_in_bf16_and_hands_fp32_gradients_back():
    w = jnp.ones((4, 4), jnp.float32)
    seen = []

    def loss(p):
        c = compute_params(p, "bf16-mixed")
        seen.append(c["w"].dtype)
        return jnp.sum(c["w"].astype(jnp.float32) ** 2)

    grads = jax.grad(loss)({"w": w})
    assert seen == [jnp.bfloat16] and grads["w"].dtype == jnp.float32
    assert compute_params({"w": w}, "32-true")["w"] is w


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_the_policy_reaches_the_layers_of_a_scanned_stack(scan):
    """``nnx.iter_graph`` sees the blocks stacked for a scan as the Flax layers they are,
    so the policy sets their compute dtype, and the forward's matmuls all run in bf16."""
    from jtp.analysis.dtypes import dot_flops_by_dtype
    from jtp.models.llama import Llama, LlamaConfig
    from jtp.training.precision import apply_compute_dtype

    model = Llama(LlamaConfig(n_layers=3, scan_layers=scan), rngs=nnx.Rngs(0))
    apply_compute_dtype(model, "bf16-mixed")
    layers = [m for _, m in nnx.iter_graph(model.layers) if isinstance(m, nnx.Linear | nnx.RMSNorm)]
    assert len(layers) == (9 if scan else 27) and {m.dtype for m in layers} == {jnp.bfloat16}
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((2, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state)
    assert set(dot_flops_by_dtype(jaxpr)) == {"bfloat16"}
