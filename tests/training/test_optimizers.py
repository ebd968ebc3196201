"""The ready-made tasks' optimizer: the learning-rate schedules' values against their
formulas (float64), and the refusals, raised before any compile."""

import math

import pytest

from jtp.training.optimizers import lr_schedule

LR = 3e-3


def test_schedule_values_and_refusals():
    s = lr_schedule("cosine", LR, warmup_steps=10, total_steps=100)
    for step in (0, 5, 10, 40, 99, 100, 150):
        # fp32 schedule vs float64 formula, as above; abs for the warmup's exact 0 at step 0.
        assert float(s(step)) == pytest.approx(cosine_at(step, 10, 100), rel=1e-5, abs=1e-12)
    constant = lr_schedule("constant", LR, warmup_steps=4)
    # fp32 values of exact fractions of LR: within approx's default 1e-6.
    assert [float(constant(i)) for i in (0, 2, 4, 50)] == pytest.approx([0, LR / 2, LR, LR])
    assert lr_schedule("constant", LR) == LR
    with pytest.raises(ValueError, match="--warmup-steps 100 must be below the run's 100"):
        lr_schedule("cosine", LR, warmup_steps=100, total_steps=100)
    with pytest.raises(ValueError, match="--lr-schedule 'linear': choose one of"):
        lr_schedule("linear", LR)


def cosine_at(step, warmup, total):
    if step < warmup:
        return LR * step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return LR * 0.1 + LR * 0.9 * 0.5 * (1 + math.cos(math.pi * t))
