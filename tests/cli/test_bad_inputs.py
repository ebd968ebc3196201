"""Bad inputs as careless or unlucky users give them, one table: each is refused with exit
status 2 and one line naming the culprit, no traceback, before anything is compiled, and
every file that existed before is byte-identical after (no file appears either).

Found by trying 124 bad inputs against the programs; the cases here are those that lost the
user's data or were refused only after the work was done (docs/testing.md keeps the count).
"""

import hashlib
import os
import shutil
import sys
from pathlib import Path

import jax
import pytest

from jtp.cli import prepare as prepare_cli
from jtp.cli.train import _run_and_exit
from jtp.cli.train import main as train_main

HERE = Path(__file__).parent
HF = HERE.parent / "fixtures" / "hf" / "llama3"
TINY = ["--devices", "8", "--dim", "32", "--hidden-dim", "64", "--samples", "16",
        "--max-steps", "2", "--no-progress"]  # fmt: skip


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


# (id, setup, program, argv with {t} for the test directory, the culprit the message names)
CASES = [
    ("export-hf-into-users-directory", _user_files, "train",
     ["--model", "llama", "--preset", "tiny", "--export-hf", "{t}/mine"],
     "files jtp did not write"),
    ("export-hf-onto-checkpoint-dir", _checkpoints, "train",
     ["--model", "llama", "--preset", "tiny", "--checkpoint-dir", "{t}/ck", "--resume",
      "--export-hf", "{t}/ck"], "overlaps --checkpoint-dir"),
    ("export-hf-onto-a-file", _a_file, "train",
     ["--model", "llama", "--preset", "tiny", "--export-hf", "{t}/weights.txt"],
     "is a file, not a directory"),
    ("export-hf-missing-parent", None, "train",
     ["--model", "llama", "--preset", "tiny", "--export-hf", "{t}/no/such/dir"], "does not exist"),
    ("export-hf-of-the-feedforward", None, "train", ["--export-hf", "{t}/out"],
     "add --model llama"),
    ("export-hf-into-the-hf-source", _hf_copy, "train",
     ["--model", "llama", "--hf", "{t}/hf", "--export-hf", "{t}/hf"], "overlaps --hf"),
    ("export-onto-a-directory", _user_files, "train", ["--export", "{t}/mine"],
     "is a directory"),
    ("export-onto-a-users-file", _a_file, "train", ["--export", "{t}/weights.txt"],
     "is not a consolidated parameter file written by jtp"),
    ("export-peft-into-users-directory", _user_files, "train",
     ["--model", "llama", "--preset", "tiny", "--lora-rank", "2", "--export-peft", "{t}/mine"],
     "files jtp did not write"),
    ("metrics-json-onto-a-directory", _user_files, "train", ["--metrics-json", "{t}/mine"],
     "--metrics-json"),
    ("resume-from-a-misspelt-directory", None, "train",
     ["--checkpoint-dir", "{t}/chekpoints", "--resume"], "does not exist (misspelt?)"),
    ("new-run-into-another-runs-checkpoints", _checkpoints, "train",
     ["--checkpoint-dir", "{t}/ck"], "pass --resume"),
    ("checkpoint-dir-is-the-data", None, "train",
     ["--model", "llama", "--data", "{t}/data", "--checkpoint-dir", "{t}/data/ck"],
     "--checkpoint-dir"),
    ("prepare-onto-its-sources", _texts, "prepare",
     ["{t}/texts", "--bytes", "--out", "{t}/texts", "--overwrite"], "overlaps FILES"),
    ("prepare-over-users-directory", _user_files, "prepare",
     ["{t}/mine/notes.txt", "--bytes", "--out", "{t}/mine", "--overwrite"], "overlaps FILES"),
    ("prepare-over-another-users-directory", lambda t: (_user_files(t), _texts(t)), "prepare",
     ["{t}/texts", "--bytes", "--out", "{t}/mine", "--overwrite"], "files jtp did not write"),
    ("prepare-onto-a-file", lambda t: (_a_file(t), _texts(t)), "prepare",
     ["{t}/texts", "--bytes", "--out", "{t}/weights.txt", "--overwrite"], "is a file"),
]  # fmt: skip


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


def _run(program: str, argv: list[str]) -> int:
    """The program's own entry point, as ``python -m jtp.<program>`` runs it."""
    try:
        if program == "train":
            _run_and_exit(argv)
        else:
            sys.argv = ["jtp.prepare", *argv]
            prepare_cli.run()
    except SystemExit as stop:
        return stop.code
    return 0


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_before_any_work_and_nothing_lost(case, tmp_path, capsys):
    _, setup, program, argv, culprit = case
    if setup is not None:
        setup(tmp_path)
    if "--data" in argv:  # a real prepared dataset to train on
        (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 100)
        prepare_cli.main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "data"), "--bytes"])
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    if program == "train":
        argv = [*TINY, "--root-dir", str(tmp_path / "runs"), *argv]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        code = _run(program, argv)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err  # one line, no traceback
    assert culprit in lines[0], lines[0]
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
    prepare_cli.main([str(tmp_path / "t.txt"), "--out", str(tmp_path / "d"), "--bytes",
                      "--overwrite"])  # fmt: skip
    code = _run("train", [*args, "--export-hf", str(tmp_path / "d")])
    assert code == 2 and (tmp_path / "d" / "train.bin").is_file()
