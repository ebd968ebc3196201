"""Checkpoints in one process: bitwise resume, resharding on restore, bad checkpoints,
consolidated export, and a non-finite loss that keeps the last good checkpoint."""

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import FF_PLAN, ff_factory, rel_err

import jtp
from jtp.cli.train import main

BASE = "--devices 8 --dim 32 --hidden-dim 64 --samples 64 --max-epochs 2 --no-progress".split()


def run(tmp_path, *flags, mesh=(2, 4)):
    args = BASE + ["--data-parallel", str(mesh[0]), "--tensor-parallel", str(mesh[1])]
    return main(args + ["--root-dir", str(tmp_path / "runs"), *flags])


def test_resume_is_bitwise_on_the_same_mesh(tmp_path):
    full = run(tmp_path)["losses"]
    ck = str(tmp_path / "ck")
    first = run(tmp_path, "--checkpoint-dir", ck, "--max-steps", "5")
    second = run(tmp_path, "--checkpoint-dir", ck, "--resume")
    assert len(full) == 16
    assert first["losses"] == full[:5] and first["first_step"] == 0
    assert second["first_step"] == 5 and second["steps"] == 11
    assert second["losses"] == full[5:]  # bitwise: same program, same state, same batches
    assert sorted(int(s) for s in os.listdir(ck) if s.isdigit()) == [5, 16]


@pytest.mark.parametrize(
    "flags", [("1x8",), ("--no-fsdp",)], ids=["2x4-fsdp-to-1x8", "fsdp-to-no-fsdp"]
)
def test_resume_onto_another_layout(tmp_path, flags):
    """2x4 with fsdp -> 1x8, and fsdp -> no fsdp: resharded on restore. The restored
    parameters are bitwise the saved ones (a zero-step resume exports them), and training
    goes on from there as the uninterrupted run does."""
    full = run(tmp_path, "--fsdp")["losses"]
    ck = str(tmp_path / "ck")
    saved, restored = str(tmp_path / "saved.safetensors"), str(tmp_path / "restored.safetensors")
    run(tmp_path, "--fsdp", "--checkpoint-dir", ck, "--max-steps", "6", "--export", saved)
    resume = ["--checkpoint-dir", ck, "--resume"]
    other = dict(mesh=(1, 8)) if flags[0] == "1x8" else {}
    assert run(tmp_path, *resume, "--max-steps", "6", "--export", restored, **other)["steps"] == 0
    model = lambda: jtp.models.FeedForward(32, 64, rngs=nnx.Rngs(1))  # noqa: E731
    want = nnx.state(jtp.load_consolidated(saved, model()), nnx.Param)
    assert rel_err(nnx.state(jtp.load_consolidated(restored, model()), nnx.Param), want) == 0.0
    second = run(tmp_path, *resume, **other)
    assert second["first_step"] == 6
    # The loss is a sum of B x D = 256 outputs of both signs (it crosses zero: 11 -> -136 over
    # the run), so its fp32 rounding scales with the sum of their magnitudes, ~ the run's
    # largest |loss|, not with the loss itself: 1e-5 of that (seen <= 3.4e-7 of it). Training
    # goes on on another layout, where AdamW may flip a step whose gradient is rounding noise
    # (helpers.assert_adamw_step_matches): 2 lr in a weight the loss is flat along, so the
    # loss moves only to second order in it.
    atol = 1e-5 * max(abs(x) for x in full)
    np.testing.assert_allclose(second["losses"], full[6:], rtol=0, atol=atol)


def test_wrong_model_is_a_clear_error(tmp_path):
    ck = str(tmp_path / "ck")
    run(tmp_path, "--checkpoint-dir", ck, "--max-steps", "2")
    with pytest.raises(
        ValueError,
        match=r"'params\.w1\.kernel.*' has shape \(32, 64\) but the model expects \(32, 128\)",
    ):
        main(
            BASE
            + [
                "--hidden-dim",
                "128",
                "--root-dir",
                str(tmp_path),
                "--checkpoint-dir",
                ck,
                "--resume",
            ]
        )


def test_corrupted_latest_falls_back_to_previous(tmp_path, caplog):
    """A damaged newest checkpoint (files missing) is skipped with a warning; training resumes
    from the previous complete one. Documented behaviour."""
    ck = tmp_path / "ck"
    run(tmp_path, "--checkpoint-dir", str(ck), "--max-steps", "8", "--checkpoint-every", "4")
    state_dir = ck / "8" / "state"
    for entry in state_dir.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    with caplog.at_level("WARNING", logger="jtp.checkpoint.sharded"):
        resumed = run(tmp_path, "--checkpoint-dir", str(ck), "--resume")
    assert resumed["first_step"] == 4
    assert "step 8 is damaged: state/_METADATA is missing" in caplog.text


def _largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_16_bytes(f: Path) -> None:
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    f.write_bytes(bytes(data))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize(
    "harm,says",
    [
        (_flip_16_bytes, "does not match its checksum"),
        (_truncate, "(truncated?)"),
        (Path.unlink, "is missing"),
    ],
    ids=["bit-rot", "truncated", "deleted"],
)
def test_a_damaged_step_is_named_skipped_and_the_run_resumes_before_it(
    tmp_path, caplog, harm, says
):
    """16 flipped bytes in the middle of the largest array file of the newest step (bit rot,
    a bad copy), the file cut in half, or deleted: each was resumed from silently or ended
    in tensorstore tracebacks. The step's manifest (every file's size and SHA-256) names the
    file; the run resumes from step 4 and continues exactly as an uninterrupted run does."""
    ck = tmp_path / "ck"
    full = run(tmp_path, "--checkpoint-dir", str(ck), "--max-steps", "8", "--checkpoint-every", "4")
    manifest = json.loads((ck / "8" / "jtp_manifest.json").read_text())["files"]
    target = _largest_array_file(ck / "8")
    assert str(target.relative_to(ck / "8")) in manifest
    harm(target)
    with caplog.at_level("WARNING", logger="jtp.checkpoint.sharded"):
        resumed = run(tmp_path, "--checkpoint-dir", str(ck), "--resume", "--max-steps", "8")
    assert resumed["first_step"] == 4
    assert f"checkpoint step 8 is damaged: {target.relative_to(ck / '8')}" in caplog.text
    assert says in caplog.text
    assert resumed["losses"] == full["losses"][4:8]  # bitwise: the same mesh


def test_a_step_without_a_manifest_restores_unverified(tmp_path, caplog):
    """A checkpoint written before manifests existed (or a save killed between its commit and
    its manifest) still restores, with a warning that it was not verified."""
    ck = tmp_path / "ck"
    run(tmp_path, "--checkpoint-dir", str(ck), "--max-steps", "4")
    (ck / "4" / "jtp_manifest.json").unlink()
    with caplog.at_level("WARNING", logger="jtp.checkpoint.sharded"):
        resumed = run(tmp_path, "--checkpoint-dir", str(ck), "--resume", "--max-steps", "6")
    assert resumed["first_step"] == 4 and "no manifest: restored unverified" in caplog.text


class Exploding(jtp.TrainModule):
    """Loss becomes NaN from the 5th optimizer step on (rows of sample ids >= 32)."""

    def configure_model(self, mesh):
        return jtp.sharded_init(ff_factory(), mesh, FF_PLAN)

    def training_step(self, model, batch):
        x, ids = batch["x"], batch["id"]
        poison = jnp.where(ids >= 32, jnp.nan, 0.0)[:, None]
        return jnp.mean((model(x + poison)) ** 2)

    def configure_optimizers(self):
        return optax.adam(1e-3)

    def train_dataloader(self):
        class DS:
            def __len__(self):
                return 64

            def __getitem__(self, i):
                return {"x": np.full(16, 0.01 * i, np.float32), "id": np.int32(i)}

        return jtp.DataLoader(DS(), 8, mesh=self.mesh)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(2, 4),
        checkpoint_dir=str(ck),
        checkpoint_every_n_steps=2,
        logger=None,
        enable_progress_bar=False,
        report_memory=False,
        log_every_n_steps=100,
    )
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss nan at step 5 .*last good checkpoint"
    ):
        trainer.fit(Exploding())
    assert jtp.Checkpointer(str(ck)).all_steps() == [2, 4]


def test_consolidated_export_round_trip(tmp_path):
    path = str(tmp_path / "ff.safetensors")
    metrics = run(tmp_path, "--fsdp", "--max-steps", "3", "--export", path)
    assert metrics["steps"] == 3
    # One device, plain model.
    plain = jtp.load_consolidated(path, jtp.models.FeedForward(32, 64, rngs=nnx.Rngs(1)))
    assert not isinstance(plain.w1.kernel[...].sharding, jax.sharding.NamedSharding) or (
        plain.w1.kernel[...].sharding.is_fully_replicated
    )
    # Any mesh: every device reads its slice.
    mesh = jtp.make_mesh(1, 8)
    sharded = jtp.load_consolidated(path, ff_factory(32, 64), mesh, FF_PLAN)
    assert sharded.w2.kernel[...].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    assert rel_err(nnx.state(sharded, nnx.Param), nnx.state(plain, nnx.Param)) == 0.0
    # And the values are the trained ones, not an init.
    init = ff_factory(32, 64)()
    # 3 AdamW steps of lr 3e-3 move each weight by ~1e-2 (weights ~0.2): seen 3.9e-2.
    assert rel_err(nnx.state(plain, nnx.Param), nnx.state(init, nnx.Param)) > 1e-4
    with pytest.raises(
        ValueError,
        match=r"parameter 'w1.kernel' has shape \(32, 64\), the model expects \(32, 128\)",
    ):
        jtp.load_consolidated(path, jtp.models.FeedForward(32, 128, rngs=nnx.Rngs(1)))


def test_metadata_record(tmp_path):
    ck = tmp_path / "ck"
    run(tmp_path, "--checkpoint-dir", str(ck), "--max-steps", "3")
    meta = json.loads((ck / "3" / "meta" / "metadata").read_text())
    assert meta["step"] == 3 and meta["mesh"] == {"data": 2, "tensor": 4}
    assert meta["loader"] == {"epoch": 0, "batch": 3, "seed": 0}
    assert meta["module"]["plan"] == {
        "w1": "ColwiseParallel",
        "w2": "RowwiseParallel",
        "w3": "ColwiseParallel",
    }
    assert meta["jtp_version"] == jtp.__version__


def test_checkpoint_and_export_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        jtp.Checkpointer(str(tmp_path / "empty")).restore({"w": jnp.zeros(2)})
    path = str(tmp_path / "ff.safetensors")
    jtp.save_consolidated(ff_factory(32, 64)(), path)
    with pytest.raises(ValueError, match="without a mesh takes a built model"):
        jtp.load_consolidated(path, ff_factory(32, 64))


def test_checkpoints_with_the_old_variable_names_still_restore(tmp_path):
    """Before the one naming, a Variable's leaf was stored as ``params.w1.kernel.value``
    (and ``...value#key_data`` for RNG keys); such a checkpoint restores unchanged."""
    import orbax.checkpoint as ocp

    from jtp.checkpoint.sharded import _legacy_name, flatten_state

    mesh = jtp.make_mesh(2, 4)
    model = jtp.sharded_init(ff_factory(), mesh, FF_PLAN)
    tree = {"params": nnx.state(model, nnx.Param), "rest": {"key": jax.random.key(3)}}
    flat = flatten_state(tree)
    assert "params.w1.kernel" in flat and "rest.key#key_data" in flat  # today's names
    ckpt = jtp.Checkpointer(str(tmp_path / "ck"))
    legacy = {_legacy_name(k): v for k, v in flat.items()}
    assert "params.w1.kernel.value" in legacy
    ckpt._manager.save(
        5,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(legacy), meta=ocp.args.JsonSave({"step": 5})
        ),
    )
    ckpt.wait()
    like = jax.tree.map(jnp.zeros_like, tree)
    restored, meta, step = ckpt.restore(like)
    ckpt.close()
    assert step == 5 and meta["step"] == 5
    for a, b in zip(
        jax.tree.leaves(tree["params"]), jax.tree.leaves(restored["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.random.key_data(restored["rest"]["key"]).tolist() == (
        jax.random.key_data(tree["rest"]["key"]).tolist()
    )


R2 = Path(__file__).parents[1] / "fixtures" / "checkpoint_r2"


def test_a_checkpoint_written_before_the_round_3_layout_restores_and_continues(tmp_path):
    """``fixtures/checkpoint_r2`` was written by jtp before its checkpoint code moved to
    ``jtp/checkpoint`` (commit 43cf048, the command in ``expected.json``): 2 steps on a
    (2, 4) mesh, a checkpoint at step 2, that run's consolidated export, and the losses
    that code then got resuming for steps 3 and 4.

    The restored parameters equal the export bitwise (nothing is computed in between). The
    resumed losses match the old code's within rtol 1e-5: the same restored state (moments
    included, so no first-step ``lr * sign(g)`` update that rounding noise could flip) runs
    the same program; only the CPU's instruction set may reorder the fp32 sums (a loss is
    the sum of 8 x 16 outputs of two 16/32-term dot products: rounding ~1e-6 relative).
    """
    from jtp.models import FeedForward
    from jtp.recipes import FeedForwardConfig, FeedForwardTask

    expected = json.loads((R2 / "expected.json").read_text())
    ck = tmp_path / "ck"
    shutil.copytree(R2 / "ckpt", ck)
    config = FeedForwardConfig(dim=16, hidden_dim=32, samples=32, batch_size=8)
    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(2, 4),
        max_steps=2,
        checkpoint_dir=str(ck),
        logger=None,
        enable_progress_bar=False,
        report_memory=False,
    )
    trainer.fit(FeedForwardTask(config), resume=True)
    assert trainer.first_step == trainer.global_step == 2 and trainer.losses == []
    exported = jtp.load_consolidated(
        str(R2 / "params.safetensors"), FeedForward(16, 32, rngs=nnx.Rngs(1))
    )
    restored = nnx.state(trainer.model, nnx.Param)
    for a, b in zip(
        jax.tree.leaves(restored), jax.tree.leaves(nnx.state(exported, nnx.Param)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    flags = (
        "--data-parallel 2 --tensor-parallel 4 --dim 16 --hidden-dim 32 --samples 32 --batch-size 8"
    ).split()
    out = main(
        [
            "--devices",
            "8",
            *flags,
            "--max-steps",
            "4",
            "--checkpoint-dir",
            str(ck),
            "--resume",
            "--no-progress",
            "--root-dir",
            str(tmp_path / "runs"),
        ]
    )
    assert out["first_step"] == 2 and out["steps"] == 2
    np.testing.assert_allclose(out["losses"], expected["resumed_losses_steps_3_4"], rtol=1e-5)


LLAMA = (
    "--devices 8 --model llama --data-parallel 2 --tensor-parallel 4 --fsdp --samples 32"
    " --seq-len 16 --no-progress"
).split()


def test_llama_checkpoints_restore_across_unrolled_and_scanned_layers(tmp_path):
    """A checkpoint of the unrolled Llama (``--no-scan-layers``: ``params.layers.0...``, Adam
    moments alike) resumes the scanned one (the default: ``params.layers...`` stacked): each
    stacked entry is read as its layers' entries and stacked. And back: the scanned run's
    checkpoint resumes an unrolled run, each layer sliced out of the stack. Losses match the
    uninterrupted unrolled run within 1e-5 (the two forms' programs may fuse differently; a
    fresh scanned model would start from other weights: its layers split the RNG)."""
    root = ["--root-dir", str(tmp_path / "runs")]
    full = main(LLAMA + root + ["--no-scan-layers", "--max-steps", "4"])["losses"]
    ck = str(tmp_path / "ck")
    first = main(LLAMA + root + ["--no-scan-layers", "--max-steps", "2", "--checkpoint-dir", ck])
    second = main(LLAMA + root + ["--max-steps", "3", "--checkpoint-dir", ck, "--resume"])
    third = main(
        LLAMA + root + ["--no-scan-layers", "--max-steps", "4", "--checkpoint-dir", ck, "--resume"]
    )
    assert (second["first_step"], third["first_step"]) == (2, 3)
    losses = first["losses"] + second["losses"] + third["losses"]
    np.testing.assert_allclose(losses, full, rtol=1e-5)


def test_a_checkpoint_with_other_layers_names_the_mismatch(tmp_path):
    """Unrolled entries for 2 layers do not fill a stack of 3: the error says so."""
    from jtp.checkpoint.sharded import CheckpointMismatchError

    ckpt = jtp.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(1, {"params": {"layers": {"0": {"w": jnp.ones(4)}, "1": {"w": jnp.ones(4)}}}}, {})
    with pytest.raises(CheckpointMismatchError, match=r"not all 3 the model stacks"):
        ckpt.restore({"params": {"layers": {"w": jnp.zeros((3, 4))}}})
    restored, _, _ = ckpt.restore({"params": {"layers": {"w": jnp.zeros((2, 4))}}})
    np.testing.assert_array_equal(restored["params"]["layers"]["w"], np.ones((2, 4)))
    ckpt.close()
