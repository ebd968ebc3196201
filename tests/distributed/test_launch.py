"""Launch detection (``jtp.distributed.detect_launch``) on the variables each launcher sets,
built from the launch files in examples/launch/ (tests/launch_envs.py), and what
``start_distributed`` hands jax. The same files run as real processes in
tests/cli/test_launchers.py."""

import pytest
from launch_envs import (
    LAUNCH,
    PORT_RANGE_START,
    command_args,
    jobset_container,
    jobset_env,
    mpirun_env,
    sbatch_options,
    slurm_env,
)

import jtp.distributed
from jtp.distributed import JOBSET_PORT, Launch, detect_launch, first_host, start_distributed

PER_NODE, PER_GPU = LAUNCH / "slurm_per_node.sbatch", LAUNCH / "slurm_per_gpu.sbatch"
MPIRUN, JOBSET = LAUNCH / "mpirun.sh", LAUNCH / "jobset.yaml"


def test_nothing_says_several_processes():
    assert detect_launch({}) is None
    assert detect_launch({"HOSTNAME": "vm", "CUDA_VISIBLE_DEVICES": "0,1"}) is None


def test_a_batch_script_without_srun_is_one_process():
    """sbatch's own shell has SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID but no step: python run
    there is one process (jax's old trigger, SLURM_JOB_ID, would wait for SLURM_NTASKS)."""
    env = slurm_env(PER_NODE, 0, job_id=77)
    del env["SLURM_STEP_NODELIST"]
    assert detect_launch(env) is None


def test_flags_and_jax_variables_unchanged():
    launch = detect_launch({}, coordinator="h:1234", num_processes=2, process_id=1)
    assert launch == Launch("flags", "h:1234", 2, 1, None)
    env = {"JAX_COORDINATOR_ADDRESS": "h:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert detect_launch(env) == Launch("environment", "h:99", 4, 3, None)
    env["JAX_LOCAL_DEVICE_IDS"] = "2,3"
    assert detect_launch(env).local_device_ids == (2, 3)
    with pytest.raises(ValueError, match="flags: no num_processes.*--num-processes"):
        detect_launch({}, coordinator="h:1234", process_id=0)
    with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
        detect_launch({}, coordinator="h:1", num_processes=2, process_id=2)


def test_slurm_one_task_per_node_owns_all_its_gpus():
    """The defect: jax gave each of these processes [SLURM_LOCALID] = [0], one GPU of 8."""
    assert sbatch_options(PER_NODE)["ntasks-per-node"] == "1"
    for proc in range(2):
        env = slurm_env(PER_NODE, proc, job_id=4242, gpus=8)
        port = 4242 % 4096 + PORT_RANGE_START  # jax's port for this job
        assert detect_launch(env) == Launch("slurm", f"jtp-node1:{port}", 2, proc, None)


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "all-visible"])
def test_slurm_one_task_per_gpu_owns_its_gpu(bound):
    """Bound: CUDA_VISIBLE_DEVICES is the task's one GPU, which jax calls 0 (SLURM_LOCALID would
    name a GPU the task cannot see). Not bound: all 8 visible, the task's is its local id."""
    opts = sbatch_options(PER_GPU)
    assert opts["ntasks-per-node"] == "8" and opts["gpus-per-task"] == "1"
    for proc in (0, 5, 8, 15):
        launch = detect_launch(slurm_env(PER_GPU, proc, job_id=4242, gpus=8, bound=bound))
        assert (launch.num_processes, launch.process_id) == (16, proc)
        assert launch.local_device_ids == ((0,) if bound else (proc % 8,))


def test_slurm_shares_and_refusals():
    env = slurm_env(PER_GPU, 11, job_id=1, gpus=8)  # local rank 3 of 8
    two_each = {**env, "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": "1"}
    assert detect_launch(two_each).local_device_ids == (2, 3)
    bound_two = {**two_each, "CUDA_VISIBLE_DEVICES": "2,3"}  # fewer than the node holds
    assert detect_launch(bound_two).local_device_ids == (0, 1)
    no_gpu_info = {k: v for k, v in env.items() if "GPU" not in k and k != "CUDA_VISIBLE_DEVICES"}
    assert detect_launch(no_gpu_info).local_device_ids == (3,)  # one per task, as jax does
    three = {**env, "SLURM_STEP_TASKS_PER_NODE": "3(x2)", "SLURM_LOCALID": "0"}
    with pytest.raises(ValueError, match="3 tasks on this node cannot share 8 accelerators"):
        detect_launch(three)
    assert detect_launch({**three, "JAX_LOCAL_DEVICE_IDS": "0,1,2"}).local_device_ids == (0, 1, 2)
    uneven = {**env, "SLURM_STEP_TASKS_PER_NODE": "8,1", "SLURM_NODEID": "1"}
    assert detect_launch(uneven).local_device_ids is None  # alone on node 1
    assert detect_launch(
        {**env, "SLURM_NODELIST": "x", "SLURM_STEP_NODELIST": "a,b"}
    ).coordinator.startswith("a:")
    assert detect_launch({**env, "JAX_COORDINATOR_PORT": "1234"}).coordinator == "jtp-node1:1234"
    flagged = detect_launch(env, coordinator="other:5")  # a flag wins over the launcher
    assert (flagged.launcher, flagged.coordinator, flagged.process_id) == ("slurm", "other:5", 11)


def test_first_host_of_a_slurm_hostlist():
    assert first_host("node[07-09,12],gpu1") == "node07"
    assert first_host("gpu[3,5]") == "gpu3"
    assert first_host("a1,b2") == "a1"
    assert first_host("rack[1-2]-n[03-04]") == "rack1-n03"
    assert first_host("single") == "single"


def test_openmpi_coordinator_is_mpiruns_host_port_from_job_id():
    launcher, _ = command_args(MPIRUN)
    assert launcher[0] == "mpirun"
    job_id = 1531576320  # jax's example; a multiple of 2**12
    for rank in range(2):
        launch = detect_launch(mpirun_env(MPIRUN, rank, job_id=job_id, ip="10.96.0.1"))
        port = job_id // 2**12 % 2**12 + PORT_RANGE_START
        assert launch == Launch("openmpi", f"10.96.0.1:{port}", 2, rank, None)
    env = mpirun_env(MPIRUN, 3, job_id=job_id)
    env.update(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_SIZE="2", CUDA_VISIBLE_DEVICES="0,1")
    env["OMPI_COMM_WORLD_LOCAL_RANK"] = "1"
    assert detect_launch(env).local_device_ids == (1,)
    env["OMPI_MCA_orte_hnp_uri"] = "1314521088.0;tcp6://[fe80::b9b:ac5d,2620:10d::2]:43370"
    assert detect_launch(env).coordinator.startswith("[fe80::b9b:ac5d]:")


def test_openmpi_5_needs_the_coordinator_named():
    env = mpirun_env(MPIRUN, 0, job_id=4096)
    del env["OMPI_MCA_orte_hnp_uri"]  # PRRTE's mpirun sets none
    env["OMPI_VERSION"] = "5.0.3"
    with pytest.raises(ValueError, match="openmpi: no coordinator.*-x JAX_COORDINATOR_ADDRESS"):
        detect_launch(env)
    env["JAX_COORDINATOR_ADDRESS"] = "head:4000"
    assert detect_launch(env) == Launch("openmpi", "head:4000", 2, 0, None)


def test_jobset_process_is_job_index_times_pods_plus_pod_index():
    jobset, job, container = jobset_container(JOBSET)
    pods = job["template"]["spec"]["parallelism"]
    assert job["template"]["spec"]["completions"] == pods
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert int(env["JAX_NUM_PROCESSES"]) == job["replicas"] * pods  # kept in step by hand
    assert container["ports"][0]["containerPort"] == JOBSET_PORT
    assert container["command"] == ["python", "-m", "jtp.train"]
    for i in range(job["replicas"]):
        launch = detect_launch(jobset_env(JOBSET, i, 0))
        assert launch == Launch(
            "jobset", f"jtp-train-workers-0-0.jtp-train:{JOBSET_PORT}", 2, i, None
        )
    # Two Jobs of two pods: Job 1's pod 1 is process 3; process 0 is still Job 0's pod 0.
    wide = {**jobset_env(JOBSET, 1, 1), "JAX_NUM_PROCESSES": "4"}
    launch = detect_launch(wide)
    assert (launch.process_id, launch.coordinator.split(":")[0]) == (
        3,
        "jtp-train-workers-0-0.jtp-train",
    )
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES=3 is not replicas x parallelism"):
        detect_launch({**wide, "JAX_NUM_PROCESSES": "3"})
    del wide["JAX_NUM_PROCESSES"]
    with pytest.raises(ValueError, match="jobset: no num_processes.*set JAX_NUM_PROCESSES"):
        detect_launch(wide)


def test_launch_files_carry_no_jtp_distributed_flag():
    for path in (PER_NODE, PER_GPU, MPIRUN):
        _, args = command_args(path)
        assert not {"--coordinator", "--num-processes", "--process-id"} & set(args), path


def test_start_passes_every_setting_and_keeps_jax_from_choosing(monkeypatch):
    """None (all visible) goes to jax as cluster_detection_method="deactivate": without it jax
    fills the missing local_device_ids from SLURM_LOCALID, the defect this guards."""
    calls = []
    monkeypatch.setattr(
        jtp.distributed.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k))
    )
    start_distributed(Launch("slurm", "localhost:61586", 2, 1, None), heartbeat_timeout=10)
    start_distributed(Launch("slurm", "127.0.0.1:61586", 16, 5, (0,)))
    (args0, kw0), (args1, kw1) = calls
    assert args0[1:] == (2, 1) and args0[0].endswith(":61586")
    assert args0[0].split(":")[0] in ("127.0.0.1", "[::1]")  # localhost, resolved
    assert kw0 == {"heartbeat_timeout_seconds": 10, "cluster_detection_method": "deactivate"}
    assert args1 == ("127.0.0.1:61586", 16, 5) and kw1["local_device_ids"] == [0]


def test_jtp_matches_jax_where_jax_is_right(monkeypatch):
    """Coordinator, process count and id as jax's own SLURM and Open MPI detectors derive them;
    jax's local device ids differ exactly where jax was wrong (one task per node)."""
    from jax._src.clusters.ompi_cluster import OmpiCluster
    from jax._src.clusters.slurm_cluster import SlurmCluster

    cases = [
        (SlurmCluster, slurm_env(PER_NODE, 1, job_id=987654, gpus=8)),
        (OmpiCluster, mpirun_env(MPIRUN, 1, job_id=1531576320, ip="10.0.0.3")),
    ]
    for cluster, env in cases:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        ours = detect_launch(env)
        theirs = cluster.get_coordinator_address(None, None)
        assert (ours.coordinator, ours.num_processes, ours.process_id) == (
            theirs,
            cluster.get_process_count(),
            cluster.get_process_id(),
        )
        assert cluster.get_local_process_id() == 0 and ours.local_device_ids is None
        for key in env:
            monkeypatch.delenv(key)


def test_the_docs_show_the_tested_files():
    """docs/multi-host.md quotes each launch file whole, so the page is what the tests run."""
    page = (LAUNCH.parents[1] / "docs" / "multi-host.md").read_text()
    for path in (PER_NODE, PER_GPU, MPIRUN, JOBSET):
        assert path.read_text() in page, f"docs/multi-host.md: update the copy of {path.name}"
