"""Sharded vs unsharded: same init, same outputs, gradients and AdamW updates.

Tolerances are norm-relative (||sharded - ref|| / ||ref||) over a whole pytree:
- Parameters right after init must be *equal*: jax's threefry is partitionable, so a shard
  computes exactly the bits an unsharded init gives it.
- Outputs and gradients: 1e-5. fp32 has eps ~1.2e-7; tensor-parallel partial sums and
  data-parallel gradient reductions add the same terms in another order, which moves results
  by a few ulps per reduction, far below 1e-5 at these sizes.
- Parameter *updates* after two AdamW steps: 1e-4. Adam normalises element-wise, so its first
  step is ~lr*sign(g); a reordered sum that nudges a near-zero gradient element moves that
  element's update by O(lr). We compare the update (p2 - p0), not p2 itself, so the check is
  not diluted by the large unchanged parameter values.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    FF_PLAN,
    LM_PLAN,
    delta,
    ff_batch,
    ff_factory,
    ff_loss,
    lm_batch,
    lm_factory,
    lm_loss,
    make_fns,
    rel_err,
)
from jax.sharding import NamedSharding

import jtp
from jtp.analysis.memory import bytes_per_device
from jtp.parallel.parallelize import _init_program
from jtp.parallel.plan import shard_shape

MESHES = [(1, 2), (1, 4), (1, 8), (2, 4), (4, 2)]
CASES = {
    "feedforward": (ff_factory, FF_PLAN, ff_loss, ff_batch),
    "tiny_lm": (lm_factory, LM_PLAN, lm_loss, lm_batch),
}


def _reference(name):
    """Unsharded results on one device (computed once per model)."""
    if name not in _REF:
        factory, _, loss_fn, batch_fn = CASES[name]
        model = factory()()
        graphdef, params = nnx.split(model, nnx.Param)
        tx = optax.adamw(1e-2)
        fwd_grad, train2 = make_fns(graphdef, loss_fn, tx)
        batch = batch_fn()
        loss, out, grads = jax.jit(fwd_grad)(params, batch)
        new_params, _ = jax.jit(train2)(params, tx.init(params), batch)
        _REF[name] = (params, loss, out, grads, new_params)
    return _REF[name]


_REF: dict = {}


@pytest.mark.parametrize("fsdp", [False, True], ids=["tp", "fsdp"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(CASES))
def test_matches_unsharded(name, shape, fsdp):
    factory, plan, loss_fn, batch_fn = CASES[name]
    ref_params, ref_loss, ref_out, ref_grads, ref_new = _reference(name)
    mesh = jtp.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])

    model = jtp.sharded_init(factory(), mesh, plan, fsdp=fsdp)
    graphdef, params = nnx.split(model, nnx.Param)
    assert rel_err(params, ref_params) == 0.0, "sharded init must equal the unsharded init"

    # Every parameter sits exactly where the plan says, with the expected shard shape.
    placements = {p.path: p for p in jtp.resolve(model, mesh, plan, fsdp=fsdp)}
    for path, var in nnx.to_flat_state(params):
        key = ".".join(map(str, path))
        arr = var.get_value()
        assert arr.sharding.spec == placements[key].spec, key
        assert arr.sharding.shard_shape(arr.shape) == shard_shape(placements[key], mesh), key

    tx = optax.adamw(1e-2)
    opt_state = jtp.init_opt_state(tx, params)
    # Adam's moments are sharded exactly like their parameters; the step count is replicated.
    adam = opt_state[0]
    for moments in (adam.mu, adam.nu):
        jax.tree.map(lambda m, p: _assert_same_layout(m, p), moments, params)
    assert adam.count.sharding.is_fully_replicated

    fwd_grad, train2 = make_fns(graphdef, loss_fn, tx)
    batch = jtp.shard_batch(batch_fn(), mesh)
    loss, out, grads = jax.jit(fwd_grad)(params, batch)
    assert rel_err(out, ref_out) < 1e-5
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert rel_err(grads, ref_grads) < 1e-5

    param_sh = jax.tree.map(lambda p: p.sharding, params)
    opt_sh = jtp.opt_state_shardings(tx, params)
    step = jax.jit(train2, out_shardings=(param_sh, opt_sh))
    new_params, _ = step(params, opt_state, batch)
    update, ref_update = delta(new_params, params), delta(ref_new, ref_params)
    assert rel_err(update, ref_update) < 1e-4


def _assert_same_layout(a, b):
    assert isinstance(a.sharding, NamedSharding)
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    assert a.sharding.shard_shape(a.shape) == b.sharding.shard_shape(b.shape)


@pytest.mark.parametrize("fsdp", [False, True], ids=["tp", "fsdp"])
@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_init_is_born_sharded(shape, fsdp):
    """The compiled initialiser's per-device peak stays at the size of the shards it makes:
    no device ever holds a whole planned parameter (issue bound: 1.05 x shards + 1 MiB).

    One whole parameter here is 4 MiB, more than the 1 MiB + 5% slack at every layout, so
    materialising any parameter unsharded, even as a temporary, fails the check."""
    factory = ff_factory(512, 2048)
    mesh = jtp.make_mesh(*shape)
    compiled, _ = _init_program(factory, mesh, FF_PLAN, fsdp=fsdp)
    shard_bytes = bytes_per_device(
        jtp.resolve(nnx.eval_shape(factory), mesh, FF_PLAN, fsdp=fsdp), mesh
    )
    ma = compiled.memory_analysis()
    peak = (
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        + ma.temp_size_in_bytes
        - ma.alias_size_in_bytes
    )
    assert peak <= 1.05 * shard_bytes + 2**20, (peak, shard_bytes)


def test_parallelize_reshards_in_place():
    mesh = jtp.make_mesh(2, 4)
    model = ff_factory()()
    ref = np.asarray(model.w2.kernel[...])
    same = jtp.parallelize(model, mesh, FF_PLAN, fsdp=True)
    assert same is model
    arr = model.w2.kernel[...]
    assert arr.sharding.spec == jax.sharding.PartitionSpec("tensor", "data")
    assert arr.sharding.shard_shape(arr.shape) == (16, 8)
    np.testing.assert_array_equal(np.asarray(arr), ref)


def test_non_callable_factory():
    with pytest.raises(ValueError, match="factory must be a zero-argument callable.*got int"):
        jtp.sharded_init(42, jtp.make_mesh(1, 8), FF_PLAN)
    with pytest.raises(ValueError, match="got a built FeedForward.*jtp.parallelize"):
        jtp.sharded_init(ff_factory()(), jtp.make_mesh(1, 8), FF_PLAN)


def test_bad_plan_fails_before_compile(monkeypatch):
    """Validation runs on the abstract model: jit is never reached."""

    def no_jit(*a, **k):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(jax, "jit", no_jit)
    with pytest.raises(ValueError, match="not divisible by mesh axis 'tensor'"):
        jtp.sharded_init(ff_factory(16, 60), jtp.make_mesh(1, 8), FF_PLAN)
