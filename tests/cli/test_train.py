"""python -m jtp.train: the same Trainer and task from the old flags and from Lightning's
spellings, the metrics JSON's ``config``; on prepared text: vocabulary from meta.json,
validation on schedule in the metrics JSON, the cosine schedule's values, and the refusals
(two processes on text: tests/training/test_multiprocess.py)."""

import json
import math

import numpy as np
import pytest
from flax import nnx

from jtp.cli.prepare import main as prepare_main
from jtp.cli.train import main as train_main
from jtp.recipes import LlamaTask, LlamaTaskConfig
from jtp.recipes.llama import data_vocab
from jtp.training.options import TrainerOptions
from jtp.training.trainer import Trainer

LR, WARMUP, STEPS = 3e-3, 2, 6


TRAINER_FLAGS = [  # (old spelling, Lightning's) with the values they set
    ("--log-every", "--log-every-n-steps", "5"),
    ("--no-progress", "--no-enable-progress-bar"),
    ("--root-dir", "--default-root-dir", "out"),
    ("--checkpoint-dir", "--checkpoint-dir", "ck"),
    ("--checkpoint-every", "--checkpoint-every-n-steps", "3"),
    ("--keep-last", "--keep-last", "2"),
    ("--stop-check-every", "--stop-check-every-n-steps", "2"),
    ("--logger", "--logger", "none"),
    ("--check-replicas", "--check-replicas", "1"),
    ("--max-steps", "--max-steps", "4"),
    ("--max-epochs", "--max-epochs", "2"),
    ("--precision", "--precision", "bf16-mixed"),
    ("--accumulate-grad-batches", "--accumulate-grad-batches", "2"),
    ("--seed", "--seed", "3"),
    ("--val-check-interval", "--val-check-interval", "2"),
    ("--fsdp", "--fsdp"),
    ("--limit-val-batches", "--limit-val-batches", "1"),
    ("--lr", "--lr", "0.01"),
]
MODELS = {
    "feedforward": ["--dim", "64", "--hidden-dim", "64"],
    "llama": ["--model", "llama", "--seq-len", "16", "--sequence-parallel", "--remat"],
}


@pytest.fixture
def fits(monkeypatch):
    """``Trainer.fit`` replaced: main() runs through, recording (options, task config)."""
    runs = []
    monkeypatch.setattr(Trainer, "fit", lambda self, task, resume: runs.append((self, task)))
    return runs


@pytest.mark.parametrize("model", MODELS)
def test_old_and_lightning_flags_give_the_same_trainer_and_task(fits, tmp_path, model):
    mesh = ["--devices", "8", "--data-parallel", "2", "--tensor-parallel", "4", *MODELS[model]]
    old = [x for flag, _, *value in TRAINER_FLAGS for x in (flag, *value)]
    new = [x for _, flag, *value in TRAINER_FLAGS for x in (flag, *value)]
    paths = [tmp_path / "old.json", tmp_path / "new.json"]
    for argv, path in zip((old, new), paths, strict=True):
        train_main([*mesh, *argv, "--metrics-json", str(path)])
    (old_trainer, old_task), (new_trainer, new_task) = fits
    assert old_trainer.options == new_trainer.options and old_task.config == new_task.config
    assert old_trainer.options == TrainerOptions(
        log_every_n_steps=5,
        enable_progress_bar=False,
        default_root_dir="out",
        checkpoint_dir="ck",
        checkpoint_every_n_steps=3,
        keep_last=2,
        stop_check_every_n_steps=2,
        logger=None,
        check_replicas=1,
        max_steps=4,
        max_epochs=2,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        seed=3,
        val_check_interval=2,
        limit_val_batches=1,
    )
    assert (new_task.config.lr, new_task.config.seed, new_task.config.fsdp) == (0.01, 3, True)
    assert new_trainer.strategy.fsdp
    old_config, new_config = (json.loads(p.read_text())["config"] for p in paths)
    assert old_config.pop("metrics_json") != new_config.pop("metrics_json")
    assert old_config == new_config
    assert new_config["log_every_n_steps"] == 5 and new_config["logger"] is None


def test_cli_defaults_are_the_trainers(fits, tmp_path):
    path = tmp_path / "m.json"
    train_main(["--devices", "8", *MODELS["feedforward"], "--metrics-json", str(path)])
    ((trainer, task),) = fits
    assert trainer.options == TrainerOptions() and task.config.dim == 64
    config = json.loads(path.read_text())["config"]
    assert config["enable_progress_bar"] is True and config["default_root_dir"] == "runs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "a.txt").write_text("the cat sat on the mat. " * 200)
    (root / "b.txt").write_text("def f(x):\n    return x * 2\n" * 150)
    prepare_main([str(root / "a.txt"), str(root / "b.txt"), "--out", str(root / "d"), "--bytes"])
    return str(root / "d")


def _args(data, tmp, *extra):
    return [
        "--devices",
        "8",
        "--model",
        "llama",
        "--data",
        data,
        "--seq-len",
        "16",
        "--batch-size",
        "8",
        "--data-parallel",
        "2",
        "--tensor-parallel",
        "4",
        "--max-steps",
        str(STEPS),
        "--no-progress",
        "--root-dir",
        str(tmp),
        *extra,
    ]


def cosine(step: int, total: int) -> float:
    """The schedule written out: linear warmup from 0, cosine to LR / 10 at ``total``."""
    if step < WARMUP:
        return LR * step / WARMUP
    t = min(step - WARMUP, total - WARMUP) / (total - WARMUP)
    end = LR * 0.1
    return end + (LR - end) * 0.5 * (1 + math.cos(math.pi * t))


def test_validation_in_the_metrics_json_and_the_cosine_lrs(data, tmp_path):
    sched = ["--lr-schedule", "cosine", "--warmup-steps", str(WARMUP), "--lr", str(LR)]
    path = tmp_path / "m.json"
    m = train_main(
        _args(data, tmp_path, *sched, "--val-check-interval", "3", "--metrics-json", str(path))
    )
    assert json.loads(path.read_text()) == json.loads(json.dumps(m))
    assert m["config"]["val_check_interval"] == 3 and m["config"]["data"] == data
    assert [v["step"] for v in m["val_history"]] == [3, 6]
    assert m["val_loss"] == m["val_history"][-1]["val_loss"]
    assert m["losses"][-1] < m["losses"][0] - 0.5  # it learns the bytes
    assert m["val_history"][1]["val_loss"] < m["val_history"][0]["val_loss"]
    # optax evaluates the schedule in fp32 (cos included): a few ulps from the float64 one.
    np.testing.assert_allclose(m["lrs"], [cosine(s, STEPS) for s in range(STEPS)], rtol=1e-5)
    plain = train_main(_args(data, tmp_path, *sched))
    assert plain["losses"] == m["losses"] and plain["val_history"] == []  # unchanged by it
    assert plain["val_loss"] is None


def test_vocabulary_from_meta_and_mismatch_refused(data):
    task = LlamaTask(LlamaTaskConfig(data=data, seq_len=128))
    assert task.model_config.vocab_size == 256 and task.model_config.max_seq_len == 128
    assert data_vocab(data) == 256
    with pytest.raises(ValueError, match=r"vocabulary 256 \(tokenizer bytes\) but the model's is"):
        data_vocab(data, 32000)  # e.g. a checkpoint's own vocabulary


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--model", "feedforward"], "--data DIR trains a language model: add --model llama"),
        (["--data", "/nonexistent"], "meta.json not found: /nonexistent is not a prepared"),
        (["--seq-len", "9000"], r"train.bin holds \d+ tokens, fewer than one window"),
    ],
)
def test_cli_refusals(data, tmp_path, extra, msg):
    with pytest.raises(ValueError, match=msg):
        train_main(_args(data, tmp_path, *extra))


def test_hf_checkpoint_with_data_of_another_vocabulary_is_refused(data):
    """--hf plus --data: the token ids must come from the checkpoint's own tokenizer; a
    byte-level directory (vocabulary 256) against a checkpoint's vocabulary is an error
    that says how to prepare the text instead."""
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "llama3"
    vocab = json.loads((fixture / "config.json").read_text())["vocab_size"]
    assert vocab != 256
    with pytest.raises(ValueError, match=rf"vocabulary 256 .* the model's is {vocab}; prepare"):
        LlamaTask(LlamaTaskConfig(hf=str(fixture), data=data, seq_len=16))
    with pytest.raises(ValueError, match="--tokenizer CHECKPOINT/tokenizer.json"):
        train_main(["--model", "llama", "--hf", str(fixture), "--data", data, "--seq-len", "16"])


def _layout(task, mesh):
    from jtp.parallel.plan import resolve

    model = nnx.eval_shape(task.model_factory())
    return {p.path: p.spec for p in resolve(model, mesh, task.plan, fsdp=task.config.fsdp)}


def test_plan_auto_is_the_ready_layout(tmp_path):
    """``--plan auto`` (jtp.infer_plan on the task's forward) gives FeedForward and the
    Llama their ready plans' layouts: every PartitionSpec equal (2x4, with fsdp too), a
    checkpoint loaded with --hf resharded onto it, and two training steps through main()
    with the ready plan's losses: equal to the bit, as measured (the parameter layout is the
    same; the Llama's ready plan also pins activations, which could only reorder fp32
    sums: the bound is 1e-6 relative). Sequence and loss parallelism need the ready plan's
    activation rules, so auto refuses them."""
    from pathlib import Path

    import jtp
    from jtp.recipes import FeedForwardConfig, FeedForwardTask

    mesh = jtp.make_mesh(2, 4)
    for fsdp in (False, True):
        ff = [
            FeedForwardTask(FeedForwardConfig(dim=64, hidden_dim=64, fsdp=fsdp, plan=p))
            for p in ("ready", "auto")
        ]
        assert _layout(ff[0], mesh) == _layout(ff[1], mesh)
        lm = [LlamaTask(LlamaTaskConfig(seq_len=16, fsdp=fsdp, plan=p)) for p in ("ready", "auto")]
        assert _layout(lm[0], mesh) == _layout(lm[1], mesh)
    fixture = str(Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "llama3")
    hf = LlamaTask(LlamaTaskConfig(hf=fixture, seq_len=16, plan="auto"))
    loaded = jtp.models.hf.load_pretrained(fixture, mesh, max_seq_len=16)
    placed = nnx.state(hf.configure_model(mesh))
    for (path, ready), (_, auto) in zip(
        nnx.to_flat_state(nnx.state(loaded)), nnx.to_flat_state(placed), strict=True
    ):
        assert auto.get_value().sharding.spec == ready.get_value().sharding.spec, path

    mesh_flags = ["--devices", "8", "--data-parallel", "2", "--tensor-parallel", "4"]
    for model, exact in (
        (MODELS["feedforward"], True),
        (["--model", "llama", "--seq-len", "16"], False),
    ):
        losses = []
        for plan in ("ready", "auto"):
            path = tmp_path / f"{plan}.json"
            argv = [*mesh_flags, *model, "--max-steps", "2", "--plan", plan]
            train_main([*argv, "--no-progress", "--logger", "none", "--metrics-json", str(path)])
            metrics = json.loads(path.read_text())
            assert metrics["config"]["plan"] == plan and len(metrics["losses"]) == 2
            losses.append(metrics["losses"])
        if exact:
            assert losses[0] == losses[1]
        else:
            np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
    with pytest.raises(ValueError, match="--plan auto infers where parameters go"):
        LlamaTask(LlamaTaskConfig(sequence_parallel=True, plan="auto"))
