"""The numbered examples run as users run them: a fresh process, forced CPU devices."""

import os
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
