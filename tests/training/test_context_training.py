"""Training with context parallelism end to end: the Llama task on meshes with a "context"
axis (its batches in the balanced order, :class:`jtp.parallel.context.NextTokenPieces`)
through the real ``Trainer``, against the same task on one device.

Why 1e-5 (float32). Each token's arithmetic is the same on both sides; what differs is only
the order of sums: a query's softmax runs over the keys gathered from the pieces (the
balanced order, position-masked) instead of 0..T-1, the loss's mean over tokens and every
weight's gradient are summed per device's tokens and then over "data" and "context", the
tensor-parallel matmuls add partial products, and fsdp reduce-scatters. Each reordering of
an n-term float32 sum moves it by at most ~n eps relative (eps = 2**-23 ~ 1.2e-7), with
n <= 128 tokens or 384 hidden features here, and the errors do not compound over two small
optimizer steps. Seen: losses <= 2e-7 relative, the momentum (gradient) traces ~1.5e-6
norm-relative. An error in the pieces (a wrong position, a key seen out of causal order, a
piece's gradient lost) moves the loss by more: positions 0..T-1 given to pieces in the
balanced order change this model's first loss by 3.7e-3.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from helpers import rel_err

import jtp
from jtp.recipes import LlamaTask, LlamaTaskConfig
from jtp.training.trainer import Trainer

T, LR = 32, 0.05
TOL = 1e-5
BF16_TOL = 1e-3


class SGDTask(LlamaTask):
    """The Llama task with momentum SGD: its update is linear in the gradients, so the
    momentum trace compares gradients and the parameters compare updates, without Adam's
    division by ~|g| that magnifies differences of gradients near zero."""

    def configure_optimizers(self) -> optax.GradientTransformation:
        return optax.sgd(LR, momentum=0.9)


def config(**overrides) -> LlamaTaskConfig:
    """The tiny preset (2 layers, width 128), T = 32, 16 random samples of 4 rows a batch."""
    return LlamaTaskConfig(
        **{"preset": "tiny", "seq_len": T, "batch_size": 4, "samples": 16, **overrides}
    )


def trainer(data, context, tensor, *, fsdp=False, devices=None, **options) -> jtp.Trainer:
    n = data * context * tensor
    strategy = jtp.ModelParallelStrategy(
        data,
        tensor,
        context_parallel_size=context,
        fsdp=fsdp,
        devices=(devices or jax.devices())[:n],
    )
    options = {"enable_progress_bar": False, "logger": None, "report_memory": False, **options}
    return jtp.Trainer(strategy, **options)


def trace(opt_state) -> object:
    """The momentum SGD trace (sum of the steps' gradients, decayed) as numpy."""
    (state,) = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
        if isinstance(s, optax.TraceState)
    ]
    return jax.tree.map(np.asarray, state.trace)


def params(t: jtp.Trainer) -> object:
    from flax import nnx

    return jax.tree.map(np.asarray, nnx.state(t.model, nnx.Param))


# Two optimizer steps of 2 micro-batches each (accumulation), remat, scanned layers (the
# preset's default): the options both sides run.
RUN = dict(max_steps=2, accumulate_grad_batches=2, grad_reduce="per_step")


@pytest.fixture(scope="module")
def one_device():
    """The reference: the same task and options on one device (no context axis: (B, T + 1)
    token batches in order)."""
    t = trainer(1, 1, 1, **RUN)
    t.fit(SGDTask(config(remat="full")))
    return t


def test_fit_on_data2_context2_tensor2_equals_one_device(one_device):
    """data 2 x context 2 x tensor 2 with fsdp, sequence and loss parallelism, remat, the
    scanned layers and per-data-rank accumulation (the vmap over "data" with the pieces
    inside): the two steps' losses, the gradients (momentum trace) and the updated
    parameters equal one device's within 1e-5 (module docstring)."""
    t = trainer(2, 2, 2, fsdp=True, **RUN)
    task = SGDTask(config(remat="full", fsdp=True, sequence_parallel=True, loss_parallel=True))
    t.fit(task)
    assert t.mesh.axis_names == ("data", "context", "tensor")
    losses, ref = np.asarray(t.losses), np.asarray(one_device.losses)
    print(f"losses {np.abs(losses - ref).max() / ref.max():.1e}", end=" ")
    print(f"trace {rel_err(trace(t.opt_state), trace(one_device.opt_state)):.1e}")
    np.testing.assert_allclose(losses, ref, rtol=TOL)
    assert losses[1] < losses[0] - 1e-3  # the step changed the parameters
    assert rel_err(trace(t.opt_state), trace(one_device.opt_state)) < TOL
    assert rel_err(params(t), params(one_device)) < TOL


# Resume across context sizes: saved on context 2 x tensor 2 (4 devices), restored onto
# context 4 and onto one device (no context axis, nothing split).
SOURCE = (1, 2, 2)  # (data, context, tensor)
TARGETS = {"context2": SOURCE, "context4": (1, 4, 1), "no-context": (1, 1, 1)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two steps on the source mesh, checkpointed after each by the trainer (orbax); the
    state it saved at step 1 (numpy), the losses and the final parameters."""
    root = tmp_path_factory.mktemp("resume")
    states = {}
    save = Trainer._save

    def recording(self, ckpt, loader, **kwargs):
        states[self.global_step] = jax.device_get(self._state.tree())
        save(self, ckpt, loader, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_save", recording)
        t = trainer(*SOURCE, **_checkpoints(root), max_steps=2, checkpoint_every_n_steps=1)
        t.fit(SGDTask(config()))
    assert sorted(states) == [1, 2]
    return root, states[1], t.losses, params(t)


def _checkpoints(root) -> dict:
    return {"checkpoint_dir": str(root / "ck"), "default_root_dir": str(root / "runs")}


@pytest.mark.parametrize("target", TARGETS)
def test_resume_across_context_sizes(saved, tmp_path, monkeypatch, target):
    """Step 1's checkpoint (copied alone, so it is the newest) resumed onto ``target``:

    - parameters and optimizer state restored bitwise equal to what was saved (orbax
      copies bytes and reshards; no arithmetic touches them);
    - on the source mesh the second step is the same program (the same mesh, options and
      shapes trace and compile to the same executable) on the same state and batch (the
      loader resumes at its position): loss and parameters bitwise those of the
      uninterrupted run;
    - on context 4 and without the axis it is another program (the sums ordered
      differently): loss and parameters within 1e-5 (module docstring).
    """
    root, state1, losses, final = saved
    shutil.copytree(root / "ck" / "1", tmp_path / "ck" / "1")
    restored = []
    resume = Trainer._resume

    def recording(self, ckpt, loader):
        resume(self, ckpt, loader)
        restored.append(jax.device_get(self._state.tree()))

    monkeypatch.setattr(Trainer, "_resume", recording)
    t = trainer(*TARGETS[target], **_checkpoints(tmp_path), max_steps=2)
    t.fit(SGDTask(config()), resume=True)
    assert t.first_step == 1 and len(t.losses) == 1
    assert dict(t.mesh.shape).get("context", 1) == TARGETS[target][1]
    for part in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, restored[0][part], state1[part])
    if target == "context2":
        assert t.losses[0] == losses[1]
        jax.tree.map(np.testing.assert_array_equal, params(t), final)
    else:
        print(f"{target}: loss {abs(t.losses[0] - losses[1]) / losses[1]:.1e}")
        assert abs(t.losses[0] - losses[1]) <= TOL * losses[1]
        assert rel_err(params(t), final) < TOL


# A mixture of experts on a context mesh: the layer's B * T tokens split over the batch
# axes and "context" (jtp.parallel.experts), routed and run where they are.
MOE_MESH = (1, 2, 2, 2)  # (data, expert, context, tensor)


def moe_task() -> LlamaTask:
    """tiny-moe (8 experts, top-2) cut to one sparse layer, unrolled: half the compile."""
    task = LlamaTask(config(preset="tiny-moe", batch_size=8, router_z_loss_coef=0.01))
    shapes = dataclasses.replace(task.shapes, n_layers=1, scan_layers=False)
    return LlamaTask(task.config, model_config=shapes)


def _moe_rows(k: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 512, (8, T + 1), dtype=np.int32) for _ in range(k)]


@pytest.fixture(scope="module")
def moe_reference():
    """One device: jax.grad of the mean over 2 micro-batches of each one's loss (cross-
    entropy + the router's auxiliary and z losses), and their metrics."""
    from flax import nnx

    from jtp.models.llama import Llama
    from jtp.recipes.objective import next_token_loss

    graphdef, p = nnx.split(Llama(moe_task().shapes, rngs=nnx.Rngs(0)), nnx.Param)

    @jax.jit
    def loss_and_grads(p, rows):
        return jax.value_and_grad(
            lambda p: next_token_loss(nnx.merge(graphdef, p), rows), has_aux=True
        )(p)

    outs = [loss_and_grads(p, rows) for rows in _moe_rows(2)]
    loss = np.mean([float(o[0][0]) for o in outs])
    grads = jax.tree.map(lambda *g: np.mean(g, axis=0), *[o[1] for o in outs])
    return loss, [jax.device_get(o[0][1]) for o in outs], grads


def test_moe_step_on_expert2_context2_tensor2_equals_one_device(moe_reference):
    """The trainer's compiled step (2 micro-batches, per-data-rank accumulation) of a tiny
    MoE Llama on expert 2 x context 2 x tensor 2: the tokens split over ("expert",
    "context"), the experts over "expert" (all-to-all exchange) and their F over "tensor".
    8 rows a batch, 4 per batch rank: a device's piece is not a run of whole rows, so the
    tokens are also exchanged over "context" around the experts. Its gradient (Adam's
    first mu / 0.1) and loss within 1e-5 of one device's, the routing the same (expert
    loads equal exactly: no near-tie flipped)."""
    from test_moe_training import adam_mu_grads

    from jtp.parallel.context import next_token_pieces
    from jtp.training.compile import build_state, compile_train_step, train_step
    from jtp.training.options import TrainerOptions

    data, expert, context, tensor = MOE_MESH
    task = moe_task()
    strategy = jtp.ModelParallelStrategy(
        data, tensor, expert_parallel_size=expert, context_parallel_size=context
    )
    options = TrainerOptions(accumulate_grad_batches=2, grad_reduce="per_step")
    state, rules = build_state(task, strategy, options)
    step = train_step(task, state, options, fsdp=False)
    batches = []
    for rows in _moe_rows(2):
        pieces = next_token_pieces(rows, context)
        pieces["positions"] = np.broadcast_to(pieces["positions"], pieces["inputs"].shape)
        batches.append(jtp.shard_batch(pieces, strategy.mesh))
    compiled = compile_train_step(step, state, batches, rules)
    _, opt_state, _, metrics = compiled(*state.arrays(), batches)
    loss, ref_metrics, grads = moe_reference
    err = rel_err(adam_mu_grads(opt_state), grads)
    print(f"gradient {err:.1e} loss {abs(float(metrics['loss']) - loss) / loss:.1e}")
    assert err < TOL
    assert abs(float(metrics["loss"]) - loss) <= TOL * loss
    want = np.mean([float(m["expert_load_max"]) for m in ref_metrics])
    assert float(metrics["expert_load_max"]) == want


def test_the_loader_lays_out_pieces_and_check_replicas_catches_a_corrupted_one():
    """On data 2 x context 2 x tensor 2 the Llama task's loader yields the balanced pieces
    of the very rows a mesh without the axis gets (next_token_pieces of them), each leaf
    (B, T) split P("data", "context"); check_replicas passes, and one device's piece made
    to differ from its tensor partner's (same rows, same piece) is named."""
    from jax.sharding import PartitionSpec as P

    from jtp.parallel.context import next_token_pieces

    def first_batch(mesh):
        task = LlamaTask(config())
        task.mesh = mesh
        return next(iter(task.train_dataloader()))

    mesh = jtp.make_mesh(data=2, context=2, tensor=2)
    batch = first_batch(mesh)
    plain = np.asarray(first_batch(jtp.make_mesh(data=2, tensor=4)))  # (B, T + 1) ids
    want = next_token_pieces(plain, 2)
    for name in ("inputs", "labels", "positions"):
        leaf = batch[name]
        assert leaf.shape == (4, T) and leaf.sharding.spec == P("data", "context")
        assert {s.data.shape for s in leaf.addressable_shards} == {(2, T // 2)}
        np.testing.assert_array_equal(np.asarray(leaf), np.broadcast_to(want[name], (4, T)))
    jtp.check_replicas(batch)

    labels = batch["labels"]
    shards = list(labels.addressable_shards)
    (partner,) = [  # device 0's tensor partner: the same rows and piece
        s for s in shards[1:] if s.index == shards[0].index
    ]
    arrays = [
        jax.device_put(np.asarray(s.data) + (s is partner), s.device) for s in shards
    ]  # fmt: skip
    bad = jax.make_array_from_single_device_arrays(labels.shape, labels.sharding, arrays)
    with pytest.raises(ValueError, match=r"batch leaf \['labels'\] differ: \[device 0"):
        jtp.check_replicas({**batch, "labels": bad})


def test_the_cli_trains_bf16_mixed_with_context_parallel(one_device, tmp_path):
    """``python -m jtp.train --context-parallel 2 --context-attention ring --precision
    bf16-mixed`` on data 2 x context 2 x tensor 2, with the reference's data, remat and
    accumulation (the Trainer test above takes the default all-gather): the metrics
    name the mesh, two steps train, every batch's replicas are checked (dict batches of
    pieces), and the first loss (taken before any update, so the CLI's AdamW does not
    enter it) is within 1e-3 relative of one device's float32 one.

    Why 1e-3: bf16 rounds each matmul's inputs and outputs to 8 significant bits (unit
    roundoff 2**-9 ~ 2e-3 per value); the loss is a mean of 2 x 128 token cross-entropies,
    each 1-Lipschitz in its logits, so those roundings mostly average out: seen 3e-5. 1e-3
    is half a bf16 ulp of the loss, and still 4x below what one misplaced piece does (the
    pieces at positions 0..T-1 instead of theirs: 3.7e-3 at this initialisation)."""
    from jtp.cli.train import main

    out = tmp_path / "m.json"
    argv = [
        "--devices", "8", "--model", "llama", "--data-parallel", "2", "--context-parallel",
        "2", "--tensor-parallel", "2", "--seq-len", str(T), "--batch-size", "4",
        "--samples", "16", "--remat", "--accumulate-grad-batches", "2",
        "--grad-reduce", "per_step", "--precision", "bf16-mixed", "--max-steps", "2",
        "--check-replicas", "1", "--no-progress", "--context-attention", "ring",
        "--default-root-dir", str(tmp_path / "runs"), "--metrics-json", str(out),
    ]  # fmt: skip
    metrics = main(argv)
    assert metrics["mesh"] == {"data": 2, "context": 2, "tensor": 2}
    assert metrics["config"]["context_attention"] == "ring"
    assert metrics["config"]["context_parallel"] == 2
    assert metrics["steps"] == 2 and all(np.isfinite(metrics["losses"]))
    want = one_device.losses[0]
    print(f"bf16 {abs(metrics['losses'][0] - want) / want:.1e}")
    assert abs(metrics["losses"][0] - want) <= BF16_TOL * want


EVAL = os.path.join(os.path.dirname(__file__), "..", "fixtures")


def test_eval_cli_on_a_context_mesh_scores_as_transformers():
    """``python -m jtp.eval --context-parallel 2`` on data 2 x context 2 x tensor 2 scores
    the llama3 fixture's 10 windows of 8 (batches 4, 4 and a padded 2: the pieces go
    through the padded-batch recovery too) at transformers' loss, within test_eval's 2e-5
    (float32 logits of the same weights, reductions in another order: seen ~1e-7)."""
    from jtp.cli.eval import main

    with open(os.path.join(EVAL, "eval", "llama3", "reference.json")) as f:
        (ref,) = [c for c in json.load(f)["cases"] if (c["split"], c["seq_len"]) == ("val", 8)]
    argv = [
        "--hf", os.path.join(EVAL, "hf", "llama3"), "--data", os.path.join(EVAL, "eval", "llama3"),
        "--batch-size", "4", "--seq-len", "8", "--data-parallel", "2", "--context-parallel",
        "2", "--tensor-parallel", "2",
    ]  # fmt: skip
    r = main(argv)
    assert r["mesh"] == {"data": 2, "context": 2, "tensor": 2}
    assert (r["windows"], r["batches"]) == (10, 3)
    print(f"eval {abs(r['loss'] - ref['loss']) / ref['loss']:.1e}")
    assert abs(r["loss"] - ref["loss"]) <= 2e-5 * ref["loss"]
