"""LoRA fine-tuning in the Trainer: only the adapters get gradients and AdamW moments
(read off the optimizer state and the compiled step), the base stays bitwise, and fsdp,
gradient accumulation and checkpoint/resume keep working with a frozen base."""

import os

import jax
import numpy as np
from flax import nnx

import jtp
from jtp.cli.train import main
from jtp.parallel.names import path_str
from jtp.recipes import LlamaTask, LlamaTaskConfig

HF = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf", "llama3")
TASK = dict(hf=HF, seq_len=16, batch_size=8, samples=32, lr=1e-2)


def fit(lora_rank=4, mesh=(2, 4), fsdp=True, batch_size=8, **options):
    config = LlamaTaskConfig(
        **{**TASK, "batch_size": batch_size}, lora_rank=lora_rank, lora_alpha=8.0, fsdp=fsdp
    )
    task = LlamaTask(config)
    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(*mesh, fsdp=fsdp),
        logger=None,
        enable_progress_bar=False,
        report_memory=False,
        **{"max_steps": 3, **options},
    )
    trainer.fit(task)
    return trainer


def flat(tree):
    return {path_str(p): v for p, v in nnx.to_flat_state(tree)}


def test_only_adapters_train_and_have_moments():
    """AdamW's mu and nu hold exactly the 14 adapter factors (7 targets x A, B, stacked
    over layers), nothing base-sized; the base comes out of three steps bitwise as loaded,
    and every B has moved off zero."""
    trainer = fit()
    base = jtp.hf.load_pretrained(HF, trainer.mesh, max_seq_len=16)
    params = flat(nnx.state(trainer.model, nnx.Param))
    adapters = {k for k, v in flat(nnx.state(trainer.model, nnx.LoRAParam)).items()}
    assert len(adapters) == 14
    for k, v in flat(nnx.state(base, nnx.Param)).items():
        np.testing.assert_array_equal(np.asarray(params[k].get_value()), np.asarray(v.get_value()))
    for k in adapters:
        if k.endswith("lora_b"):
            assert np.abs(np.asarray(params[k].get_value())).max() > 0, k
    moments = [
        s
        for s in jax.tree.leaves(trainer.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    ]
    assert moments, "no Adam state found"
    for s in moments:
        for tree in (s.mu, s.nu):
            assert set(flat(tree)) == adapters
    adapter_bytes = sum(params[k].get_value().nbytes for k in adapters)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.opt_state))
    assert state_bytes <= 2 * adapter_bytes + 64  # two moments + step counters


def per_device_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def test_compiled_step_holds_no_base_moments_and_less_memory():
    """From the compiled steps of the same model on the same mesh (2x4, fsdp): full
    fine-tuning's arguments exceed LoRA's by exactly its optimizer state less LoRA's
    (adapters' moments) and the adapters themselves, per device, to the byte; the LoRA
    optimizer state is the adapters' two moments; and the LoRA step's peak is lower."""
    full, lora = fit(lora_rank=0, max_steps=1), fit(lora_rank=4, max_steps=1)
    adapters = per_device_bytes(nnx.state(lora.model, nnx.LoRAParam))
    opt = {t: per_device_bytes(t.opt_state) for t in (full, lora)}
    arg = {t: t.compiled_step.memory_analysis().argument_size_in_bytes for t in (full, lora)}
    assert opt[full] >= 2 * per_device_bytes(nnx.state(full.model))  # mu, nu of everything
    assert opt[lora] <= 2 * adapters + 64  # mu, nu of the adapters (+ step counters)
    assert arg[full] - arg[lora] == opt[full] - opt[lora] - adapters
    assert lora.peak_memory_bytes_per_device < full.peak_memory_bytes_per_device


def test_accumulation_equals_the_whole_batch():
    """Two micro-batches of 4 per step (the per-step data-axis reduction, 2x4) give the
    losses of one batch of 8 on the same rows: with a frozen base too. rtol 1e-5: the
    same float32 sums in another order."""
    whole = fit(fsdp=False).losses
    micro = fit(fsdp=False, batch_size=4, accumulate_grad_batches=2).losses
    assert len(whole) == len(micro) == 3
    np.testing.assert_allclose(micro, whole, rtol=1e-5)


def test_resume_with_lora_is_bitwise(tmp_path):
    """2x4 fsdp, LoRA: 2 steps + checkpoint, then --resume to 4, equals 4 straight steps
    bit for bit (the frozen base is in the checkpoint's params, the adapters' moments in
    its optimizer state); the PEFT export after resuming is written."""
    flags = [
        "--devices",
        "8",
        "--model",
        "llama",
        "--hf",
        HF,
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--seq-len",
        "16",
        "--samples",
        "32",
        "--data-parallel",
        "2",
        "--tensor-parallel",
        "4",
        "--fsdp",
        "--no-progress",
        "--root-dir",
        str(tmp_path / "runs"),
    ]
    full = main(flags + ["--max-steps", "4"])["losses"]
    ck = str(tmp_path / "ck")
    first = main(flags + ["--checkpoint-dir", ck, "--max-steps", "2"])
    second = main(
        flags
        + [
            "--checkpoint-dir",
            ck,
            "--max-steps",
            "4",
            "--resume",
            "--export-peft",
            str(tmp_path / "adapter"),
        ]
    )
    assert first["losses"] == full[:2]
    assert second["first_step"] == 2 and second["losses"] == full[2:]
    # The marker: jtp wrote the directory, so jtp may replace it.
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        ".jtp-artifact.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
