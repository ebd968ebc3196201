"""The XLA flags jtp sets on GPUs: each parses on the pinned jaxlib (a process starts and
computes with all of them), they go in only where jax can run on NVIDIA GPUs, and a flag the
user set keeps its value."""

import os
import subprocess
import sys

import pytest
from processes import clean_env

import jtp
from jtp import xla_flags

PROBE = "import jax, jax.numpy as jnp; print(float(jnp.ones(3).sum()))"


def _run(flags: str) -> subprocess.CompletedProcess:
    env = dict(clean_env(), XLA_FLAGS=flags)
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_process_starts_with_every_flag_set():
    done = _run(" ".join(jtp.gpu_flags(sequence_parallel=True)))
    assert done.returncode == 0 and done.stdout.strip() == "3.0", done.stderr[-2000:]


def test_the_probe_would_catch_a_flag_the_jaxlib_rejects():
    """What the guides still recommend and this jaxlib no longer knows aborts at start."""
    done = _run("--xla_gpu_enable_async_collectives=true")
    assert done.returncode != 0 and "Unknown flag" in done.stderr
    assert "--xla_gpu_enable_async_collectives" not in " ".join(jtp.gpu_flags())


def test_each_flag_has_a_reason_and_sequence_parallel_adds_collective_matmul():
    assert all(reason for _, reason in xla_flags.GPU_FLAGS + xla_flags.SEQUENCE_PARALLEL_FLAGS)
    base, sp = jtp.gpu_flags(), jtp.gpu_flags(sequence_parallel=True)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in base
    assert set(sp) - set(base) == {
        "--xla_gpu_threshold_for_windowed_einsum_mib=0",
        "--xla_gpu_multi_streamed_windowed_einsum=true",
    }


def test_applied_only_where_jax_can_use_a_gpu(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setattr(xla_flags, "cuda_jax_installed", lambda: False)
    assert jtp.apply_gpu_flags() == []
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_a_users_flag_keeps_its_value(monkeypatch):
    mine = "--xla_gpu_all_reduce_combine_threshold_bytes=1024"
    monkeypatch.setenv("XLA_FLAGS", mine)
    with pytest.warns(UserWarning, match="already initialised"):  # this suite's jax is up
        added = jtp.apply_gpu_flags(force=True)
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == mine and mine.split("=")[0] not in {f.split("=")[0] for f in added}
    assert len(flags) == len(jtp.gpu_flags())


def test_cuda_detection_honours_jax_platforms(monkeypatch):
    monkeypatch.setattr(xla_flags.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not xla_flags.cuda_jax_installed()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert xla_flags.cuda_jax_installed()
