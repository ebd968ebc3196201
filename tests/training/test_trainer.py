"""Trainer vs a hand-written one-device loop; clipping, accumulation, eval, compile count.

The parity tests train with momentum SGD: its update is linear in the gradients, so the
parameters after several steps inherit the gradients' tolerance (fp32 sums reordered across
shards: 1e-5). AdamW's first steps are ~lr*sign(g) and the sign of a gradient within rounding
noise of zero is not determined, so several AdamW steps on two layouts are not comparable
element by element; its one-step parity is test_accumulation's. Why each tolerance holds:
docs/testing.md, "How tolerances are chosen"."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import FF_PLAN, assert_sgd_steps_match, backend_compiles, ff_factory

import jtp
from jtp.cli.train import main as train_main

DIM, HIDDEN, N, BATCH = 16, 64, 32, 8
OPTIMIZERS = {"adamw": optax.adamw, "sgd": lambda lr: optax.sgd(lr, momentum=0.9)}
CLIP = 0.25  # below every step's gradient norm here (0.89-1.43), so it acts at every step


class LitFF(jtp.TrainModule):
    """A tiny FeedForward with a bounded loss (mean square of the output)."""

    def __init__(self, batch_size=BATCH, lr=1e-2, fsdp=False, samples=N, optimizer="adamw"):
        self.batch_size, self.lr, self.fsdp, self.samples = batch_size, lr, fsdp, samples
        self.optimizer = optimizer

    def configure_model(self, mesh):
        return jtp.sharded_init(ff_factory(DIM, HIDDEN), mesh, FF_PLAN, fsdp=self.fsdp)

    def training_step(self, model, batch):
        out = model(batch)
        return jnp.mean(out**2), {"out_abs": jnp.abs(out).mean()}

    validation_step = test_step = training_step

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer](self.lr)

    def train_dataloader(self):
        ds = jtp.RandomDataset(DIM, self.samples, seed=7)
        return jtp.DataLoader(ds, self.batch_size, mesh=self.mesh, shuffle=True, seed=1)

    val_dataloader = test_dataloader = train_dataloader


def reference_loop(epochs, *, batch_size=BATCH, clip=None, accumulate=1, lr=1e-2, opt="sgd"):
    """The same training written by hand on one device, no jtp in the loop: losses, params,
    optimizer state."""
    model = ff_factory(DIM, HIDDEN)()
    graphdef, params = nnx.split(model, nnx.Param)
    tx = OPTIMIZERS[opt](lr)
    if clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    opt_state = tx.init(params)
    ds = jtp.RandomDataset(DIM, N, seed=7)
    order_src = jtp.DataLoader(ds, batch_size, mesh=jtp.make_mesh(1, 8), shuffle=True, seed=1)

    @jax.jit
    def step(params, opt_state, x):
        loss, grads = jax.value_and_grad(lambda p, x=x: jnp.mean(nnx.merge(graphdef, p)(x) ** 2))(
            params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for epoch in range(epochs):
        for b in range(len(order_src)):
            x = np.stack([ds[int(i)] for i in order_src.batch_indices(epoch, b)])
            params, opt_state, loss = step(params, opt_state, x)
            losses.append(float(loss))
    return losses, params, opt_state


def _trainer(shape, **kw):
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("logger", None)
    kw.setdefault("report_memory", False)
    return jtp.Trainer(jtp.ModelParallelStrategy(*shape), **kw)


def _trace(opt_state):
    """The momentum in an optimizer state (optax.sgd's TraceState, wherever a chain puts it)."""
    is_trace = lambda x: isinstance(x, optax.TraceState)  # noqa: E731
    return next(s.trace for s in jax.tree.leaves(opt_state, is_leaf=is_trace) if is_trace(s))


def _assert_sgd_matches(trainer, ref_params, ref_opt, steps):
    """Parameters and momentum after ``steps`` momentum-SGD steps vs the reference loop's
    (the trainer starts from the unsharded init exactly: test_parallelize)."""
    init = nnx.state(ff_factory(DIM, HIDDEN)(), nnx.Param)
    got = nnx.state(trainer.model, nnx.Param), _trace(trainer.opt_state)
    assert_sgd_steps_match(
        dict(params=init, new=got[0], trace=got[1]),
        dict(params=init, new=ref_params, trace=_trace(ref_opt)),
        steps=steps,
    )


@pytest.mark.parametrize("fsdp", [False, True], ids=["tp", "fsdp"])
def test_fit_2x4_matches_one_device_loop(fsdp):
    """Losses within 1e-5 relative (a mean of squares: no cancellation, only the sums'
    order differs); parameters and momentum after 8 momentum-SGD steps within the gradients'
    1e-5 (``helpers.assert_sgd_steps_match``)."""
    trainer = _trainer((2, 4), max_epochs=2, log_every_n_steps=3)
    trainer.fit(LitFF(fsdp=fsdp, optimizer="sgd"))
    ref_losses, ref_params, ref_opt = reference_loop(2)
    assert len(trainer.losses) == len(ref_losses) == 8
    np.testing.assert_allclose(trainer.losses, ref_losses, rtol=1e-5)
    _assert_sgd_matches(trainer, ref_params, ref_opt, steps=8)
    assert trainer.global_step == 8 and trainer.current_epoch == 2
    assert trainer.num_compiles == 1
    # Parameters and the momentum keep the plan's layout after training.
    params = nnx.state(trainer.model, nnx.Param)
    placements = {
        p.path: p.spec for p in jtp.resolve(trainer.model, trainer.mesh, FF_PLAN, fsdp=fsdp)
    }
    for path, var in nnx.to_flat_state(params):
        assert var.get_value().sharding.spec == placements[".".join(path)]
    trace = _trace(trainer.opt_state)
    for m, p in zip(jax.tree.leaves(trace), jax.tree.leaves(params), strict=True):
        assert m.sharding.spec == p.sharding.spec


def test_clipping_equals_unsharded_clipping():
    """Clipping by the global norm, under SGD, sets the size of every step: a norm taken
    over one shard instead of all would move every update (AdamW would normalise it away)."""
    trainer = _trainer((2, 4), max_epochs=1, gradient_clip_val=CLIP, track_grad_norm=True)
    trainer.fit(LitFF(optimizer="sgd"))
    ref_losses, ref_params, ref_opt = reference_loop(1, clip=CLIP)
    np.testing.assert_allclose(trainer.losses, ref_losses, rtol=1e-5)  # as in test_fit_2x4
    # The clip is active at every step: grad norms are above it.
    assert min(m["grad_norm"] for m in trainer.metrics_history) > 2 * CLIP
    _assert_sgd_matches(trainer, ref_params, ref_opt, steps=4)


def test_accumulation_equals_the_larger_batch():
    """2 accumulated batches of 4 == 1 batch of 8 (the loss is a mean over rows), when both
    see the same rows: the reference's batch b is the concatenation of our batches 2b, 2b+1.
    Momentum SGD, compared as in test_fit_2x4."""
    trainer = _trainer((2, 4), max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(LitFF(batch_size=4, optimizer="sgd"))
    assert trainer.global_step == 4 and len(trainer.losses) == 4  # one per optimizer step
    ref_losses, ref_params, ref_opt = reference_loop_pairs()
    _assert_sgd_matches(trainer, ref_params, ref_opt, steps=4)


def reference_loop_pairs():
    """One-device momentum SGD on batches of 8 made of the 4-row loader's consecutive pairs."""
    model = ff_factory(DIM, HIDDEN)()
    graphdef, params = nnx.split(model, nnx.Param)
    tx = OPTIMIZERS["sgd"](1e-2)
    opt_state = tx.init(params)
    ds = jtp.RandomDataset(DIM, N, seed=7)
    small = jtp.DataLoader(ds, 4, mesh=jtp.make_mesh(1, 8), shuffle=True, seed=1)
    losses = []
    for b in range(0, len(small), 2):
        idx = np.concatenate([small.batch_indices(0, b), small.batch_indices(0, b + 1)])
        x = np.stack([ds[int(i)] for i in idx])
        loss, grads = jax.value_and_grad(lambda p, x=x: jnp.mean(nnx.merge(graphdef, p)(x) ** 2))(
            params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return losses, params, opt_state


def test_validate_and_test():
    trainer = _trainer((4, 2))
    module = LitFF()
    val = trainer.validate(module)
    ref = trainer.test(module)
    assert set(val) == {"val_loss", "val_out_abs"} and set(ref) == {"test_loss", "test_out_abs"}
    # Reference: the mean of per-batch losses of the untrained model on one device.
    model = ff_factory(DIM, HIDDEN)()
    ds = jtp.RandomDataset(DIM, N, seed=7)
    losses = [
        float(jnp.mean(model(np.stack([ds[i] for i in range(b, b + 8)])) ** 2))
        for b in range(0, N, 8)
    ]
    # A mean of squares (no cancellation), summed in another order across the mesh: ulps.
    assert val["val_loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_one_compile_per_fit_whatever_the_length():
    """Counted from jax's own compile events: a longer fit compiles nothing more. A first fit
    also compiles what a process compiles once (and, run alone, this test's fit is the
    process's first), so the two compared fits follow one that warms up."""
    counts = []
    for epochs in (1, 1, 3):
        with backend_compiles() as events:
            trainer = _trainer((2, 4), max_epochs=epochs)
            trainer.fit(LitFF())
        counts.append(len(events))
        assert trainer.num_compiles == 1
    assert counts[1] == counts[2], counts


def test_max_steps_and_metrics_file(tmp_path):
    trainer = _trainer(
        (2, 4), max_epochs=5, max_steps=6, logger="jsonl", default_root_dir=str(tmp_path)
    )
    trainer.fit(LitFF())
    assert trainer.global_step == 6 and len(trainer.losses) == 6
    rows = [json.loads(line) for line in open(f"{trainer.log_dir}/metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == trainer.losses


def test_progress_bar_and_memory_report(capsys, tmp_path):
    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(1, 8), max_steps=2, default_root_dir=str(tmp_path)
    )
    trainer.fit(LitFF())
    out, err = capsys.readouterr()
    assert "it/s" in err and "samples/s" in err
    assert out.count("Peak memory usage:") == 8
    assert trainer.peak_memory_bytes_per_device > 0


def test_strategy_sizes():
    assert jtp.ModelParallelStrategy().mesh.shape == {"data": 1, "tensor": 8}
    assert jtp.ModelParallelStrategy(data_parallel_size=2).mesh.shape == {"data": 2, "tensor": 4}
    assert jtp.ModelParallelStrategy(tensor_parallel_size=2).mesh.shape == {"data": 4, "tensor": 2}
    with pytest.raises(
        ValueError,
        match=r"data_parallel_size=3 x tensor_parallel_size=2 = 6, but there are 8 devices",
    ):
        _ = jtp.ModelParallelStrategy(3, 2).mesh
    with pytest.raises(ValueError, match="tensor_parallel_size=0"):
        jtp.ModelParallelStrategy(tensor_parallel_size=0)


def test_cli_writes_metrics_json(tmp_path):
    path = tmp_path / "m.json"
    metrics = train_main(
        [
            "--devices",
            "8",
            "--data-parallel",
            "2",
            "--tensor-parallel",
            "4",
            "--dim",
            "32",
            "--hidden-dim",
            "64",
            "--samples",
            "32",
            "--no-progress",
            "--root-dir",
            str(tmp_path),
            "--metrics-json",
            str(path),
        ]
    )
    saved = json.loads(path.read_text())
    assert saved["mesh"] == {"data": 2, "tensor": 4}
    assert saved["steps"] == 4 and len(saved["losses"]) == 4 and saved["first_step"] == 0
    assert saved["losses"] == metrics["losses"]
    assert saved["peak_memory_bytes_per_device"] > 0
    assert all(np.isfinite(saved["losses"]))


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches=0 must be >= 1"),
        ({"log_every_n_steps": 0}, "log_every_n_steps=0 must be >= 1"),
        ({"gradient_clip_val": 0.0}, "gradient_clip_val=0.0 must be > 0 or None"),
        ({"precision": "fp16"}, r"precision='fp16' must be one of"),
        ({"logger": "mlflow"}, "logger must be 'csv', 'jsonl', 'tensorboard', 'wandb' or None"),
        ({"val_check_interval": 0}, "val_check_interval=0 must be >= 1 or None"),
        ({"val_check_interval": 0.25}, "val_check_interval=0.25 must be an int number of"),
        ({"check_val_every_n_epoch": 0}, "check_val_every_n_epoch=0 must be >= 1 or None"),
        ({"limit_val_batches": 0}, "limit_val_batches=0 must be >= 1 or None"),
    ],
)
def test_trainer_rejects_bad_options(kw, msg, tmp_path):
    with pytest.raises(ValueError, match=msg):
        trainer = jtp.Trainer(jtp.ModelParallelStrategy(2, 4), default_root_dir=str(tmp_path), **kw)
        trainer.fit(LitFF())  # the logger format is checked when fit opens the run directory


def test_fit_resume_needs_a_checkpoint_dir():
    with pytest.raises(ValueError, match=r"fit\(resume=True\) needs Trainer\(checkpoint_dir=...\)"):
        _trainer((2, 4)).fit(LitFF(), resume=True)


def test_configure_model_must_return_a_model():
    class Bad(LitFF):
        def configure_model(self, mesh):
            return "a model"

    with pytest.raises(ValueError, match="configure_model must return an nnx.Module or"):
        _trainer((2, 4)).fit(Bad())


def test_configure_model_may_return_factory_and_plan():
    """The trainer applies sharded_init with the strategy's fsdp."""

    class FactoryAndPlan(LitFF):
        def configure_model(self, mesh):
            return ff_factory(DIM, HIDDEN), FF_PLAN

    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(2, 4, fsdp=True),
        logger=None,
        enable_progress_bar=False,
        report_memory=False,
    )
    trainer.fit(FactoryAndPlan(optimizer="sgd"))
    assert trainer.model.w1.kernel[...].sharding.spec == jax.sharding.PartitionSpec(
        "data", "tensor"
    )
    # As in test_fit_2x4: a mean of squares, momentum SGD.
    np.testing.assert_allclose(trainer.losses, reference_loop(1)[0], rtol=1e-5)


def test_bf16_true_keeps_no_fp32_copy_alive():
    """Under "bf16-true" the fp32 values configure_model built are dropped once cast: no
    fp32 parameter-shaped buffer stays alive on any device during or after fit, and the
    user-visible model is the bf16 state (half the fp32 bytes)."""
    import gc

    dim, hidden = 24, 40  # shapes no other test uses, to find these buffers among live ones

    class Lit(LitFF):
        def configure_model(self, mesh):
            return jtp.sharded_init(ff_factory(dim, hidden), mesh, FF_PLAN)

        def train_dataloader(self):
            ds = jtp.RandomDataset(dim, 16, seed=7)
            return jtp.DataLoader(ds, 8, mesh=self.mesh)

    def param_buffers(dtype):
        gc.collect()
        shapes = {(dim, hidden), (hidden, dim)}
        return [a for a in jax.live_arrays() if a.shape in shapes and a.dtype == dtype]

    trainer = _trainer((2, 4), max_epochs=1, precision="bf16-true")
    trainer.fit(Lit())
    assert not param_buffers(jnp.float32)
    bf16 = param_buffers(jnp.bfloat16)
    assert len(bf16) == 3 * 3  # params + two AdamW moments, three kernels
    model_bytes = sum(
        v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(trainer.model, nnx.Param))
    )
    assert model_bytes == 3 * dim * hidden * 2  # bf16


def test_validation_counts_wrapped_rows_once():
    """20 rows in batches of 8 with drop_last=False: the last batch holds 4 real rows and 4
    repeats of the epoch's first rows. The mean must be over the 20 rows, each once."""
    samples = 20

    class Lit(LitFF):
        def val_dataloader(self):
            ds = jtp.RandomDataset(DIM, samples, seed=7)
            return jtp.DataLoader(ds, 8, mesh=self.mesh, shuffle=True, seed=1, drop_last=False)

    trainer = _trainer((2, 4))
    val = trainer.validate(Lit())
    model = ff_factory(DIM, HIDDEN)()
    ds = jtp.RandomDataset(DIM, samples, seed=7)
    rows = np.stack([ds[i] for i in range(samples)])
    per_row = np.mean(np.asarray(model(rows)) ** 2, axis=1)
    assert val["val_loss"] == pytest.approx(float(per_row.mean()), rel=1e-5)  # as above
    loader = jtp.DataLoader(
        jtp.RandomDataset(DIM, samples, seed=7),
        8,
        mesh=trainer.mesh,
        shuffle=True,
        seed=1,
        drop_last=False,
    )
    repeats = loader.batch_indices(0, 2)[4:]
    wrapped = np.mean(np.concatenate([per_row, per_row[repeats]]))  # counting repeats
    assert abs(val["val_loss"] - wrapped) > 1e-3 * abs(wrapped)  # the test can tell them apart
