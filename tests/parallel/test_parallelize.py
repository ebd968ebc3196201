"""Sharded vs unsharded: same init, same outputs, gradients and optimizer steps.

Tolerances (why each holds: docs/testing.md, "How tolerances are chosen"):
- Parameters right after init must be *equal*: jax's threefry is partitionable, so a shard
  computes exactly the bits an unsharded init gives it.
- Outputs, loss and gradients: 1e-5 norm-relative. fp32 has eps ~1.2e-7; tensor-parallel
  partial sums and data-parallel gradient reductions add the same terms in another order,
  which moves results by a few ulps per reduction (seen <= 3.3e-7 here).
- One AdamW step: only what the gradients determine is compared (Adam's first step is
  ~lr*sign(g), and the sign of a gradient within rounding noise of zero is not determined):
  mu, sqrt(nu) and the update where |g| is far above the gradients' error bound
  (``helpers.assert_adamw_step_matches``).
- Two momentum-SGD steps: the update is linear in the gradients and inherits their 1e-5
  (``helpers.assert_sgd_steps_match``).
"""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import (
    FF_PLAN,
    LM_PLAN,
    adamw,
    assert_adamw_step_matches,
    assert_sgd_steps_match,
    ff_batch,
    ff_factory,
    ff_loss,
    lm_batch,
    lm_factory,
    lm_loss,
    make_fns,
    momentum_sgd,
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
        graphdef, params = nnx.split(factory()(), nnx.Param)
        adamw_step, sgd_steps = make_fns(graphdef, loss_fn)
        batch = batch_fn()
        loss, out, grads, new, opt = jax.jit(adamw_step)(params, adamw().init(params), batch)
        sgd_new, sgd_opt = jax.jit(sgd_steps)(params, momentum_sgd().init(params), batch)
        sgd = dict(params=params, new=sgd_new, trace=sgd_opt[0].trace)
        _REF[name] = dict(params=params, loss=loss, out=out, grads=grads, new=new, adam=opt[0])
        _REF[name]["sgd"] = sgd
    return _REF[name]


_REF: dict = {}


@pytest.mark.parametrize("fsdp", [False, True], ids=["tp", "fsdp"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(CASES))
def test_matches_unsharded(name, shape, fsdp):
    factory, plan, loss_fn, batch_fn = CASES[name]
    ref = _reference(name)
    mesh = jtp.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])

    model = jtp.sharded_init(factory(), mesh, plan, fsdp=fsdp)
    graphdef, params = nnx.split(model, nnx.Param)
    assert rel_err(params, ref["params"]) == 0.0, "sharded init must equal the unsharded init"

    # Every parameter sits exactly where the plan says, with the expected shard shape.
    placements = {p.path: p for p in jtp.resolve(model, mesh, plan, fsdp=fsdp)}
    for path, var in nnx.to_flat_state(params):
        key = ".".join(map(str, path))
        arr = var.get_value()
        assert arr.sharding.spec == placements[key].spec, key
        assert arr.sharding.shard_shape(arr.shape) == shard_shape(placements[key], mesh), key

    opt_state = jtp.init_opt_state(adamw(), params)
    sgd_state = jtp.init_opt_state(momentum_sgd(), params)
    # Adam's moments and the momentum are sharded exactly like their parameters; the step
    # count is replicated.
    adam = opt_state[0]
    for moments in (adam.mu, adam.nu, sgd_state[0].trace):
        jax.tree.map(lambda m, p: _assert_same_layout(m, p), moments, params)
    assert adam.count.sharding.is_fully_replicated

    adamw_step, sgd_steps = make_fns(graphdef, loss_fn)
    batch = jtp.shard_batch(batch_fn(), mesh)
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    adam_sh = (None, None, None, param_sh, jtp.opt_state_shardings(adamw(), params))
    loss, out, grads, new, opt = jax.jit(adamw_step, out_shardings=adam_sh)(
        params, opt_state, batch
    )
    assert rel_err(out, ref["out"]) < 1e-5  # seen <= 2.7e-7: contractions reordered
    # A mean of positive terms (squares, cross-entropies): no cancellation, so relative
    # (seen <= 1.9e-7).
    assert abs(float(loss) - float(ref["loss"])) <= 1e-5 * abs(float(ref["loss"]))
    assert_adamw_step_matches(dict(params=params, grads=grads, new=new, adam=opt[0]), ref)

    sgd_sh = (param_sh, jtp.opt_state_shardings(momentum_sgd(), params))
    sgd_new, sgd_opt = jax.jit(sgd_steps, out_shardings=sgd_sh)(params, sgd_state, batch)
    assert_sgd_steps_match(dict(params=params, new=sgd_new, trace=sgd_opt[0].trace), ref["sgd"])


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
