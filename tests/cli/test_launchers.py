"""``python -m jtp.train`` started as each launcher starts it, with no jtp distributed flag:
two processes on 127.0.0.1 whose environments are exactly what srun (one task per node),
Open MPI 4's mpirun and a Kubernetes JobSet set (tests/launch_envs.py, built from the files
in examples/launch/). Each run must form the mesh of two processes, train to the losses of
one process holding all the devices (1e-5 of their scale, as tests/training/
test_multiprocess.py), and tell jax the accelerators the launcher gave (metrics ``launch``).

Stand-ins, the only differences from a cluster: the derived coordinator must be a free port
here, so SLURM_JOB_ID and Open MPI's job id are chosen to map to one, and the JobSet test adds
JAX_COORDINATOR_PORT (55527 may be taken on a shared machine); cluster DNS (the SLURM node
names, the JobSet pod's headless-service name) is a resolver map to 127.0.0.1 loaded through
``sitecustomize``.
"""

import json
import random
import socket
from pathlib import Path

import numpy as np
import pytest
from launch_envs import LAUNCH, PORT_RANGE_START, command_args, jobset_env, mpirun_env, slurm_env
from processes import clean_env, free_port, start_process, wait_all

SMALL = (
    "--dim 64 --hidden-dim 128 --samples 64 --max-steps 3 --no-progress --no-compilation-cache"
).split()
DNS = """import socket
_getaddrinfo = socket.getaddrinfo
NAMES = {names!r}


def getaddrinfo(host, *args, **kwargs):
    return _getaddrinfo("127.0.0.1" if host in NAMES else host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
"""


def _free_port_in_range() -> int:
    """A free port among the 4096 where SLURM's and Open MPI's job ids land."""
    for port in random.sample(range(PORT_RANGE_START, 65536), 200):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in the launchers' range")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process holding all four devices, the same mesh (2 x 2) the two processes form."""
    tmp = tmp_path_factory.mktemp("one")
    args = ["--devices", "4", "--data-parallel", "2", "--tensor-parallel", "2", *SMALL]
    proc = start_process([*args, "--metrics-json", str(tmp / "m.json")], tmp / "log")
    assert wait_all([proc], timeout=120) == [0], (tmp / "log").read_text()[-3000:]
    return json.loads((tmp / "m.json").read_text())["losses"]


def _train_two(tmp: Path, envs: list[dict], args: list[str], names: set[str]) -> list[dict]:
    (tmp / "dns").mkdir()
    (tmp / "dns" / "sitecustomize.py").write_text(DNS.format(names=sorted(names)))
    procs = []
    for i, launcher_env in enumerate(envs):
        env = clean_env()
        env["PYTHONPATH"] = f"{tmp / 'dns'}:{env.get('PYTHONPATH', '')}"
        env.update(launcher_env)
        argv = [*args, "--devices", "2", *SMALL, "--metrics-json", str(tmp / f"m{i}.json")]
        procs.append(start_process(argv, tmp / f"log{i}", env=env))
    codes = wait_all(procs, timeout=120)
    assert codes == [0, 0], "".join((tmp / f"log{i}").read_text()[-3000:] for i in range(2))
    return [json.loads((tmp / f"m{i}.json").read_text()) for i in range(2)]


def _check(got: list[dict], reference: list[float], launcher: str, coordinator: str, tmp: Path):
    for i, metrics in enumerate(got):
        assert metrics["mesh"] == {"data": 2, "tensor": 2} and metrics["process_count"] == 2
        assert metrics["launch"] == {
            "launcher": launcher,
            "coordinator": coordinator,
            "num_processes": 2,
            "process_id": i,
            "local_device_ids": None,
            "jax_cuda_visible_devices": "all",  # jax's SLURM/MPI default would have made it "0"
        }
    assert got[0]["losses"] == got[1]["losses"]
    atol = 1e-5 * max(abs(x) for x in reference)
    np.testing.assert_allclose(got[0]["losses"], reference, rtol=0, atol=atol)
    first = (tmp / "log0").read_text()
    assert f"distributed launch by {launcher}: coordinator {coordinator}, process 0 of 2" in first
    assert "distributed launch" not in (tmp / "log1").read_text()  # process 0 says it once


def test_slurm_one_task_per_node(tmp_path, reference):
    script = LAUNCH / "slurm_per_node.sbatch"
    port = _free_port_in_range()
    job_id = 4096 * 50 + port - PORT_RANGE_START  # jax's port for it: job id % 4096 + 61440
    envs = [slurm_env(script, i, job_id=job_id) for i in range(2)]
    _, args = command_args(script)
    got = _train_two(tmp_path, envs, args, {"jtp-node1", "jtp-node2"})
    _check(got, reference, "slurm", f"jtp-node1:{port}", tmp_path)


def test_openmpi_mpirun(tmp_path, reference):
    script = LAUNCH / "mpirun.sh"
    port = _free_port_in_range()
    job_id = (4096 * 3 + port - PORT_RANGE_START) * 2**12  # port: job id / 4096 % 4096 + 61440
    envs = [mpirun_env(script, i, job_id=job_id) for i in range(2)]
    _, args = command_args(script)
    got = _train_two(tmp_path, envs, args, set())
    _check(got, reference, "openmpi", f"127.0.0.1:{port}", tmp_path)


def test_kubernetes_jobset(tmp_path, reference):
    port = free_port()
    envs = [
        {**jobset_env(LAUNCH / "jobset.yaml", i, 0), "JAX_COORDINATOR_PORT": str(port)}
        for i in range(2)
    ]
    host = "jtp-train-workers-0-0.jtp-train"
    got = _train_two(tmp_path, envs, [], {host})
    _check(got, reference, "jobset", f"{host}:{port}", tmp_path)
