"""The numbered examples run as users run them: a fresh process, forced CPU devices."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, cwd: Path = ROOT) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_01_feedforward_tp(tmp_path):
    out = _run("01_feedforward_tp.py", "--dim", "128", cwd=tmp_path)
    assert out.count("Peak memory usage:") == 8


def test_02_llama_2d(tmp_path):
    out = _run(
        "02_llama_2d.py", "--sequence-parallel", "--loss-parallel", "--steps", "4", cwd=tmp_path
    )
    assert "final loss" in out and out.count("Peak memory usage:") == 4


def test_03_flax_layers_tp(tmp_path):
    """Stock Flax layers (MultiHeadAttention's LinearGeneral projections, Linear, Embed)
    parallelized by one plan dict and trained on a (2, 4) mesh; the loss falls."""
    out = _run("03_flax_layers_tp.py", "--steps", "20", cwd=tmp_path)
    assert "blocks.*.attn.query -> ColwiseParallel" in out  # jtp.explain's rows
    assert "blocks.*.attn.out -> RowwiseParallel" in out
    assert out.count("Peak memory usage:") == 8
    losses = re.search(r"first loss (\S+), final loss (\S+)", out)
    first, final = float(losses.group(1)), float(losses.group(2))
    assert final < first - 0.3, (first, final)


def test_04_llama_text(tmp_path):
    """Prepare a few stdlib modules byte-level, train 16 short steps on 2x4 validating every
    8: the validation loss is reported at both checks and falls well below the first loss
    (ln 256 = 5.5 nats/byte: every byte equally likely)."""
    import sysconfig

    files = os.path.join(sysconfig.get_paths()["stdlib"], "[a-b]*.py")
    out = _run(
        "04_llama_text.py",
        "--files",
        files,
        "--steps",
        "16",
        "--val-every",
        "8",
        "--seq-len",
        "32",
        "--batch-size",
        "16",
        cwd=tmp_path,
    )
    first = float(re.search(r"first loss (\S+),", out).group(1))
    val = [float(v) for v in re.findall(r"step (?:8|16): (\S+?)(?:,|$)", out, re.M)]
    assert len(val) == 2, out
    assert val[1] < val[0] < first - 1.5, (first, val)
