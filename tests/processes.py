"""Real processes on 127.0.0.1 for the multi-process tests: a clean environment, a free
port, start and always stop (every wait has a timeout; a process still alive is killed)."""

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# A test run inside a real job (an srun step, mpirun, a pod) must not make its processes join
# that job: what a launcher sets stays out (each test sets its own).
LAUNCHER_VARIABLES = (
    *("SLURM_", "OMPI_", "PMIX_", "JOBSET_", "JOB_", "REPLICATED_JOB_"),
    *("JAX_COORDINATOR_", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"),
)


@functools.cache
def suite_cache() -> str:
    """One compilation cache for every program this test process starts, removed at exit.

    The programs cache compiled steps by default, so the processes the tests start do too:
    a later test loads what an earlier one compiled, as a user's second run or a restarted
    job does (jax 0.12.1 hung exactly there while the suite ran with the cache off)."""
    path = tempfile.mkdtemp(prefix="jtp-suite-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def clean_env() -> dict[str, str]:
    """This process's environment less its forced device count (a worker sets its own) and
    any launcher's variables; other XLA flags carry over, so under ``make test-avx2`` every
    process computes as AVX2. The compilation cache is on, as shipped, in this test
    process's own directory."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES") and not k.startswith(LAUNCHER_VARIABLES)
    }
    flags = os.environ.get("XLA_FLAGS", "").split()
    kept = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    if kept:
        env["XLA_FLAGS"] = " ".join(kept)
    env["JAX_PLATFORMS"] = "cpu"
    env["JTP_COMPILATION_CACHE"] = suite_cache()
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(
    args: list[str], log: Path, env: dict | None = None, program: list[str] | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *(program or ["-m", "jtp.train"]), *args],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env or clean_env(),
    )


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def two_workers(worker: Path, tmp: Path, tag: str, *args: str) -> list[subprocess.Popen]:
    """Two processes of a worker script: ``worker COORD PROCESS_ID *args``, logging to
    ``tmp/<tag><i>.log``."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(worker), f"127.0.0.1:{port}", str(i), *args],
            stdout=open(tmp / f"{tag}{i}.log", "w"),
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
        for i in range(2)
    ]


def wait_all(procs, timeout=240):
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        stop_all(procs)
    return [p.returncode for p in procs]
