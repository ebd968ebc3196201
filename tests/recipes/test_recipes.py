"""The Llama recipe works a task out in one place (``resolve``): the model's shapes once,
then for each mesh its kv replicas and its plan, and everything downstream (the model
factory, the HF reader, the capacity planner's compile) takes that result."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import jtp
from jtp.models.hf.config import read_config
from jtp.recipes import LlamaTask, LlamaTaskConfig, resolve
from jtp.recipes.llama import model_shapes, trace_llama_step

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
T = 16


def test_the_task_runs_what_resolve_says_for_its_mesh():
    """The task's setup on a mesh is ``resolve(config, shapes, mesh)``'s, and its model is
    built from it: the checkpoint's 2 kv heads get 4 copies on tensor 8 (wk / wv whole in
    the plan), none on tensor 2; the shapes are read once and kept."""
    config = LlamaTaskConfig(hf=str(FIXTURES / "llama_kv2"), seq_len=T)
    task = LlamaTask(config)
    assert task.shapes == model_shapes(config) and task.shapes.kv_replicas == 1
    for mesh, copies in ((jtp.make_mesh(1, 8), 4), (jtp.make_mesh(4, 2), 1)):
        factory = task.model_factory(mesh)
        again = resolve(config, task.shapes, mesh)  # TPPlan compares by its two maps
        assert task.model_config == again.model and task.plan.styles == again.plan.styles
        assert task.plan.activations == again.plan.activations
        assert task.model_config.kv_replicas == copies
        assert ("layers.*.attention.wk" in task.plan) == (copies == 1)
        assert nnx.eval_shape(factory).config == task.model_config


def test_the_hf_task_reads_its_weights_under_the_resolved_plan():
    """``configure_model`` reads the checkpoint once, straight into the resolved layout
    (``load_weights``): every parameter equals, value and sharding, what the public
    ``load_pretrained`` gives on the same mesh (equal to the bit: the same file slices)."""
    mesh = jtp.make_mesh(2, 4)
    src = str(FIXTURES / "llama3")
    task = LlamaTask(LlamaTaskConfig(hf=src, seq_len=T, fsdp=True))
    model = task.configure_model(mesh)
    reference = jtp.hf.load_pretrained(src, mesh, fsdp=True, max_seq_len=T)
    got, want = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(reference))
    for (path, a), (_, b) in zip(got, want, strict=True):
        assert a.get_value().sharding == b.get_value().sharding, path
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_a_recorded_or_cut_model_replaces_the_shapes_without_reading_them(monkeypatch):
    """Given ``model_config`` (a checkpoint's record, the planner's model cut to fewer
    layers), the task takes it as its shapes: config.json is not read again."""
    config = LlamaTaskConfig(hf=str(FIXTURES / "llama3"), seq_len=T)
    shapes = dataclasses.replace(model_shapes(config), n_layers=1)
    reads = []

    def counted(path):
        reads.append(path)
        return read_config(path)

    for module in ("jtp.recipes.llama", "jtp.models.hf.load"):  # where it is called from
        monkeypatch.setattr(f"{module}.read_config", counted)
    traced, mesh = trace_llama_step(config, (1, 8), jax.devices(), model_config=shapes)
    assert reads == [] and mesh.shape == {"data": 1, "tensor": 8}
    assert traced.jaxpr is not None
    trace_llama_step(config, (1, 8), jax.devices(), n_layers=1)  # the shapes from the file
    assert reads  # (the count above would see them)


def test_plan_auto_refuses_the_activation_rules_it_cannot_infer():
    with pytest.raises(ValueError, match="--plan auto infers where parameters go"):
        LlamaTaskConfig(sequence_parallel=True, plan="auto")
