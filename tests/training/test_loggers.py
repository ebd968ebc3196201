"""Loggers and the progress bar: TensorBoard event files read back by TensorBoard's own
reader, an offline W&B run read back from its ``.wandb`` file, CSV columns that appear
mid-run, the rich bar's fields."""

import csv
import glob
import io
import json
import struct
import zlib

import pytest
from test_validation import Scheduled

import jtp
from jtp.training.loggers import MetricsLogger
from jtp.training.progress import ProgressBar


def test_tensorboard_event_file_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(2, 4),
        max_epochs=1,
        logger="tensorboard",
        default_root_dir=str(tmp_path),
        val_check_interval=2,
        enable_progress_bar=False,
        report_memory=False,
    )
    trainer.fit(Scheduled())
    events = EventAccumulator(trainer.log_dir)
    events.Reload()
    assert {"loss", "lr", "val_loss", "epoch"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    # TensorBoard stores fp32 scalars: one rounding (6e-8) of each float64 value.
    assert [e.value for e in loss] == pytest.approx(trainer.losses, rel=1e-6)
    val = events.Scalars("val_loss")
    assert [(e.step, e.value) for e in val] == [
        (v["step"], pytest.approx(v["val_loss"], rel=1e-6)) for v in trainer.val_history
    ]
    assert [e.step for e in val] == [2, 4]
    assert events.Scalars("lr")[0].value == pytest.approx(1e-2)  # fp32 1e-2: rel 1e-6 default


def test_csv_gains_a_column_mid_run(tmp_path):
    log = MetricsLogger(str(tmp_path), "csv")
    log.log([{"step": 1, "epoch": 0, "loss": 3.0}, {"step": 2, "epoch": 0, "loss": 2.5}])
    log.log([{"step": 3, "epoch": 0, "loss": 2.0, "val_loss": 2.2}])
    log.log([{"step": 4, "epoch": 0, "loss": 1.5}])
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert list(rows[0]) == ["step", "epoch", "loss", "val_loss"]
    assert [r["loss"] for r in rows] == ["3.0", "2.5", "2.0", "1.5"]
    assert [r["val_loss"] for r in rows] == ["", "", "2.2", ""]


def _bar_output(terminal: bool) -> str:
    out = io.StringIO()
    bar = ProgressBar(True, out, terminal=terminal)
    bar.start_epoch()
    bar.update(0, 5, 10, {"loss": 2.5, "lr": 3e-3, "val_loss": 2.75}, samples=32, tokens=4096)
    bar.update(0, 10, 10, {"loss": 2.25, "lr": 1e-3}, samples=32, tokens=4096)
    bar.close()
    return out.getvalue()


def test_rich_bar_shows_loss_val_loss_lr_and_rates(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = _bar_output(terminal=True)
    assert "\x1b[" in text and "━" in text  # drawn by rich, in place
    final = text.rsplit("\r", 1)[-1]  # the last redraw: bar row, then the metrics line
    for field in ("epoch 0", "10/10", "loss 2.25", "val_loss 2.75", "lr 0.001", "it/s"):
        assert field in final, (field, final)
    assert "samples/s" in final and "tokens/s" in final


def test_plain_bar_one_line_per_update_keeps_the_last_val_loss():
    lines = _bar_output(terminal=False).splitlines()
    assert len(lines) == 2 and lines[1].startswith("epoch 0 [10/10] loss 2.25 val_loss 2.75 lr")
    rate = float(lines[1].split("| ")[1].split(" it/s")[0])
    tokens = float(lines[1].split("samples/s ")[1].split(" tokens/s")[0])
    # Both from one rate; it/s printed to 0.01 and tokens/s to 1: 1% while the rate is
    # above 0.5 it/s (two updates microseconds apart run at thousands).
    assert tokens == pytest.approx(rate * 4096, rel=0.01)


def test_tensorboard_without_tensorboardx_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    from jtp.training.loggers import TensorBoardLogger

    with pytest.raises(ImportError, match=r"pip install 'jtp\[tensorboard\]'"):
        TensorBoardLogger(str(tmp_path))


def _wandb_records(path: str) -> list:
    """The records of an offline run's ``.wandb`` file (wandb 0.31 ships no Python reader
    of it; its Go core writes it). The format: a 7-byte header (``:W&B``, magic 0xBEE1,
    version 0), then LevelDB's log format: 32 KiB blocks of chunks, each a 7-byte header
    (CRC-32 of type + data, length, type: 1 full, 2 first, 3 middle, 4 last) and its data,
    a block's tail under 7 bytes zero-padded; a whole record is one
    ``wandb_internal_pb2.Record``. Every chunk's CRC is checked, so a misread fails."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, pending, records = 32768, 7, b"", []
    while pos < len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding at the end of the file
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at {pos}"
        pending += chunk
        if kind in (1, 4):
            records.append(Record.FromString(pending))
            pending = b""
    return records


def _offline_run(root) -> list:
    """The records of the one offline run under ``root``. The run's ``finish`` returns
    before wandb's service process has flushed the file; ``wandb.teardown`` waits for the
    service to exit."""
    import wandb

    wandb.teardown()
    (path,) = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    return _wandb_records(path)


def _history(records: list) -> list[dict]:
    """Each history record as ``{metric: value}`` (wandb adds ``_step``, ``_runtime``...)."""
    rows = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    return [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in row.item}
        for row in rows
    ]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline: nothing reaches a server, every file under ``tmp_path``. wandb reads
    its environment once per process (``wandb.setup``), so it is torn down on both sides:
    this test's settings apply, and its service process ends with the test."""
    import wandb

    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for name in ("CONFIG", "CACHE", "DATA"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / name.lower()))
    yield
    wandb.teardown()


@pytest.mark.usefixtures("offline_wandb")
def test_wandb_offline_run_read_back(tmp_path):
    """The run holds each step's loss, lr and epoch at that step, and the validation loss at
    the steps it followed, exactly as the trainer recorded them (JSON numbers round-trip a
    float64); the Trainer's options as its config; a clean exit."""
    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(2, 4),
        max_epochs=1,
        logger="wandb",
        log_every_n_steps=2,
        default_root_dir=str(tmp_path / "runs"),
        val_check_interval=2,
        enable_progress_bar=False,
        report_memory=False,
    )
    trainer.fit(Scheduled())
    records = _offline_run(tmp_path)
    history = _history(records)
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    assert [h["loss"] for h in history] == trainer.losses and len(set(trainer.losses)) == 4
    assert [h["lr"] for h in history] == [m["lr"] for m in trainer.metrics_history]
    assert [h["epoch"] for h in history] == [0, 0, 0, 0]
    val = [(h["_step"], h["val_loss"]) for h in history if "val_loss" in h]
    assert val == [(v["step"], v["val_loss"]) for v in trainer.val_history] and len(val) == 2
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["logger"] == "wandb" and config["val_check_interval"] == 2
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits and set(exits) == {0}


class _LoaderBreaks(Scheduled):
    def train_dataloader(self):
        loader = super().train_dataloader()

        class OneBatch:
            def __iter__(self):
                yield next(iter(loader))
                raise RuntimeError("the loader broke")

        return OneBatch()


class _NaNUnsized(Scheduled):
    """Non-finite losses from a loader without ``len``: no step is known to end an epoch,
    so the rows are fetched (and the loss found bad) only when the fit's run closes."""

    def training_step(self, model, batch):
        loss, metrics = super().training_step(model, batch)
        return loss * float("nan"), metrics

    def train_dataloader(self):
        loader = super().train_dataloader()

        class Unsized:
            def __iter__(self):
                return iter(loader)

        return Unsized()


@pytest.mark.usefixtures("offline_wandb")
@pytest.mark.parametrize(
    "module,log_every,error,steps",
    [
        (_LoaderBreaks, 1, "the loader broke", [1]),  # raised in the loop, step 1 logged
        (_NaNUnsized, 100, "non-finite loss nan at step 1", [1, 2, 3, 4]),  # when closing
    ],
)
def test_wandb_run_of_a_failed_fit_is_finished_as_failed(tmp_path, module, log_every, error, steps):
    """A fit that raises still finishes its run, with exit code 1 (wandb's "failed"), and
    the steps it logged are in it."""
    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(2, 4),
        logger="wandb",
        log_every_n_steps=log_every,
        default_root_dir=str(tmp_path / "runs"),
        enable_progress_bar=False,
        report_memory=False,
    )
    with pytest.raises((RuntimeError, FloatingPointError), match=error):
        trainer.fit(module())
    records = _offline_run(tmp_path)
    assert [h["_step"] for h in _history(records)] == steps
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits and set(exits) == {1}


def test_wandb_without_wandb_says_what_to_install(tmp_path, monkeypatch):
    """Missing wandb fails when the Trainer is made, before any model is built or compiled."""
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)
    says = r"logger='wandb' needs wandb: pip install 'jtp\[wandb\]'"
    with pytest.raises(ImportError, match=says):
        jtp.Trainer(jtp.ModelParallelStrategy(2, 4), logger="wandb")
