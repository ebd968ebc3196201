"""Process start: which launcher started this process, and what jax is told.

jax.distributed.initialize() detects clusters itself, but under SLURM and Open MPI it then
gives each process ONE accelerator, [local rank], whatever the tasks per node: under
`srun --ntasks-per-node=1` every host trained on its first GPU only. So jtp reads the
launcher's variables here, decides every argument (the accelerators included) and passes
them all; jax's own detection never runs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax

from jtp.distributed.programs import same_programs_on_every_process

log = logging.getLogger(__name__)

# Ports where a launcher names none, as jax picks them (a firewall rule written for jax
# holds): SLURM and Open MPI <= 4 map the job id into the top 4096 ports, so two jobs whose
# first node is shared rarely collide; a Kubernetes pod has its own network namespace, so one
# fixed port cannot collide with another job's.
_PORT_RANGE_START = 65536 - 2**12
JOBSET_PORT = 55527


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the job: the arguments of ``jax.distributed.initialize``."""

    launcher: str  # "slurm", "openmpi", "jobset"; "flags" or "environment" (JAX_*) alone
    coordinator: str  # process 0's "host:port", the same in every process
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # the accelerators this process owns; None: all

    def describe(self) -> str:
        owned = "all visible" if self.local_device_ids is None else list(self.local_device_ids)
        return (
            f"distributed launch by {self.launcher}: coordinator {self.coordinator}, "
            f"process {self.process_id} of {self.num_processes}, accelerators {owned}"
        )


def detect_launch(
    env: Mapping[str, str],
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Launch | None:
    """The launch settings ``env`` and the explicit flags give this process; None when
    nothing says it is one of several. Pure: reads ``env`` only.

    Each setting is the flag's, else ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID`` / ``JAX_LOCAL_DEVICE_IDS``, else the detected launcher's: a SLURM
    ``srun`` step, Open MPI's ``mpirun``, a Kubernetes JobSet. ``JAX_COORDINATOR_PORT``
    replaces a derived port. A missing setting is a ValueError that names what to set.
    """
    given = {
        "coordinator": coordinator or env.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": _first(num_processes, _int(env, "JAX_NUM_PROCESSES")),
        "process_id": _first(process_id, _int(env, "JAX_PROCESS_ID")),
    }
    cluster = next((c for c in (_slurm(env), _openmpi(env), _jobset(env)) if c), None)
    if cluster is None:
        if given["coordinator"] is None:
            return None
        cluster = {"launcher": "flags" if coordinator else "environment"}
    for key, value in given.items():
        given[key] = _first(value, cluster.get(key))
        if given[key] is None:
            raise ValueError(
                f"{cluster['launcher']}: no {key} for jax.distributed; "
                + cluster.get("hint", f"pass --{key.replace('_', '-')} or its JAX_ variable")
            )
    if not 0 <= given["process_id"] < given["num_processes"]:
        raise ValueError(
            f"{cluster['launcher']}: process id {given['process_id']} is not in "
            f"[0, {given['num_processes']})"
        )
    owned = _first(_named_devices(env), cluster.get("local_device_ids"))
    return Launch(cluster["launcher"], local_device_ids=owned, **given)


def start_distributed(
    launch: Launch, *, heartbeat_timeout: int = 100, dns_timeout: float = 300
) -> str:
    """``jax.distributed.initialize`` with every setting of ``launch``; the coordinator
    address it was given (resolved: a pod's DNS name appears some seconds after the pod)."""
    address = _resolve(launch.coordinator, dns_timeout)
    kwargs: dict[str, Any] = {"heartbeat_timeout_seconds": heartbeat_timeout}
    if launch.local_device_ids is None:  # all visible: keep jax from choosing [local rank]
        kwargs["cluster_detection_method"] = "deactivate"
    else:
        kwargs["local_device_ids"] = list(launch.local_device_ids)
    jax.distributed.initialize(address, launch.num_processes, launch.process_id, **kwargs)
    same_programs_on_every_process()  # before anything is traced (jtp.distributed.programs)
    if launch.process_id == 0:
        log.info(launch.describe())
    return address


def _slurm(env: Mapping[str, str]) -> dict[str, Any] | None:
    """An ``srun`` step: SLURM_STEP_NODELIST is set by srun only, so a batch script that
    runs python itself is one process, not SLURM_NTASKS of them."""
    if not all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")):
        return None
    count = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    port = env.get("JAX_COORDINATOR_PORT") or int(env["SLURM_JOB_ID"]) % 2**12 + _PORT_RANGE_START
    gpu_ids = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS")  # the node's, e.g. "0,1"
    node_gpus = len(gpu_ids.split(",")) if gpu_ids else _int(env, "SLURM_GPUS_ON_NODE")
    local_rank = int(env.get("SLURM_LOCALID", 0))
    owned = owned_devices(env, _slurm_tasks_on_node(env, count), local_rank, node_gpus)
    return {
        "launcher": "slurm",
        "coordinator": f"{first_host(env['SLURM_STEP_NODELIST'])}:{port}",
        "num_processes": count,
        "process_id": int(env["SLURM_PROCID"]),
        "local_device_ids": owned,
    }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: ``node[07-09,12],gpu1`` -> ``node07``."""
    entry = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # commas outside brackets
    return re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", entry)  # each [range] -> its first value


def _slurm_tasks_on_node(env: Mapping[str, str], count: int) -> int:
    """Tasks of this step on this node, from ``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``)."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    per_node: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        per_node += [int(m.group(1))] * int(m.group(2) or 1) if m else []
    node = int(env.get("SLURM_NODEID", 0))
    if len(set(per_node)) == 1 or node < len(per_node):
        return per_node[node if node < len(per_node) else 0]
    nodes = _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_NNODES") or count
    return max(1, count // nodes)


def _openmpi(env: Mapping[str, str]) -> dict[str, Any] | None:
    """``mpirun`` of Open MPI. <= 4 names its launcher (HNP) in OMPI_MCA_orte_hnp_uri,
    ``<jobid>.0;tcp://<ip>[,<ip>...]:<port>``: the coordinator is the launcher's first
    address (``mpirun`` runs on rank 0's node) and the port comes from the job id, as jax
    does. Open MPI 5 (PRRTE) names no address: set JAX_COORDINATOR_ADDRESS there."""
    if not all(f"OMPI_COMM_WORLD_{k}" in env for k in ("SIZE", "RANK", "LOCAL_RANK")):
        return None
    on_node = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1))
    found: dict[str, Any] = {
        "launcher": "openmpi",
        "num_processes": int(env["OMPI_COMM_WORLD_SIZE"]),
        "process_id": int(env["OMPI_COMM_WORLD_RANK"]),
        "local_device_ids": owned_devices(env, on_node, int(env["OMPI_COMM_WORLD_LOCAL_RANK"])),
        "hint": "Open MPI 5 names no launcher address: mpirun -x JAX_COORDINATOR_ADDRESS=HOST:PORT",
    }
    uri = env.get("OMPI_MCA_orte_hnp_uri")
    ip = re.search(r"tcp://([^,:]+)|tcp6://\[([^,\]]+)", uri or "")
    if ip:
        # The job id is a multiple of 2**12; its upper bits tell jobs apart.
        port = env.get("JAX_COORDINATOR_PORT") or (
            int(uri.split(".", 1)[0]) // 2**12 % 2**12 + _PORT_RANGE_START
        )
        host = ip.group(1) or f"[{ip.group(2)}]"
        found["coordinator"] = f"{host}:{port}"
    return found


def _jobset(env: Mapping[str, str]) -> dict[str, Any] | None:
    """A pod of a Kubernetes JobSet (one replicated job of ``replicas`` Indexed Jobs of
    ``parallelism`` pods). The Job controller sets JOB_COMPLETION_INDEX (the pod's index in
    its Job); the manifest maps JobSet's annotations to JOBSET_NAME, REPLICATED_JOB_NAME,
    JOB_INDEX and REPLICATED_JOB_REPLICAS, and sets JAX_NUM_PROCESSES = replicas x
    parallelism, which nothing in the pod can see. Process 0 is Job 0's pod 0, whose DNS name
    is ``<jobset>-<replicated job>-0-0.<subdomain>``, the subdomain being JobSet's default,
    the JobSet's name (with ``spec.network.subdomain`` set, set JAX_COORDINATOR_ADDRESS)."""
    names = ("JOBSET_NAME", "REPLICATED_JOB_NAME", "JOB_INDEX", "JOB_COMPLETION_INDEX")
    if not all(k in env for k in names):
        return None
    name, job = env["JOBSET_NAME"], env["REPLICATED_JOB_NAME"]
    port = env.get("JAX_COORDINATOR_PORT") or JOBSET_PORT
    found: dict[str, Any] = {
        "launcher": "jobset",
        "coordinator": f"{name}-{job}-0-0.{name}:{port}",
        "local_device_ids": None,  # one pod per node: the accelerators the pod was given
        "hint": "set JAX_NUM_PROCESSES in the manifest: replicas x parallelism of the job",
    }
    count, replicas = _int(env, "JAX_NUM_PROCESSES"), int(env.get("REPLICATED_JOB_REPLICAS", 1))
    if count is not None:
        if count % replicas:
            raise ValueError(
                f"jobset: JAX_NUM_PROCESSES={count} is not replicas x parallelism "
                f"(REPLICATED_JOB_REPLICAS={replicas})"
            )
        job_index, pod_index = int(env["JOB_INDEX"]), int(env["JOB_COMPLETION_INDEX"])
        found.update(num_processes=count, process_id=job_index * (count // replicas) + pod_index)
    return found


def owned_devices(
    env: Mapping[str, str], tasks_on_node: int, local_rank: int, node_devices: int | None = None
) -> tuple[int, ...] | None:
    """The accelerator ids (as this process sees them) it owns; None: all it sees.

    One task on its node owns all it sees. Several: when the launcher already bound each
    task to its own devices (fewer visible than tasks, or than the node holds), all the
    visible ones, counted from 0; else an equal share of the node's, the local rank's.
    """
    if tasks_on_node <= 1 or _named_devices(env) is not None:
        return _named_devices(env)
    visible = _visible_devices(env)
    if visible is not None and (
        visible < tasks_on_node or (node_devices is not None and visible < node_devices)
    ):
        return tuple(range(visible))
    total = visible if visible is not None else node_devices
    if total is None:
        return (local_rank,)  # nothing says how many: one accelerator per task
    if total % tasks_on_node:
        raise ValueError(
            f"{tasks_on_node} tasks on this node cannot share {total} accelerators equally: "
            "set JAX_LOCAL_DEVICE_IDS per task, or bind GPUs to tasks (srun --gpus-per-task)"
        )
    share = total // tasks_on_node
    return tuple(range(local_rank * share, (local_rank + 1) * share))


def _named_devices(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """``JAX_LOCAL_DEVICE_IDS`` (``"0,1"``), which jax itself reads too, if set."""
    ids = env.get("JAX_LOCAL_DEVICE_IDS")
    return tuple(int(i) for i in ids.split(",")) if ids else None


def _visible_devices(env: Mapping[str, str]) -> int | None:
    """How many accelerators the launcher left visible to this process, or None if it did
    not say (SLURM writes ``NoDevFiles`` where a job asked for none)."""
    for key in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        value = env.get(key, "").strip()
        if value and value != "NoDevFiles":
            return len([v for v in value.split(",") if v.strip()])
    return None


def _resolve(address: str, timeout: float) -> str:
    """``address`` with its host resolved, waiting up to ``timeout`` seconds for the name."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
            break
        except socket.gaierror:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    ip = info[0][4][0]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _int(env: Mapping[str, str], key: str) -> int | None:
    return int(env[key]) if env.get(key) else None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
