"""python -m jtp.eval: transformers' loss on the committed fixtures on several meshes, a
training checkpoint scored as the trainer's own validation scored it, and the refusals,
each before a weight is read.

``tests/fixtures/eval/<name>`` (scripts/make_hf_fixtures.py, transformers 5.24, torch 2.13
CPU) holds token files for ``tests/fixtures/hf/<name>`` and transformers' float32 mean
loss over exactly the windows jtp.eval scores, summed in float64.

Tolerance: |jtp - transformers| <= 2e-5 * loss; seen <= 1.1e-7 * loss over the 8 cases.
Both compute float32 logits from the same bf16-rounded weights and differ only in the order
of reductions (the logits agree to ~2e-6 of their largest, tests/models/test_hf.py); the
mean over 80 log-softmaxes averages those differences down. A last batch of r < B windows
is recovered as ``B * mean(padded) - (B - r) * mean(repeated)`` (jtp.training.evaluate),
which multiplies a float32 rounding of each batch mean (~1e-7 of the loss) by up to
2B - r <= 7 at B = 4: still below 1e-6. 2e-5 leaves 20x room over that bound (another CPU
instruction set or XLA version) and is 40x below the smallest structural error measured
on the fixtures: counting the last batch's wrapped-around repeats moves the mean by 8.6e-4
to 7e-2 of the loss (asserted per case below, at 10 x the tolerance).
"""

import json
import os
import shutil

import numpy as np
import pytest

from jtp.cli.eval import main as eval_main
from jtp.cli.prepare import main as prepare_main
from jtp.cli.train import main as train_main
from jtp.training.trainer import Trainer

ROOT = os.path.join(os.path.dirname(__file__), "..", "fixtures")
RTOL = 2e-5  # see the module docstring
BATCH = 4
MESHES = {  # name: (flags, (data, tensor))
    "1x1": (["--devices", "1"], (1, 1)),
    "1x8": (["--tensor-parallel", "8"], (1, 8)),
    "2x4-fsdp": (["--data-parallel", "2", "--tensor-parallel", "4", "--fsdp"], (2, 4)),
    "4x2-sp-lp": (
        [
            "--data-parallel",
            "4",
            "--tensor-parallel",
            "2",
            "--sequence-parallel",
            "--loss-parallel",
        ],
        (4, 2),
    ),
}
CASES = [  # (fixture, split, seq_len, mesh)
    ("llama3", "val", 16, "1x1"),
    ("llama3", "val", 16, "1x8"),
    ("llama3", "val", 16, "2x4-fsdp"),
    ("llama3", "val", 16, "4x2-sp-lp"),
    ("qwen2", "val", 16, "1x8"),
    ("qwen2", "val", 16, "4x2-sp-lp"),
    ("llama3", "val", 8, "2x4-fsdp"),  # 10 windows: batches of 4, 4 and 2
    ("qwen2", "train", 16, "2x4-fsdp"),  # 3 windows: one batch, not full
]


def reference(name: str, split: str, seq_len: int) -> dict:
    with open(os.path.join(ROOT, "eval", name, "reference.json")) as f:
        cases = json.load(f)["cases"]
    return next(c for c in cases if (c["split"], c["seq_len"]) == (split, seq_len))


def hf_args(name: str, *extra: str) -> list[str]:
    return [
        "--hf",
        os.path.join(ROOT, "hf", name),
        "--data",
        os.path.join(ROOT, "eval", name),
        "--batch-size",
        str(BATCH),
        *extra,
    ]


@pytest.mark.parametrize("name,split,seq_len,mesh", CASES)
def test_loss_equals_transformers(tmp_path, name, split, seq_len, mesh):
    ref = reference(name, split, seq_len)
    path = tmp_path / "eval.json"
    flags, (data, tensor) = MESHES[mesh]
    argv = hf_args(name, "--split", split, "--seq-len", str(seq_len), *flags)
    r = eval_main([*argv, "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(r))
    assert r["mesh"] == {"data": data, "tensor": tensor}
    assert (r["windows"], r["tokens"]) == (ref["windows"], ref["tokens"])
    n = os.path.getsize(os.path.join(ROOT, "eval", name, f"{split}.bin"))
    assert r["unscored_tokens"] == n - 1 - ref["tokens"] and r["unscored_tokens"] > 0
    assert r["batches"] == -(-ref["windows"] // BATCH) and r["precision"] == "32-true"
    assert abs(r["loss"] - ref["loss"]) <= RTOL * ref["loss"], (r["loss"], ref["loss"])
    assert r["perplexity"] == pytest.approx(np.exp(r["loss"]), rel=1e-12)
    # The tolerance is far below what counting the last batch's repeats would do.
    w = np.array(ref["window_losses"])
    repeats = -len(w) % BATCH
    if repeats:
        wrong = (w.sum() + repeats * w[0]) / (len(w) + repeats)
        assert abs(wrong - ref["loss"]) > 10 * RTOL * ref["loss"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Byte-level tokens: train.bin for a few steps, val.bin of 25 windows of 16."""
    root = tmp_path_factory.mktemp("text")
    (root / "a.txt").write_text("the cat sat on the mat. " * 80)
    (root / "b.txt").write_text("def f(x):\n    return x * 2\n" * 70)
    out = str(root / "d")
    prepare_main([str(root / "a.txt"), str(root / "b.txt"), "--out", out, "--bytes"])
    return out


@pytest.fixture(scope="module")
def trained(text, tmp_path_factory):
    """A tiny Llama trained 4 steps on 2 x 4 with fsdp, validated and saved at step 4."""
    tmp = tmp_path_factory.mktemp("run")
    ck = str(tmp / "ck")
    metrics = train_main(
        [
            "--devices",
            "8",
            "--model",
            "llama",
            "--data",
            text,
            "--seq-len",
            "16",
            "--batch-size",
            "8",
            "--data-parallel",
            "2",
            "--tensor-parallel",
            "4",
            "--fsdp",
            "--max-steps",
            "4",
            "--val-check-interval",
            "4",
            "--checkpoint-dir",
            ck,
            "--no-progress",
            "--logger",
            "none",
            "--no-report-memory",
        ]
    )
    assert [v["step"] for v in metrics["val_history"]] == [4]
    return ck, metrics["val_loss"]


def test_checkpoint_scores_as_the_trainer_validated(text, trained):
    """On the training mesh, jtp.eval runs the trainer's own validation program on the
    restored parameters: the loss is bit for bit the one fit logged. On another mesh the
    matmuls reduce in another order: float32 rounding, within RTOL (seen 7e-8)."""
    ck, val_loss = trained
    same = ["--data-parallel", "2", "--tensor-parallel", "4", "--fsdp"]
    r = eval_main(["--checkpoint", ck, "--data", text, *same])
    assert r["loss"] == val_loss
    assert r["source"] == {"checkpoint": ck, "step": 4}
    assert (r["seq_len"], r["batch_size"], r["precision"]) == (16, 8, "32-true")  # the run's
    other = eval_main(
        [
            "--checkpoint",
            ck,
            "--data",
            text,
            "--tensor-parallel",
            "8",
            "--step",
            "4",
            "--batch-size",
            "16",
        ]
    )
    assert other["mesh"] == {"data": 1, "tensor": 8}
    assert abs(other["loss"] - val_loss) <= RTOL * val_loss
    train = eval_main(["--checkpoint", ck, "--data", text, "--split", "train"])
    assert train["windows"] > r["windows"] and train["loss"] != r["loss"]


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails the test: every refusal must come before it."""

    def fail(self, module):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(Trainer, "setup", fail)


def test_refusals_before_loading(tmp_path, text, trained, no_load, capsys):
    ck, _ = trained
    llama3 = os.path.join(ROOT, "hf", "llama3")
    with pytest.raises(ValueError, match=r"meta.json not found: /nonexistent is not a prepared"):
        eval_main(["--hf", llama3, "--data", "/nonexistent"])
    with pytest.raises(
        ValueError,
        match=r"vocabulary 256 \(tokenizer bytes\) but the model's "
        r"is 128; prepare the text with the model's tokenizer",
    ):
        eval_main(["--hf", llama3, "--data", text, "--seq-len", "16"])
    with pytest.raises(ValueError, match=r"vocabulary 128 .* but the model's is 256"):
        eval_main(["--checkpoint", ck, "--data", os.path.join(ROOT, "eval", "llama3")])
    with pytest.raises(
        ValueError,
        match=r"--seq-len 600 is longer than the model allows: 512 "
        r"positions \(max_position_embeddings in",
    ):
        eval_main(hf_args("llama3", "--seq-len", "600"))
    with pytest.raises(
        ValueError,
        match=r"--seq-len 65 is longer than the model allows: 64 "
        r"positions \(the max_seq_len it was built with\)",
    ):
        eval_main(["--checkpoint", ck, "--data", text, "--seq-len", "65"])
    with pytest.raises(ValueError, match=r"val.bin holds 88 tokens, fewer than one window"):
        eval_main(hf_args("llama3", "--seq-len", "100"))
    with pytest.raises(ValueError, match=r"--checkpoint /nonexistent: no such directory"):
        eval_main(["--checkpoint", "/nonexistent", "--data", text])
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint step 7 in .* \(steps there: \[4\]\)"
    ):
        eval_main(["--checkpoint", ck, "--data", text, "--step", "7"])
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by mesh axis 'data' of"):
        eval_main(hf_args("llama3", "--seq-len", "16", "--data-parallel", "8"))
    only_meta = tmp_path / "only_meta"
    only_meta.mkdir()
    shutil.copy(os.path.join(ROOT, "eval", "llama3", "meta.json"), only_meta)
    with pytest.raises(ValueError, match=r"no val.bin \(python -m jtp.prepare writes"):
        eval_main(["--hf", llama3, "--data", str(only_meta), "--seq-len", "16"])
    for argv, msg in [
        (["--data", text], "one of the arguments --hf --checkpoint is required"),
        (["--hf", llama3, "--checkpoint", ck, "--data", text], "not allowed with argument"),
        (["--hf", llama3], "the following arguments are required: --data"),
    ]:
        with pytest.raises(SystemExit) as stop:
            eval_main(argv)
        assert stop.value.code == 2 and msg in capsys.readouterr().err
