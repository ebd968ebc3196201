"""python -m jtp.eval on a mixture-of-experts checkpoint trained by python -m jtp.train: the
loss it reports is the language-model loss (the cross-entropy), without the router's
auxiliary terms, which training and fit's validation add.

Tolerance: as tests/cli/test_eval.py's RTOL (2e-5 relative): eval runs a program that
computes the cross-entropy alone, fit's validation one that also routes the stats into the
auxiliary losses; XLA may fuse the two differently (float32 rounding; seen 0 on the
training mesh and on tensor 8 with the experts placed, 1e-7 on tensor 8 before).
"""

import pytest

from jtp.cli.eval import main as eval_main
from jtp.cli.prepare import main as prepare_main
from jtp.cli.train import main as train_main

RTOL = 2e-5
AUX = 0.5  # a large coefficient, so that a loss that kept the aux term would show


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny MoE preset trained 4 steps on 2 x 4 (byte tokens), validated at step 4."""
    root = tmp_path_factory.mktemp("moe")
    (root / "a.txt").write_text("the cat sat on the mat. " * 80)
    (root / "b.txt").write_text("def f(x):\n    return x * 2\n" * 70)
    text = str(root / "d")
    prepare_main([str(root / "a.txt"), str(root / "b.txt"), "--out", text, "--bytes"])
    ck = str(root / "ck")
    argv = [
        "--devices", "8", "--model", "llama", "--preset", "tiny-moe", "--data", text,
        "--seq-len", "16", "--batch-size", "8", "--data-parallel", "2",
        "--tensor-parallel", "4", "--max-steps", "4", "--val-check-interval", "4",
        "--checkpoint-dir", ck, "--no-progress", "--logger", "none", "--no-report-memory",
        "--router-aux-loss-coef", str(AUX),
    ]  # fmt: skip
    metrics = train_main(argv)
    (val,) = metrics["val_history"]
    return text, ck, val


def test_moe_checkpoint_scores_its_language_model_loss(trained):
    text, ck, val = trained
    # fit's validation: the training objective, lm + AUX * aux (aux >= k = 2)
    assert val["val_loss"] == pytest.approx(val["val_lm_loss"] + AUX * val["val_aux_loss"])
    assert val["val_aux_loss"] >= 2 - 1e-4
    r = eval_main(["--checkpoint", ck, "--data", text, "--data-parallel", "2"])
    print(f"same mesh: {abs(r['loss'] - val['val_lm_loss']) / val['val_lm_loss']:.1e}")
    assert abs(r["loss"] - val["val_lm_loss"]) <= RTOL * val["val_lm_loss"]
    assert r["loss"] < val["val_loss"] - 0.9  # not the objective with AUX * aux
    other = eval_main(["--checkpoint", ck, "--data", text, "--tensor-parallel", "8"])
    assert other["mesh"] == {"data": 1, "tensor": 8}
    print(f"tensor 8: {abs(other['loss'] - val['val_lm_loss']) / val['val_lm_loss']:.1e}")
    assert abs(other["loss"] - val["val_lm_loss"]) <= RTOL * val["val_lm_loss"]
