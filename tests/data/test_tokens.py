"""TokenDataset: windows of a memory-mapped token file, the same rows on every mesh and in
every process layout, each window once per epoch, resumable; bad files named clearly."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from processes import two_workers, wait_all

import jtp

SEQ = 4


def write_tokens(directory: Path, tokens, vocab: int, *, meta: bool = True, **extra) -> Path:
    """``directory/train.bin`` holding ``tokens`` (uint16) and, optionally, meta.json."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "train.bin"
    np.asarray(tokens, np.uint16).tofile(path)
    if meta:
        fields = {"vocab_size": vocab, "dtype": "uint16", **extra}
        (directory / "meta.json").write_text(json.dumps(fields))
    return path


@pytest.fixture
def counting(tmp_path):
    """Token i is i: a window's first token divided by SEQ is its index."""
    return write_tokens(tmp_path / "d", np.arange(64 * SEQ + 3), vocab=1 << 16)


def test_windows_overlap_by_one_and_cover_the_file(counting):
    data = jtp.TokenDataset(counting, SEQ)
    assert len(data) == (64 * SEQ + 3 - 1) // SEQ == 64
    for i in (0, 1, 63):
        np.testing.assert_array_equal(data[i], np.arange(i * SEQ, (i + 1) * SEQ + 1))
        assert data[i].dtype == np.int32
    with pytest.raises(IndexError):
        data[64]


def _epoch(path, shape, **kw):
    loader = jtp.DataLoader(jtp.TokenDataset(path, SEQ), 8, mesh=jtp.make_mesh(*shape), **kw)
    return loader, [np.asarray(b) for b in loader]


def _tensor_groups_agree(batch, mesh):
    by_rank = {}
    for s in batch.addressable_shards:
        rank = int(np.argwhere(mesh.devices == s.device)[0][0])
        by_rank.setdefault(rank, []).append(np.asarray(s.data))
    for rank, shards in by_rank.items():
        assert all(np.array_equal(shards[0], x) for x in shards), f"tensor group {rank}"


def test_same_rows_on_1x8_and_2x4_and_every_window_once(counting):
    loader, a = _epoch(counting, (1, 8), shuffle=True, seed=3)
    _, b = _epoch(counting, (2, 4), shuffle=True, seed=3)
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)  # the global batch is the same on both meshes
    first = np.concatenate(a)[:, 0] // SEQ
    assert sorted(first.tolist()) == list(range(64))  # every window exactly once per epoch
    mesh = jtp.make_mesh(2, 4)
    for batch in jtp.DataLoader(jtp.TokenDataset(counting, SEQ), 8, mesh=mesh, shuffle=True):
        _tensor_groups_agree(batch, mesh)


def test_resume_mid_epoch(counting):
    mesh = jtp.make_mesh(2, 4)
    full = jtp.DataLoader(jtp.TokenDataset(counting, SEQ), 8, mesh=mesh, shuffle=True, seed=9)
    full.set_epoch(1)
    expected = [np.asarray(b) for b in full]
    first = jtp.DataLoader(jtp.TokenDataset(counting, SEQ), 8, mesh=mesh, shuffle=True, seed=9)
    first.set_epoch(1)
    got = []
    for i, b in enumerate(first):
        got.append(np.asarray(b))
        if i == 2:
            break
    resumed = jtp.DataLoader(jtp.TokenDataset(counting, SEQ), 8, mesh=mesh, shuffle=True, seed=9)
    resumed.load_state_dict(first.state_dict())
    got += [np.asarray(b) for b in resumed]
    assert len(got) == len(expected) == 8
    for x, y in zip(got, expected, strict=True):
        np.testing.assert_array_equal(x, y)


def test_two_processes_hold_the_one_process_rows_and_read_only_their_own(counting):
    """Each process's devices hold exactly the rows one process puts there, on (2, 4) and
    on (1, 8) (a tensor group across both processes); on (2, 4) a process reads only the
    windows of its data rank."""
    worker = Path(__file__).with_name("mp_tokens_worker.py")
    procs = two_workers(worker, counting.parent, "w", str(counting), str(SEQ))
    logs = [counting.parent / f"w{i}.log" for i in range(2)]
    codes = wait_all(procs, timeout=120)
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], [t[-3000:] for t in text]
    reports = [json.loads(next(ln for ln in t.splitlines() if ln[:1] == "{")) for t in text]
    for shape in [(2, 4), (1, 8)]:
        key = f"{shape[0]}x{shape[1]}"
        _, ref = _epoch(counting, shape, shuffle=True, seed=3)
        rows_per_rank = 8 // shape[0]
        for p, report in enumerate(reports):
            got = report[key]["batches"]
            assert len(got) == len(ref) == 8
            for shards, batch in zip(got, ref, strict=True):
                assert len(shards) == 4  # this process's four devices
                for rank, _tensor, rows in shards:
                    block = batch[rank * rows_per_rank : (rank + 1) * rows_per_rank]
                    np.testing.assert_array_equal(np.asarray(rows), block)
            read = set(report[key]["read"])
            if shape == (2, 4):  # process p owns data rank p: its half of every batch
                mine = {int(r[0]) // SEQ for b in ref for r in b[p * 4 : (p + 1) * 4]}
                assert read == mine and len(read) == 32
            else:  # one data rank spans both processes: both read every window
                assert read == set(range(64))


def test_vocabulary_errors_name_file_id_and_size(tmp_path):
    tokens = np.arange(40) % 20
    tokens[13] = 300
    with_max = write_tokens(tmp_path / "a", tokens, vocab=512, max_token_id=300)
    with pytest.raises(ValueError, match=r"train.bin: token id 300 \(its largest, per meta"):
        jtp.TokenDataset(with_max, SEQ, vocab_size=256)  # up front, nothing read
    without = write_tokens(tmp_path / "b", tokens, vocab=512)
    data = jtp.TokenDataset(without, SEQ, vocab_size=256)
    data[0]  # windows 0..2 hold ids < 20
    with pytest.raises(ValueError, match=r"b/train.bin: token id 300 \(at position 13, window 3\)"):
        data[3]
    with pytest.raises(ValueError, match="outside the model's vocabulary of 256"):
        data[3]
    assert jtp.TokenDataset(without, SEQ).vocab_size == 512  # default: meta.json's


@pytest.mark.parametrize(
    "case,msg",
    [
        ("short", r"holds 4 tokens, fewer than one window of seq_len \+ 1 = 5"),
        ("odd_bytes", "is not a whole number of uint16 ids"),
        ("no_meta", "no meta.json beside .*; pass dtype="),
        ("bad_meta", r"meta.json lacks \['dtype'\]"),
        ("seq_len", "seq_len=0 must be a positive int"),
    ],
)
def test_bad_token_files(tmp_path, case, msg):
    seq = 0 if case == "seq_len" else SEQ
    path = write_tokens(
        tmp_path, np.arange(4 if case == "short" else 40), 64, meta=case != "no_meta"
    )
    if case == "odd_bytes":
        with open(path, "ab") as f:
            f.write(b"\0")
    if case == "bad_meta":
        (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 64}))
    with pytest.raises(ValueError, match=msg):
        jtp.TokenDataset(path, seq)


def test_without_meta_dtype_and_vocab_are_arguments(tmp_path):
    path = write_tokens(tmp_path, np.arange(40), 64, meta=False)
    data = jtp.TokenDataset(path, SEQ, dtype=np.uint16, vocab_size=64)
    np.testing.assert_array_equal(data[1], np.arange(4, 9))
    assert not os.path.exists(tmp_path / "meta.json")
