"""A model out of a training checkpoint: parameters and the rest restored onto another mesh
and layout, the optimizer state never read; the JSON record read without any array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import FF_PLAN, ff_factory

import jtp
from jtp.checkpoint.model import open_checkpoints, restore_model
from jtp.parallel.abstract import abstract_sharded


def test_restore_model_reads_params_and_rest_only(tmp_path):
    """Saved on (2, 4) with fsdp beside an optimizer state, restored onto (1, 8) without:
    bitwise the saved parameters, in the target's shardings. Entries the target lacks are
    not asked for (the full restore of the same subset is refused, as before)."""
    mesh = jtp.make_mesh(2, 4)
    model = jtp.sharded_init(ff_factory(), mesh, FF_PLAN, fsdp=True)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    opt = {"mu": jax.tree.map(jnp.zeros_like, params), "count": jnp.int32(7)}
    ckpt = jtp.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(3, {"params": params, "opt_state": opt, "rest": rest}, {"step": 3, "note": "x"})
    assert ckpt.meta() == ({"step": 3, "note": "x"}, 3)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 5 .*steps there: \[3\]"):
        ckpt.meta(5)
    ckpt.close()

    other = jtp.make_mesh(1, 8)
    abstract = abstract_sharded(nnx.eval_shape(ff_factory()), other, FF_PLAN)
    restored, meta, step = restore_model(str(tmp_path / "ck"), abstract)
    assert (meta["note"], step) == ("x", 3)
    want = nnx.state(model, nnx.Param)
    got = nnx.state(restored, nnx.Param)
    for a, b, target in zip(
        jax.tree.leaves(want),
        jax.tree.leaves(got),
        jax.tree.leaves(nnx.state(abstract)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == target.sharding and b.sharding.mesh == other
    _, params_like, rest_like = nnx.split(abstract, nnx.Param, ...)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):  # all-or-nothing restore
        open_checkpoints(str(tmp_path / "ck")).restore({"params": params_like, "rest": rest_like})


def test_open_checkpoints_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="--checkpoint .*nope: no such directory"):
        open_checkpoints(str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()  # not created by asking
