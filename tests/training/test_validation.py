"""Validation during fit: on the policy's schedule, logged with its step, never changing the
training numbers, at the same steps in every process (a pure decision of the policy); the lr
the optimizer applied, logged each step."""

import csv

import numpy as np
import optax
import pytest
from test_trainer import LitFF

import jtp
from jtp.training.options import TrainerOptions
from jtp.training.policy import Policy


def _fit(module, **kw):
    options = dict(logger=None, enable_progress_bar=False, report_memory=False, max_epochs=2)
    trainer = jtp.Trainer(jtp.ModelParallelStrategy(2, 4), **{**options, **kw})
    return trainer.fit(module)


class Scheduled(LitFF):
    """LitFF with its lr in the optimizer state (a linear schedule), so it can be logged."""

    schedule = staticmethod(optax.linear_schedule(1e-2, 1e-3, 8))

    def configure_optimizers(self):
        return optax.inject_hyperparams(optax.adamw)(learning_rate=self.schedule)


def test_validation_on_schedule_never_changes_training(tmp_path):
    """32 samples in batches of 8: 4 steps an epoch, 8 in 2 epochs. Every 3 steps and at
    each epoch's end: steps 3, 4, 6, 8. The losses are bitwise those of a fit without."""
    plain, module = _fit(Scheduled()), Scheduled()
    checked = _fit(
        module,
        val_check_interval=3,
        check_val_every_n_epoch=1,
        logger="csv",
        default_root_dir=str(tmp_path),
    )
    assert checked.losses == plain.losses and len(plain.losses) == 8
    assert [v["step"] for v in checked.val_history] == [3, 4, 6, 8]
    assert [v["epoch"] for v in checked.val_history] == [0, 0, 1, 1]
    assert plain.val_history == []
    after = checked.validate(module)  # the same parameters, validated again
    # The same parameters, rows and program (seen bitwise equal); 1e-6, 8 ulps, leaves
    # validate() free to compile its own program, with its fp32 sums in another order.
    assert checked.val_history[-1]["val_loss"] == pytest.approx(after["val_loss"], rel=1e-6)
    assert len({v["val_loss"] for v in checked.val_history}) == 4  # each saw other params
    rows = list(csv.DictReader(open(f"{checked.log_dir}/metrics.csv")))
    assert [r["step"] for r in rows if r["val_loss"]] == ["3", "4", "6", "8"]
    assert float(rows[2]["val_loss"]) == checked.val_history[0]["val_loss"]
    assert {"val_out_abs", "lr"} <= set(rows[0])
    lrs = [row["lr"] for row in checked.metrics_history]  # step s applied schedule(s - 1)
    # The logged lr is the optimizer state's fp32 value: one rounding (6e-8) from the float64.
    np.testing.assert_allclose(lrs, [float(Scheduled.schedule(s)) for s in range(8)], rtol=1e-6)


def test_no_lr_when_the_optimizer_keeps_none():
    assert "lr" not in _fit(LitFF(), max_epochs=1).metrics_history[0]


def test_epoch_end_validation_under_accumulation():
    """k = 3 over epochs of 4 batches, chained: step 2 takes epoch 0's last batch and epoch
    1's first two; it is the step after which epoch 0 is validated. Epoch 1's last batches
    make no step (an incomplete group), so no validation follows them."""
    trainer = _fit(LitFF(), accumulate_grad_batches=3, check_val_every_n_epoch=1)
    assert trainer.global_step == trainer.estimated_stepping_batches == 2  # 2 x 4 // 3
    assert [(v["step"], v["epoch"]) for v in trainer.val_history] == [(2, 1)]


def test_validation_needs_a_val_loader():
    class NoVal(LitFF):
        def val_dataloader(self):
            return jtp.TrainModule.val_dataloader(self)

    with pytest.raises(NotImplementedError, match="NoVal has no val_dataloader"):
        _fit(NoVal(), val_check_interval=2)


class _NoStop:
    def exit_code(self, step):
        return None


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"val_check_interval": 5}, [5, 10]),
        ({"check_val_every_n_epoch": 1}, [4, 8, 12]),
        ({"check_val_every_n_epoch": 2}, [8]),
        ({"val_check_interval": 3, "check_val_every_n_epoch": 3}, [3, 6, 9, 12]),
        ({}, []),
    ],
)
def test_policy_decides_validation_from_step_and_epoch_only(options, expected):
    """The decision is a function of (options, step, epoch that ended): the same in every
    process. Epochs end at steps 4, 8, 12 here; validating implies logging."""
    policy = Policy(TrainerOptions(**options), multi_process=True, first_step=0)
    got = []
    for step in range(1, 13):
        ended = step // 4 - 1 if step % 4 == 0 else None
        decision = policy.after_step(step, _NoStop(), 0, epoch_end=False, epoch_ended=ended)
        if decision.validate:
            assert decision.log
            got.append(step)
    assert got == expected


def test_val_metrics_reach_the_progress_bar(capsys):
    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(2, 4),
        max_steps=4,
        val_check_interval=2,
        log_every_n_steps=1,
        logger=None,
        report_memory=False,
    )
    trainer.fit(Scheduled())
    # every step logged: one arrival time per step, in order (python -m jtp.bench lightning)
    times = trainer.step_times
    assert len(times) == 4 and 0 < times[0] and times == sorted(times)
    lines = capsys.readouterr().err.splitlines()
    assert "val_loss" not in lines[0] and "lr 0.01 " in lines[0]
    assert all("val_loss" in line for line in lines[1:4])  # kept until the next validation
    shown = float(lines[3].split("val_loss ")[1].split()[0])
    # The bar prints 4 significant digits: at most 5e-4 relative away.
    assert shown == pytest.approx(trainer.val_history[-1]["val_loss"], rel=1e-3)
