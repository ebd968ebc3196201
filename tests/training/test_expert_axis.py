"""Outside the MoE layers the "expert" axis is data-like: a dense model trained on
("data", "expert", "tensor") learns exactly what it does on one device; the loader, fsdp,
accumulation's per-rank gradients and checkpoints (saved on expert=2, restored onto expert=4
and onto a mesh without the axis) all treat (data, expert) as the batch ranks.

Tolerances as test_trainer's (momentum SGD, whose update is linear in the gradients: the
gradients' 1e-5 from fp32 sums reordered across shards; losses are means of squares, no
cancellation, 1e-5 relative)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err
from test_trainer import DIM, LitFF, _assert_sgd_matches, reference_loop

import jtp

SHAPES = {"2x2x2": (2, 2, 2), "1x4x2": (1, 4, 2), "1x8x1": (1, 8, 1)}


def _trainer(shape, **kw):
    data, expert, tensor = shape
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("logger", None)
    kw.setdefault("report_memory", False)
    strategy = jtp.ModelParallelStrategy(
        data, tensor, expert_parallel_size=expert, fsdp=kw.pop("fsdp", False)
    )
    return jtp.Trainer(strategy, **kw)


@pytest.mark.parametrize("fsdp", [False, True], ids=["tp", "fsdp"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_dense_fit_on_an_expert_mesh_matches_one_device(shape, fsdp):
    trainer = _trainer(shape, max_epochs=2, fsdp=fsdp)
    trainer.fit(LitFF(fsdp=fsdp, optimizer="sgd"))
    ref_losses, ref_params, ref_opt = reference_loop(2)
    np.testing.assert_allclose(trainer.losses, ref_losses, rtol=1e-5)
    _assert_sgd_matches(trainer, ref_params, ref_opt, steps=8)
    mesh = trainer.mesh
    assert mesh.axis_names == ("data", "expert", "tensor")
    if fsdp:  # parameters split over every batch rank: (data, expert) on the non-tensor dim
        w1 = nnx.state(trainer.model, nnx.Param)["w1"]["kernel"].get_value()
        assert w1.sharding.spec == jax.sharding.PartitionSpec(("data", "expert"), "tensor")


def test_accumulation_per_rank_on_an_expert_mesh():
    """k = 4 micro-batches, gradients reduced once per step (per_step): the vmap over batch
    ranks spans (data, expert), and the result is the 8-step one-device loop's."""
    trainer = _trainer((2, 2, 2), max_epochs=2, accumulate_grad_batches=2, grad_reduce="per_step")
    trainer.fit(LitFF(batch_size=4, optimizer="sgd"))
    ref_losses, ref_params, ref_opt = reference_loop(2, batch_size=4, accumulate=2)
    _assert_sgd_matches(trainer, ref_params, ref_opt, steps=8)


def test_loader_rows_per_batch_rank():
    """Batch rank r = d * expert + x holds rows r*B/R:(r+1)*B/R, as on a (data=R) mesh."""
    ds = jtp.RandomDataset(DIM, 32, seed=7)
    mesh = jtp.make_mesh(data=2, expert=2, tensor=2)
    flat = jtp.make_mesh(data=4, tensor=2)
    a = next(iter(jtp.DataLoader(ds, 8, mesh=mesh, shuffle=True, seed=1)))
    b = next(iter(jtp.DataLoader(ds, 8, mesh=flat, shuffle=True, seed=1)))
    assert a.sharding.spec[0] == ("data", "expert")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for shard in a.addressable_shards:
        assert shard.data.shape == (2, DIM)
    jtp.check_replicas(a)
    with pytest.raises(ValueError, match=r"\('data', 'expert'\) of size 4"):
        jtp.DataLoader(ds, 6, mesh=mesh)


@pytest.mark.parametrize("target", [(1, 4, 2), (4, 1, 2)], ids=["to-expert4", "to-no-expert"])
def test_checkpoint_from_expert2_restores_elsewhere(tmp_path, target):
    """Saved on (2, 2, 2) with fsdp (parameters split over data x expert), restored onto
    expert=4 and onto ("data", "tensor"): the parameters bitwise, the metadata names the mesh."""
    ck = str(tmp_path / "ck")
    common = dict(default_root_dir=str(tmp_path / "runs"), checkpoint_dir=ck)
    first = _trainer((2, 2, 2), max_steps=3, fsdp=True, **common)
    first.fit(LitFF(fsdp=True, optimizer="sgd"))
    saved = nnx.state(first.model, nnx.Param)
    meta = json.loads((tmp_path / "ck" / "3" / "meta" / "metadata").read_text())
    assert meta["mesh"] == {"data": 2, "expert": 2, "tensor": 2}
    second = _trainer(target, max_steps=3, fsdp=target[1] > 1, **common)
    second.fit(LitFF(fsdp=target[1] > 1, optimizer="sgd"), resume=True)
    assert second.first_step == 3 and not second.losses
    restored = nnx.state(second.model, nnx.Param)
    assert rel_err(restored, saved) == 0.0
    if target[1] == 1:
        assert second.mesh.axis_names == ("data", "tensor")
    w1 = restored["w1"]["kernel"].get_value()
    assert w1.sharding.mesh == second.mesh


def test_llama_plan_refuses_an_expert_axis_it_cannot_split():
    from jtp.models.llama import LlamaConfig
    from jtp.models.plans import check_llama

    mesh = jtp.make_mesh(data=2, expert=2, tensor=2)
    with pytest.raises(ValueError, match=r"this model is dense \(n_experts=0\)"):
        check_llama(LlamaConfig(), mesh)
    moe = LlamaConfig(n_experts=6, experts_per_token=2)
    with pytest.raises(ValueError, match=r"n_experts=6 is not divisible by mesh axis 'expert' of"):
        check_llama(moe, jtp.make_mesh(expert=4, tensor=2))
    check_llama(moe, mesh)  # 6 experts over 2: three each


@pytest.mark.parametrize("target", [(1, 4, 2), (2, 1, 4)], ids=["to-expert4", "to-no-expert"])
def test_a_moe_checkpoint_from_expert2_restores_elsewhere(tmp_path, target):
    """A MoE Llama (tiny-moe) trained on data 2 x expert 2 x tensor 2 with fsdp, its stacked
    experts split (E over "expert", F over "tensor", the rest over "data"), restored onto
    expert 4 and onto a mesh without the axis (experts then over "tensor"): every parameter
    bitwise, each laid out as the new mesh's plan says."""
    from jtp.models.plans import experts
    from jtp.recipes import LlamaTask, LlamaTaskConfig

    def task(fsdp):
        return LlamaTask(LlamaTaskConfig(preset="tiny-moe", seq_len=16, batch_size=8, fsdp=fsdp))

    ck = str(tmp_path / "ck")
    common = dict(default_root_dir=str(tmp_path / "runs"), checkpoint_dir=ck)
    first = _trainer((2, 2, 2), max_steps=2, fsdp=True, **common)
    first.fit(task(True))
    saved = nnx.state(first.model, nnx.Param)
    second = _trainer(target, max_steps=2, **common)
    second.fit(task(False), resume=True)
    assert second.first_step == 2 and not second.losses
    restored = nnx.state(second.model, nnx.Param)
    assert rel_err(restored, saved) == 0.0
    w1 = restored["layers"]["feed_forward"]["experts"]["w1"].get_value()
    spec = tuple(w1.sharding.spec)[1:]  # behind the scanned layer axis
    want = ("expert", None, "tensor") if target[1] > 1 else tuple(experts(8, second.mesh))
    assert spec[: len(want)] == want[: len(spec)] and w1.sharding.mesh == second.mesh
