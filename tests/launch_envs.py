"""The variables each launcher sets in one process, built from the launch files users copy
(examples/launch/), so the tests run exactly the documented configurations: the sbatch
scripts' ``#SBATCH`` options, the ``mpirun`` line, the JobSet manifest."""

import shlex
from pathlib import Path

import yaml

LAUNCH = Path(__file__).resolve().parents[1] / "examples" / "launch"
PORT_RANGE_START = 65536 - 2**12  # where SLURM and Open MPI ports fall (as jax picks them)


def command_args(path: Path) -> tuple[list[str], list[str]]:
    """The launcher's words and jtp's arguments on the line that runs ``python -m jtp.train``
    (the script's own ``"$@"`` left out: a test passes its flags there)."""
    line = next(ln for ln in path.read_text().splitlines() if "jtp.train" in ln)
    words = shlex.split(line)
    at = words.index("jtp.train")
    return words[: at - 2], [w for w in words[at + 1 :] if w != "$@"]


def sbatch_options(path: Path) -> dict[str, str]:
    """``#SBATCH --key=value`` lines as ``{key: value}``."""
    text = path.read_text().splitlines()
    lines = [ln.split(None, 1)[1] for ln in text if ln.startswith("#SBATCH")]
    return dict(ln.removeprefix("--").split("=", 1) for ln in lines)


def slurm_env(
    script: Path,
    proc: int,
    *,
    job_id: int,
    host: str = "jtp-node",
    gpus: int | None = None,
    bound: bool = False,
) -> dict[str, str]:
    """What ``srun`` sets in task ``proc`` of ``script``'s job. ``gpus``: GPUs per node (None:
    a CPU job, no GPU variables); ``bound``: SLURM binds each task to its GPUs (its
    CUDA_VISIBLE_DEVICES lists only those), else every task sees the node's."""
    opts = sbatch_options(script)
    nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
    node, local = divmod(proc, per_node)
    env = {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOBID": str(job_id),
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NAME": opts["job-name"],
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_NODELIST": f"{host}[1-{nodes}]",
        "SLURM_JOB_NODELIST": f"{host}[1-{nodes}]",
        "SLURM_STEP_NODELIST": f"{host}[1-{nodes}]",
        "SLURMD_NODENAME": f"{host}{node + 1}",
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_PROCID": str(proc),
        "SLURM_LOCALID": str(local),
        "SLURM_NODEID": str(node),
    }
    if gpus is not None:
        every = ",".join(map(str, range(gpus)))
        share = gpus // per_node
        mine = ",".join(map(str, range(local * share, (local + 1) * share)))
        env.update(
            SLURM_GPUS_ON_NODE=str(gpus),
            SLURM_JOB_GPUS=every,
            SLURM_STEP_GPUS=every,
            CUDA_VISIBLE_DEVICES=mine if bound else every,
        )
    return env


def mpirun_env(script: Path, rank: int, *, job_id: int, ip: str = "127.0.0.1") -> dict[str, str]:
    """What Open MPI 4's ``mpirun`` (the line in ``script``) sets in rank ``rank``; ``ip`` is
    the address of mpirun's host, the first that OMPI_MCA_orte_hnp_uri lists."""
    launcher, _ = command_args(script)
    size = int(launcher[launcher.index("-np") + 1])
    per_node = int(launcher[launcher.index("--npernode") + 1])
    return {
        "OMPI_COMM_WORLD_SIZE": str(size),
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(per_node),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % per_node),
        "OMPI_COMM_WORLD_NODE_RANK": str(rank % per_node),
        "OMPI_UNIVERSE_SIZE": str(size),
        "OMPI_MCA_orte_hnp_uri": f"{job_id}.0;tcp://{ip},10.1.0.7:40413",
        "OMPI_MCA_orte_ess_num_procs": str(size),
        "OMPI_MCA_ess_base_jobid": str(job_id + 1),
        "OMPI_MCA_ess_base_vpid": str(rank),
    }


def jobset_container(manifest: Path) -> tuple[dict, dict, dict]:
    """The JobSet, its (one) replicated job and its container, as the manifest writes them."""
    jobset = yaml.safe_load(manifest.read_text())
    [job] = jobset["spec"]["replicatedJobs"]
    [container] = job["template"]["spec"]["template"]["spec"]["containers"]
    return jobset, job, container


def jobset_env(manifest: Path, job_index: int, pod_index: int) -> dict[str, str]:
    """The variables of pod ``pod_index`` of Job ``job_index``: the manifest's ``env`` with
    JobSet's annotations filled in as the JobSet controller writes them, JOB_COMPLETION_INDEX
    (the Job controller's) and the pod's HOSTNAME (Indexed Jobs: ``<job name>-<index>``)."""
    jobset, job, container = jobset_container(manifest)
    name, replicated = jobset["metadata"]["name"], job["name"]
    annotations = {
        "jobset.sigs.k8s.io/jobset-name": name,
        "jobset.sigs.k8s.io/replicatedjob-name": replicated,
        "jobset.sigs.k8s.io/replicatedjob-replicas": str(job.get("replicas", 1)),
        "jobset.sigs.k8s.io/job-index": str(job_index),
    }
    env = {
        "JOB_COMPLETION_INDEX": str(pod_index),
        "HOSTNAME": f"{name}-{replicated}-{job_index}-{pod_index}",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",  # in every pod; jax's own k8s check reads it
    }
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = annotations[path.split("'")[1]]
    return env
