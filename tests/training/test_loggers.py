"""Loggers and the progress bar: TensorBoard event files read back by TensorBoard's own
reader, CSV columns that appear mid-run, the rich bar's fields."""

import csv
import io

import pytest
from test_validation import Scheduled

import jtp
from jtp.training.loggers import MetricsLogger
from jtp.training.progress import ProgressBar


def test_tensorboard_event_file_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(2, 4), max_epochs=1, logger="tensorboard",
        default_root_dir=str(tmp_path), val_check_interval=2, enable_progress_bar=False,
        report_memory=False,
    )  # fmt: skip
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
