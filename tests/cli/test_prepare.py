"""python -m jtp.prepare: text -> token files and back, byte-level and through a tokenizer
built here by ``tokenizers``; every bad input a clear error with nothing half-written."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import jtp
from jtp.cli.prepare import main as prepare_main
from jtp.cli.prepare import run as prepare_run

TEXTS = {
    "a.py": "def add(a, b):\n    return a + b\n" * 7,
    "b.txt": "héllo wörld, the quick brown fox\n" * 5,
    "sub/c.py": "import os\nprint(os.getcwd())\n" * 3,
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / ".hidden").write_text("never read")
    return root


def _split(docs, fraction):
    """The split prepare promises, recomputed: each document's tail to val, with
    val = round(fraction x tokens so far) carried across documents."""
    train, val, seen = [], [], 0
    for ids in docs:
        seen += len(ids)
        n_val = min(len(ids), round(fraction * seen) - sum(map(len, val)))
        train.append(ids[: len(ids) - n_val])
        val.append(ids[len(ids) - n_val :])
    return train, val


def _files(corpus):
    return sorted(p for p in corpus.rglob("*") if p.is_file() and p.name != ".hidden")


def test_bytes_round_trip(corpus, tmp_path, capsys):
    out = tmp_path / "data"
    meta = prepare_main([str(corpus), "--out", str(out), "--bytes", "--val-fraction", "0.25"])
    docs = [np.frombuffer(p.read_bytes(), np.uint8) for p in _files(corpus)]
    train, val = map(np.concatenate, _split(docs, 0.25))
    np.testing.assert_array_equal(np.fromfile(out / "train.bin", np.uint8), train)
    np.testing.assert_array_equal(np.fromfile(out / "val.bin", np.uint8), val)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint8" and meta["documents"] == 3
    assert meta["train_tokens"] == train.size and meta["val_tokens"] == val.size
    assert meta["val_tokens"] == round(0.25 * sum(d.size for d in docs))
    assert meta["max_token_id"] == max(int(d.max()) for d in docs)
    assert f"train.bin {train.size:,} tokens" in capsys.readouterr().out
    text = b"".join(p.read_bytes() for p in _files(corpus))
    whole = prepare_main(
        [str(corpus), "--out", str(tmp_path / "all"), "--bytes", "--val-fraction", "0"]
    )
    assert (tmp_path / "all" / "train.bin").read_bytes() == text and whole["val_tokens"] == 0
    window = jtp.TokenDataset(str(out / "train.bin"), 8)[0]  # dtype and vocab from meta.json
    np.testing.assert_array_equal(window, train[:9])


def _tokenizer(path: Path) -> Path:
    """A small byte-level BPE, trained here: decode(encode(text)) == text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS.values(), trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def test_tokenizer_round_trip(corpus, tmp_path):
    from tokenizers import Tokenizer

    file = _tokenizer(tmp_path / "checkpoint")
    out = tmp_path / "data"
    meta = prepare_main(
        [str(p) for p in _files(corpus)] + ["--out", str(out), "--tokenizer", str(file.parent)]
    )  # a checkpoint directory holding tokenizer.json
    tok = Tokenizer.from_file(str(file))
    docs = [np.asarray(tok.encode(p.read_text()).ids) for p in _files(corpus)]
    heads, tails = _split(docs, 0.1)
    train = np.fromfile(out / "train.bin", meta["dtype"])
    val = np.fromfile(out / "val.bin", meta["dtype"])
    np.testing.assert_array_equal(train, np.concatenate(heads))
    np.testing.assert_array_equal(val, np.concatenate(tails))
    assert meta["vocab_size"] == tok.get_vocab_size(with_added_tokens=True) > 256
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == str(file.resolve())
    assert meta["val_tokens"] > 0 and meta["max_token_id"] == int(max(d.max() for d in docs))
    # Back to text: each document is its head in train.bin followed by its tail in val.bin.
    t_cuts, v_cuts = np.cumsum([len(h) for h in heads]), np.cumsum([len(t) for t in tails])
    for path, h, t in zip(
        _files(corpus), np.split(train, t_cuts[:-1]), np.split(val, v_cuts[:-1]), strict=True
    ):
        assert tok.decode(np.concatenate([h, t]).tolist()) == path.read_text()


def _nothing_written(tmp_path, out="data"):
    assert not (tmp_path / out).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out}.")]


@pytest.mark.parametrize(
    "setup,args,msg",
    [
        ("empty", ["--bytes"], r"no tokens: the 2 input file\(s\) are empty"),
        ("missing", ["--bytes"], "nope.txt: no such file or directory"),
        ("binary", ["--tokenizer", "TOK"], r"bin.dat: not UTF-8 text"),
        ("bad_tok", ["--tokenizer", "BAD"], "is not a Hugging Face tokenizers file"),
        ("no_tok", ["--tokenizer", "NOTOK"], "no tokenizer.json there"),
        ("fraction", ["--bytes", "--val-fraction", "1"], r"--val-fraction 1.0 must be in \[0, 1\)"),
        ("tiny", ["--bytes", "--val-fraction", "0.01"], "leaves no validation tokens"),
    ],
)
def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path, setup, args, msg):
    inputs = {
        "empty": ["e1.txt", "e2.txt"],
        "missing": ["nope.txt"],
        "binary": ["ok.txt", "bin.dat"],
        "tiny": ["tiny.txt"],
    }.get(setup, ["ok.txt"])
    (tmp_path / "ok.txt").write_text("some text\n" * 20)
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("")
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00\x80" * 10)
    (tmp_path / "tiny.txt").write_text("abc")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "notok").mkdir()
    subs = {"TOK": str(_tokenizer(tmp_path / "tok")), "BAD": str(tmp_path / "bad.json")}
    subs["NOTOK"] = str(tmp_path / "notok")
    argv = [str(tmp_path / f) for f in inputs] + ["--out", str(tmp_path / "data")]
    argv += [subs.get(a, a) for a in args]
    with pytest.raises(ValueError, match=msg):
        prepare_main(argv)
    _nothing_written(tmp_path)


def test_unreadable_file_midway_leaves_nothing(tmp_path, monkeypatch):
    """The first file is already written to the temporary directory when the second fails."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("x" * 100)
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "b.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    with pytest.raises(ValueError, match=r"b.txt: cannot read it \(Permission denied\)"):
        prepare_main([*files, "--out", str(tmp_path / "data"), "--bytes"])
    _nothing_written(tmp_path)


def test_existing_out_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    args = [str(tmp_path / "t.txt"), "--out", str(tmp_path / "data"), "--bytes"]
    prepare_main(args)
    with pytest.raises(ValueError, match="data exists; remove it or pass --overwrite"):
        prepare_main(args)
    (tmp_path / "t.txt").write_text("hello again\n" * 60)
    assert prepare_main([*args, "--overwrite"])["train_tokens"] + 72 == 720
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "t.txt"]


def test_run_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["jtp.prepare", str(tmp_path / "x"), "--out", "o", "--bytes"])
    with pytest.raises(SystemExit) as stop:
        prepare_run()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m jtp.prepare: error: ") and "no such file" in err
    with pytest.raises(SystemExit):  # --bytes and --tokenizer exclude each other
        prepare_main(["a", "--out", "o", "--bytes", "--tokenizer", "t.json"])
