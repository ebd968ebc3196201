"""Communication asserted from the compiled HLO, not assumed.

A column layer feeding a row layer costs one all-reduce over "tensor" and nothing else; the
weights are never gathered in pure TP; data-parallel gradient reduction runs over "data".
"""

import jax
import numpy as np
import optax
from flax import nnx
from helpers import FF_PLAN, ff_factory

import jtp
from jtp.analysis.collectives import collectives

B, DIM, HIDDEN = 8, 64, 256


def _model(shape, fsdp=False):
    mesh = jtp.make_mesh(*shape)
    return mesh, jtp.sharded_init(ff_factory(DIM, HIDDEN), mesh, FF_PLAN, fsdp=fsdp)


def _x(mesh):
    return jtp.shard_batch(np.ones((B, DIM), np.float32), mesh)


def _train_step_compiled(mesh, model):
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-3)
    opt_state = jtp.init_opt_state(tx, params)
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    opt_sh = jtp.opt_state_shardings(tx, params)

    def step(params, opt_state, x):
        grads = jax.grad(lambda p: nnx.merge(graphdef, p)(x).sum())(params)
        grads = jax.lax.with_sharding_constraint(grads, param_sh)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    jitted = jax.jit(step, out_shardings=(param_sh, opt_sh), donate_argnums=(0, 1))
    return jitted.lower(params, opt_state, _x(mesh)).compile(), params


def test_forward_tp8_is_one_all_reduce():
    mesh, model = _model((1, 8))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    colls = collectives(fwd.lower(state, _x(mesh)).compile(), mesh)
    assert [(c.kind, c.axes, c.bytes) for c in colls] == [("all-reduce", ("tensor",), B * DIM * 4)]


def test_train_step_tp8_never_gathers_weights():
    mesh, model = _model((1, 8))
    compiled, params = _train_step_compiled(mesh, model)
    colls = collectives(compiled, mesh)
    assert not [c for c in colls if c.kind == "all-gather"], colls
    # Only activations may cross devices, over "tensor": nothing weight-sized.
    assert all(c.axes == ("tensor",) and c.bytes <= B * DIM * 4 for c in colls), colls


def test_train_step_2x4_reduces_gradients_over_data_only():
    mesh, model = _model((2, 4))
    compiled, params = _train_step_compiled(mesh, model)
    colls = collectives(compiled, mesh)
    grad_bytes = sum(
        p.sharding.shard_shape(p.shape)[0] * p.sharding.shard_shape(p.shape)[1] * 4
        for p in jax.tree.leaves(params)
    )
    over_data = [c for c in colls if c.kind == "all-reduce" and c.axes == ("data",)]
    # Every gradient shard is summed across the 2 data replicas exactly once (XLA combines
    # the three into one tuple all-reduce), and gradients never cross the tensor axis.
    assert sum(c.bytes for c in over_data) == grad_bytes, colls
    assert not [c for c in colls if c.kind == "all-gather"], colls
    # Anything else may only be an activation-sized reduction over "tensor" (here XLA even
    # folds the forward all-reduce into the sum loss).
    others = [c for c in colls if c not in over_data]
    assert all(c.axes == ("tensor",) and c.bytes <= B * DIM * 4 for c in others), colls


def test_fsdp_2x4_gathers_weights_over_data():
    """2D: the FSDP half of the layout is paid for with weight all-gathers over "data"."""
    mesh, model = _model((2, 4), fsdp=True)
    compiled, _ = _train_step_compiled(mesh, model)
    colls = collectives(compiled, mesh)
    weight_bytes = DIM * HIDDEN * 4 // 4  # one kernel's tensor shard, gathered over "data"
    gathers = [c for c in colls if c.kind == "all-gather" and c.bytes == weight_bytes]
    assert len(gathers) == 3 and all(c.axes == ("data",) for c in gathers), colls
