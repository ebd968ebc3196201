"""Bad inputs as careless or unlucky users give them, one table: each is refused with exit
status 2 and one line naming the culprit, no traceback, before anything is compiled, and
every file that existed before is byte-identical after (no file appears either).

Found by trying 124 bad inputs against the programs; the cases here are those that lost the
user's data or were refused only after the work was done (docs/testing.md keeps the count).
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers import backend_compiles

from jtp.cli import capacity as capacity_cli
from jtp.cli import eval as eval_cli
from jtp.cli import generate as generate_cli
from jtp.cli import prepare as prepare_cli
from jtp.cli.train import _run_and_exit
from jtp.cli.train import main as train_main

HERE = Path(__file__).parent
HF = HERE.parent / "fixtures" / "hf" / "llama3"
HF_TOKENS = HERE.parent / "fixtures" / "eval" / "llama3"  # prepared with HF's tokenizer
TINY = "--devices 8 --dim 32 --hidden-dim 64 --samples 16 --max-steps 2 --no-progress".split()


def _user_files(t: Path) -> None:
    """A directory of the user's: a prepared dataset and notes, nothing jtp exported."""
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("my notes")
    (t / "mine" / "train.bin").write_bytes(b"\x01\x02" * 64)


def _a_file(t: Path) -> None:
    (t / "weights.txt").write_text("not a directory")


def _texts(t: Path) -> None:
    (t / "texts").mkdir()
    for i in range(3):
        (t / "texts" / f"{i}.txt").write_text(f"document {i} " * 50)


def _hf_copy(t: Path) -> None:
    shutil.copytree(HF, t / "hf")


def _checkpoints(t: Path) -> None:
    """An earlier run's checkpoints (a real, tiny run)."""
    train_main([*TINY, "--checkpoint-dir", str(t / "ck"), "--root-dir", str(t / "runs")])


def _hf_with(**fields):
    """A copy of the HF fixture whose config.json has ``fields`` changed."""

    def setup(t: Path) -> None:
        _hf_copy(t)
        config = json.loads((t / "hf" / "config.json").read_text())
        (t / "hf" / "config.json").write_text(json.dumps({**config, **fields}))

    return setup


def _truncated_weights(t: Path) -> None:
    _hf_copy(t)
    weights = t / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # cut inside the header


def _prepared(t: Path) -> Path:
    (t / "a.txt").write_text("the cat sat on the mat. " * 100)
    prepare_cli.main([str(t / "a.txt"), "--out", str(t / "data"), "--bytes", "--no-progress"])
    return t / "data"


def _truncated_data(t: Path) -> None:
    train = _prepared(t) / "train.bin"
    train.write_bytes(train.read_bytes()[:-100])


def _garbage_meta(t: Path) -> None:
    (_prepared(t) / "meta.json").write_bytes(b"\xff\xfe garbage \x00")


# (id, setup, program, argv with {t} for the test directory, the culprit the message names)
CASES = [
    (
        "export-hf-into-users-directory",
        _user_files,
        "train",
        ["--model", "llama", "--preset", "tiny", "--export-hf", "{t}/mine"],
        "files jtp did not write",
    ),
    (
        "export-hf-onto-checkpoint-dir",
        _checkpoints,
        "train",
        ("--model llama --preset tiny --checkpoint-dir {t}/ck --resume --export-hf {t}/ck").split(),
        "overlaps --checkpoint-dir",
    ),
    (
        "export-hf-onto-a-file",
        _a_file,
        "train",
        ["--model", "llama", "--preset", "tiny", "--export-hf", "{t}/weights.txt"],
        "is a file, not a directory",
    ),
    (
        "export-hf-missing-parent",
        None,
        "train",
        ["--model", "llama", "--preset", "tiny", "--export-hf", "{t}/no/such/dir"],
        "does not exist",
    ),
    (
        "export-hf-of-the-feedforward",
        None,
        "train",
        ["--export-hf", "{t}/out"],
        "add --model llama",
    ),
    (
        "export-hf-into-the-hf-source",
        _hf_copy,
        "train",
        ["--model", "llama", "--hf", "{t}/hf", "--export-hf", "{t}/hf"],
        "overlaps --hf",
    ),
    ("export-onto-a-directory", _user_files, "train", ["--export", "{t}/mine"], "is a directory"),
    (
        "export-onto-a-users-file",
        _a_file,
        "train",
        ["--export", "{t}/weights.txt"],
        "is not a consolidated parameter file written by jtp",
    ),
    (
        "export-peft-into-users-directory",
        _user_files,
        "train",
        ["--model", "llama", "--preset", "tiny", "--lora-rank", "2", "--export-peft", "{t}/mine"],
        "files jtp did not write",
    ),
    (
        "metrics-json-onto-a-directory",
        _user_files,
        "train",
        ["--metrics-json", "{t}/mine"],
        "--metrics-json",
    ),
    (
        "resume-from-a-misspelt-directory",
        None,
        "train",
        ["--checkpoint-dir", "{t}/chekpoints", "--resume"],
        "does not exist (misspelt?)",
    ),
    (
        "new-run-into-another-runs-checkpoints",
        _checkpoints,
        "train",
        ["--checkpoint-dir", "{t}/ck"],
        "pass --resume",
    ),
    (
        "checkpoint-dir-is-the-data",
        None,
        "train",
        ["--model", "llama", "--data", "{t}/data", "--checkpoint-dir", "{t}/data/ck"],
        "--checkpoint-dir",
    ),
    (
        "prepare-onto-its-sources",
        _texts,
        "prepare",
        ["{t}/texts", "--bytes", "--out", "{t}/texts", "--overwrite"],
        "overlaps FILES",
    ),
    (
        "prepare-over-users-directory",
        _user_files,
        "prepare",
        ["{t}/mine/notes.txt", "--bytes", "--out", "{t}/mine", "--overwrite"],
        "overlaps FILES",
    ),
    (
        "prepare-over-another-users-directory",
        lambda t: (_user_files(t), _texts(t)),
        "prepare",
        ["{t}/texts", "--bytes", "--out", "{t}/mine", "--overwrite"],
        "files jtp did not write",
    ),
    (
        "prepare-onto-a-file",
        lambda t: (_a_file(t), _texts(t)),
        "prepare",
        ["{t}/texts", "--bytes", "--out", "{t}/weights.txt", "--overwrite"],
        "is a file",
    ),
    # Accepted silently, or refused only after a compile and a NaN step, before:
    ("negative-lr", None, "train", ["--lr", "-1"], "lr=-1.0 (--lr): must be > 0"),
    ("nan-lr", None, "train", ["--lr", "nan"], "(--lr): must be a finite number"),
    ("zero-seq-len", None, "train", ["--model", "llama", "--seq-len", "0"], "(--seq-len)"),
    ("negative-seq-len", None, "train", ["--model", "llama", "--seq-len", "-16"], "(--seq-len)"),
    (
        "seq-len-beyond-the-checkpoint",
        None,
        "train",
        ["--model", "llama", "--hf", str(HF), "--seq-len", "4096"],
        "max_position_embeddings in",
    ),
    (
        "truncated-train-bin",
        _truncated_data,
        "train",
        ["--model", "llama", "--data", "{t}/data"],
        "meta.json says",
    ),
    (
        "garbage-meta-json",
        _garbage_meta,
        "train",
        ["--model", "llama", "--data", "{t}/data"],
        "meta.json is not valid JSON",
    ),
    (
        "config-hidden-size-a-string",
        _hf_with(hidden_size="32"),
        "train",
        ["--model", "llama", "--hf", "{t}/hf"],
        "hidden_size='32' must be an integer",
    ),
    (
        "config-layers-a-fraction",
        _hf_with(num_hidden_layers=2.5),
        "train",
        ["--model", "llama", "--hf", "{t}/hf"],
        "num_hidden_layers=2.5 must be an integer",
    ),
    (
        "config-negative-norm-eps",
        _hf_with(rms_norm_eps=-1),
        "train",
        ["--model", "llama", "--hf", "{t}/hf"],
        "rms_norm_eps=-1 must be a finite number > 0",
    ),
    (
        "config-rope-theta-a-word",
        _hf_with(rope_theta="abc"),
        "train",
        ["--model", "llama", "--hf", "{t}/hf"],
        "rope_theta='abc' must be a number",
    ),
    (
        "config-not-json",
        lambda t: (_hf_copy(t), (t / "hf" / "config.json").write_text("{x")),
        "train",
        ["--model", "llama", "--hf", "{t}/hf"],
        "config.json is not valid JSON",
    ),
    (
        "truncated-safetensors",
        _truncated_weights,
        "train",
        ["--model", "llama", "--hf", "{t}/hf"],
        "is not a readable safetensors file",
    ),
    (
        "eval-json-onto-a-directory",
        _user_files,
        "eval",
        ["--hf", str(HF), "--data", "{t}/data", "--json", "{t}/mine"],
        "--json",
    ),
    (
        "eval-step-of-an-hf-model",
        None,
        "eval",
        ["--hf", str(HF), "--data", "{t}/data", "--step", "3"],
        "--step",
    ),
    (
        "capacity-tensor-that-cuts-heads",
        None,
        "capacity",
        ["--devices", "8", "--tensor", "3"],
        "valid sizes: [1, 2, 4, 8]",
    ),
    (
        "tensor-size-that-does-not-divide-the-devices",
        None,
        "train",
        ["--tensor-parallel", "3"],
        "valid sizes: 1, 2, 4, 8",
    ),
    (
        "expert-parallel-on-a-dense-llama",
        None,
        "train",
        ["--model", "llama", "--expert-parallel", "2"],
        "this model is dense (n_experts=0)",
    ),
    (
        "expert-parallel-on-the-feedforward",
        None,
        "train",
        ["--expert-parallel", "2"],
        "--model feedforward has none",
    ),
    (
        "context-parallel-on-the-feedforward",
        None,
        "train",
        ["--context-parallel", "2"],
        "splits each token sequence over devices (--model feedforward has none)",
    ),
    (
        "context-parallel-not-dividing-the-devices",
        None,
        "train",
        ["--model", "llama", "--context-parallel", "3"],
        "8 devices are not divisible by data=1 x context=3 = 3; valid sizes: 1, 2, 4, 8",
    ),
    (
        "seq-len-not-in-2c-chunks",
        None,
        "train",
        ["--model", "llama", "--context-parallel", "4", "--seq-len", "36"],
        "--seq-len 36 is not divisible by 8",
    ),
    (
        "context-piece-not-divisible-by-tensor-under-sequence-parallel",
        None,
        "train",
        ["--model", "llama", "--context-parallel", "2", "--tensor-parallel", "4"]
        + ["--sequence-parallel", "--seq-len", "36"],
        "a device's piece of --seq-len 36 / 2 = 18 tokens is not divisible by the tensor",
    ),
    (
        "eval-seq-len-not-in-2c-chunks",
        None,
        "eval",
        ["--hf", str(HF), "--data", str(HF_TOKENS), "--context-parallel", "4", "--seq-len", "12"],
        "--seq-len 12 is not divisible by 8",
    ),
    (
        "generate-with-context-parallel",
        None,
        "generate",
        ["--hf", str(HF), "--prompt-ids", "1,2", "--context-parallel", "2"],
        "generation does not split the sequence over 'context'",
    ),
    ("nan-temperature", None, "generate", ["--temperature", "nan"], "--temperature"),
    ("mem-fraction-above-one", None, "capacity", ["--mem-fraction", "2"], "--mem-fraction"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


def _run(program: str, argv: list[str]) -> int:
    """The program's own entry point, as ``python -m jtp.<program>`` runs it."""
    runs = {
        "prepare": prepare_cli.run,
        "generate": generate_cli.run,
        "capacity": capacity_cli.run,
        "eval": eval_cli.run,
    }
    saved = sys.argv
    try:
        if program == "train":
            _run_and_exit(argv)
        else:
            sys.argv = [f"jtp.{program}", *argv]
            runs[program]()
    except SystemExit as stop:
        return stop.code
    finally:
        sys.argv = saved
    return 0


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_before_any_work_and_nothing_lost(case, tmp_path, capsys):
    _, setup, program, argv, culprit = case
    if setup is not None:
        setup(tmp_path)
    if "--data" in argv and not (tmp_path / "data").exists():  # a real dataset to train on
        _prepared(tmp_path)
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    if program == "train":
        argv = [*TINY, "--root-dir", str(tmp_path / "runs"), *argv]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    with backend_compiles() as compiles:
        code = _run(program, argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    if "error: argument" in err:  # argparse: its usage, then the one error line
        assert lines[-1].startswith(f"python -m jtp.{program}: error: argument "), err
    else:
        assert len(lines) == 1, err  # one line
    assert culprit in lines[-1], lines[-1]
    assert compiles == [], "refused only after compiling"
    assert _snapshot(tmp_path) == before  # every file byte-identical, none added


def test_an_export_replaces_only_its_own_kind(tmp_path):
    """The refusals' other side: an empty directory, and a previous export of the same kind,
    are written (replaced atomically); a prepared dataset is no place for an HF export."""
    (tmp_path / "empty").mkdir()
    args = [*TINY, "--model", "llama", "--preset", "tiny", "--root-dir", str(tmp_path / "runs")]
    train_main([*args, "--export-hf", str(tmp_path / "empty")])
    assert (tmp_path / "empty" / "config.json").is_file()
    first = _snapshot(tmp_path / "empty")
    train_main([*args, "--export-hf", str(tmp_path / "empty"), "--lr", "0.01"])
    again = _snapshot(tmp_path / "empty")
    assert sorted(again) == sorted(first) and again != first  # replaced, same files
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old" in p]
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 100)
    prepare_cli.main([str(tmp_path / "t.txt"), "--out", str(tmp_path / "d"), "--bytes"])
    prepare_cli.main(
        [str(tmp_path / "t.txt"), "--out", str(tmp_path / "d"), "--bytes", "--overwrite"]
    )
    code = _run("train", [*args, "--export-hf", str(tmp_path / "d")])
    assert code == 2 and (tmp_path / "d" / "train.bin").is_file()
