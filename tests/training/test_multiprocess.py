"""Real processes on 127.0.0.1: jax.distributed, signals, kill -9, dying peers.

Every process is started with a timeout and killed in a ``finally`` if still alive. Losses
across process layouts are compared within 1e-5 of their scale: gloo's cross-process
reductions may sum in another order than one process's in-memory ones (seen: bitwise equal
for the FeedForward, <= 5e-7 relative for the Llama).
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from processes import free_port, start_process, stop_all, two_workers, wait_all

import jtp

HERE = Path(__file__).parent
SMALL = ["--dim", "32", "--hidden-dim", "64", "--samples", "64", "--max-epochs", "2"]


def _launch(
    tmp: Path, n: int, args: list[str], tag: str, program: list[str] | None = None
) -> list[subprocess.Popen]:
    port = free_port()
    return [
        start_process(
            [
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(n),
                "--process-id",
                str(i),
                "--devices",
                str(8 // n),
                "--root-dir",
                str(tmp / "runs"),
                "--metrics-json",
                str(tmp / f"{tag}{i}.json"),
                *args,
            ],
            tmp / f"{tag}{i}.log",
            program=program,
        )
        for i in range(n)
    ]


def _log(tmp: Path, name: str) -> str:
    return (tmp / name).read_text()[-3000:]


@pytest.mark.parametrize("mesh", [(2, 4), (1, 8)], ids=["2x4", "1x8-tensor-spans-processes"])
def test_two_processes_equal_one(tmp_path, mesh):
    layout = ["--data-parallel", str(mesh[0]), "--tensor-parallel", str(mesh[1]), "--no-progress"]
    one = _launch(tmp_path, 1, [*SMALL, *layout], "one")
    two = _launch(tmp_path, 2, [*SMALL, *layout], "two")
    assert wait_all(one) == [0], _log(tmp_path, "one0.log")
    assert wait_all(two) == [0, 0], _log(tmp_path, "two0.log") + _log(tmp_path, "two1.log")
    ref = json.loads((tmp_path / "one0.json").read_text())
    got = [json.loads((tmp_path / f"two{i}.json").read_text()) for i in range(2)]
    assert got[0]["process_count"] == 2 and got[0]["mesh"] == {"data": mesh[0], "tensor": mesh[1]}
    assert got[0]["losses"] == got[1]["losses"]  # every process reports the same losses
    # The FeedForward's loss is a sum of outputs of both signs that crosses zero: its fp32
    # rounding scales with the run's largest |loss|, not with each loss (test_checkpoint).
    atol = 1e-5 * max(abs(x) for x in ref["losses"])
    np.testing.assert_allclose(got[0]["losses"], ref["losses"], rtol=0, atol=atol)
    assert len(ref["losses"]) == 16


def test_sigterm_saves_and_resume_continues(tmp_path):
    ck = tmp_path / "ck"
    args = [
        "--devices",
        "8",
        "--dim",
        "256",
        "--hidden-dim",
        "1024",
        "--samples",
        "2048",
        "--tensor-parallel",
        "8",
        "--log-every",
        "1",
        "--root-dir",
        str(tmp_path / "runs"),
        "--checkpoint-dir",
        str(ck),
        "--metrics-json",
        str(tmp_path / "a.json"),
    ]
    proc = start_process(args, tmp_path / "a.log")
    try:
        deadline = time.time() + 120
        while "epoch 0 [" not in (tmp_path / "a.log").read_text():
            assert proc.poll() is None and time.time() < deadline, _log(tmp_path, "a.log")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, _log(tmp_path, "a.log")
    finally:
        stop_all([proc])
    steps = jtp.Checkpointer(str(ck)).all_steps()
    assert len(steps) == 1 and 0 < steps[0] < 256, steps
    resumed = start_process([*args[:-1], str(tmp_path / "b.json"), "--resume"], tmp_path / "b.log")
    assert wait_all([resumed]) == [0], _log(tmp_path, "b.log")
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["first_step"] == steps[0] and b["first_step"] + b["steps"] == 256
    full_args = [*args[:-4], "--metrics-json", str(tmp_path / "c.json")]
    full = start_process(full_args, tmp_path / "c.log")
    assert wait_all([full]) == [0], _log(tmp_path, "c.log")
    c = json.loads((tmp_path / "c.json").read_text())
    assert b["losses"] == c["losses"][steps[0] :]  # bitwise: nothing was lost or repeated


def test_kill_9_during_async_save_resumes_from_previous(tmp_path):
    ck = tmp_path / "ck"
    args = [
        "--devices",
        "8",
        *SMALL,
        "--no-progress",
        "--root-dir",
        str(tmp_path / "runs"),
        "--checkpoint-dir",
        str(ck),
        "--checkpoint-every",
        "3",
    ]
    killer = [str(Path(__file__).with_name("fault_kill_during_save.py")), "6"]
    proc = start_process(args, tmp_path / "a.log", program=killer)
    assert wait_all([proc]) == [-signal.SIGKILL], _log(tmp_path, "a.log")
    assert jtp.Checkpointer(str(ck)).all_steps() == [3]  # step 6 never became visible
    resumed = start_process(
        [*args, "--resume", "--metrics-json", str(tmp_path / "b.json")], tmp_path / "b.log"
    )
    assert wait_all([resumed]) == [0], _log(tmp_path, "b.log")
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["first_step"] == 3 and b["steps"] == 13


def test_dead_peer_ends_the_survivor(tmp_path):
    args = (
        "--dim 64 --hidden-dim 256 --samples 100000 --log-every 1 --data-parallel 2"
        " --tensor-parallel 4 --heartbeat-timeout 10"
    ).split()
    procs = _launch(tmp_path, 2, args, "p")
    try:
        deadline = time.time() + 120
        while "epoch 0 [" not in (tmp_path / "p0.log").read_text():
            assert all(p.poll() is None for p in procs), _log(tmp_path, "p0.log")
            assert time.time() < deadline
            time.sleep(0.1)
        procs[1].kill()
        t0 = time.time()
        code = procs[0].wait(timeout=60)  # raises TimeoutExpired if the survivor hangs
        assert code != 0, _log(tmp_path, "p0.log")
        assert time.time() - t0 < 60
    finally:
        stop_all(procs)


@pytest.mark.parametrize("mode", ["good", "bad"])
def test_check_replicas_across_processes(tmp_path, mode):
    procs = two_workers(HERE / "mp_replicas_worker.py", tmp_path, "w", mode)
    codes = wait_all(procs, timeout=120)
    logs = [_log(tmp_path, f"w{i}.log") for i in range(2)]
    if mode == "good":
        assert codes == [0, 0], logs
    else:
        assert codes == [3, 3], logs
        for log in logs:
            assert "step 1: devices that must hold the same rows" in log
            assert "(process 0)" in log and "(process 1)" in log


MP_ARGS = (
    "--dim 64 --hidden-dim 256 --data-parallel 2 --tensor-parallel 4 --no-progress --log-every 1"
).split()


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """A preemption notice that reaches one process only: both agree, save the same step
    once, exit 143 within 60 s; a resume of both continues to an uninterrupted run's losses."""
    ck = str(tmp_path / "ck")
    args = [*MP_ARGS, "--samples", "8192", "--checkpoint-dir", ck]
    procs = _launch(tmp_path, 2, args, "a")
    try:
        deadline = time.time() + 120
        while "step" not in _metrics_rows(tmp_path):
            assert all(p.poll() is None for p in procs), _log(tmp_path, "a0.log")
            assert time.time() < deadline, _log(tmp_path, "a0.log")
            time.sleep(0.05)
        t0 = time.time()
        procs[1].send_signal(signal.SIGTERM)  # process 0 never gets a signal
        codes = wait_all(procs, timeout=60)
        assert codes == [143, 143], _log(tmp_path, "a0.log") + _log(tmp_path, "a1.log")
        assert time.time() - t0 < 60
    finally:
        stop_all(procs)
    steps = jtp.Checkpointer(ck).all_steps()
    assert len(steps) == 1 and 0 < steps[0] < 1024, steps  # one step, saved once, together
    resumed = _launch(tmp_path, 2, [*args, "--resume", "--max-steps", str(steps[0] + 6)], "b")
    assert wait_all(resumed) == [0, 0], _log(tmp_path, "b0.log") + _log(tmp_path, "b1.log")
    b = [json.loads((tmp_path / f"b{i}.json").read_text()) for i in range(2)]
    assert b[0]["first_step"] == b[1]["first_step"] == steps[0]
    full = _launch(
        tmp_path, 2, [*MP_ARGS, "--samples", "8192", "--max-steps", str(steps[0] + 6)], "c"
    )
    assert wait_all(full) == [0, 0], _log(tmp_path, "c0.log")
    c = json.loads((tmp_path / "c0.json").read_text())
    assert b[0]["losses"] == b[1]["losses"] == c["losses"][steps[0] :]  # bitwise


def _metrics_rows(tmp: Path) -> str:
    found = sorted((tmp / "runs").glob("version_*/metrics.csv"))
    return found[0].read_text() if found else ""


def test_restore_agrees_when_one_process_cannot_read_the_newest_step(tmp_path):
    ck = str(tmp_path / "ck")
    args = [*MP_ARGS, "--samples", "64", "--max-epochs", "2", "--checkpoint-dir", ck]
    first = _launch(tmp_path, 2, [*args, "--max-steps", "7", "--checkpoint-every", "3"], "a")
    assert wait_all(first) == [0, 0], _log(tmp_path, "a0.log")
    assert jtp.Checkpointer(ck).all_steps() == [3, 6, 7]
    faulty = [str(Path(__file__).with_name("fault_unreadable_newest.py"))]
    resumed = _launch(tmp_path, 2, [*args, "--max-steps", "9", "--resume"], "b", program=faulty)
    assert wait_all(resumed) == [0, 0], _log(tmp_path, "b0.log") + _log(tmp_path, "b1.log")
    b = [json.loads((tmp_path / f"b{i}.json").read_text()) for i in range(2)]
    assert b[0]["first_step"] == b[1]["first_step"] == 6  # step 7 skipped by both
    assert b[0]["losses"] == b[1]["losses"] and len(b[0]["losses"]) == 3


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_export_in_two_processes_holds_one_parameter_on_process_0_only(tmp_path, dtype):
    """The model is never whole on any host: process 0 holds one gathered parameter at a
    time (peak < 2x the largest, the file is streamed), process 1 none; the file equals the
    unsharded model bitwise."""
    out = str(tmp_path / f"model_{dtype}.safetensors")
    procs = two_workers(HERE / "mp_export_worker.py", tmp_path, "e", out)
    codes = wait_all(procs, timeout=120)
    assert codes == [0, 0], _log(tmp_path, "e0.log") + _log(tmp_path, "e1.log")
    reports = [
        json.loads(next(ln for ln in _log(tmp_path, f"e{i}.log").splitlines() if ln[:1] == "{"))
        for i in range(2)
    ]
    largest = reports[0]["largest_param_bytes"]
    assert reports[0]["peak_host_bytes"] < 2 * largest  # the model is 3 such parameters
    assert reports[1]["peak_host_bytes"] < largest / 4  # process 1 never holds a whole one
    param_dtype = jax.numpy.bfloat16 if dtype == "bf16" else jax.numpy.float32
    ref = jtp.models.FeedForward(256, 1024, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    loaded = jtp.load_consolidated(
        out, jtp.models.FeedForward(256, 1024, param_dtype=param_dtype, rngs=nnx.Rngs(1))
    )
    for (_, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(ref, nnx.Param)),
        nnx.to_flat_state(nnx.state(loaded, nnx.Param)),
        strict=True,
    ):
        assert a.get_value().dtype == b.get_value().dtype == param_dtype
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_two_processes_share_one_compilation_cache(tmp_path):
    """Both processes of a 2-process run point at one cache directory (as on a shared
    filesystem) that a one-process run of the same model wrote first. Run twice: each run
    finishes (with jax 0.12.1 the second hung in its first cross-process collective: process
    0 loaded its programs, process 1 compiled them, and their executables differed), the
    second adds no entry and its process 0 loads the train step (jax's cache-hit event), and
    both give the same losses, those of the one-process run within 1e-5 of their scale."""
    cache = tmp_path / "cache"
    layout = [
        "--data-parallel",
        "2",
        "--tensor-parallel",
        "4",
        "--no-progress",
        "--compilation-cache",
        str(cache),
    ]
    assert wait_all(_launch(tmp_path, 1, [*SMALL, *layout], "one")) == [0], _log(
        tmp_path, "one0.log"
    )
    written_by_one = set(os.listdir(cache))
    runs = []
    for tag in ("a", "b"):
        codes = wait_all(_launch(tmp_path, 2, [*SMALL, *layout], tag), timeout=120)
        assert codes == [0, 0], _log(tmp_path, f"{tag}0.log") + _log(tmp_path, f"{tag}1.log")
        runs.append([json.loads((tmp_path / f"{tag}{i}.json").read_text()) for i in range(2)])
        if tag == "a":
            entries = sorted(os.listdir(cache))
            assert len(set(entries) - written_by_one) >= 2  # its own init and train step
    assert sorted(os.listdir(cache)) == entries
    first, second = runs
    # jax's own events: process 0 of the second run loaded its train step from the cache.
    # (jax reports no such event on process 1 here: on CPU its cache key differs, so it
    # compiles, and the two executables must still be one program.)
    assert first[0]["compile_cache_hits"] == 0 and second[0]["compile_cache_hits"] >= 1
    for i in range(2):
        assert second[i]["losses"] == first[i]["losses"] == first[0]["losses"]
    ref = json.loads((tmp_path / "one0.json").read_text())["losses"]
    atol = 1e-5 * max(abs(x) for x in ref)  # as test_two_processes_equal_one
    np.testing.assert_allclose(first[0]["losses"], ref, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "name,tensor",
    [
        ("mistral", "model.layers.1.mlp.up_proj.weight"),
        ("phi3", "model.layers.1.self_attn.qkv_proj.weight"),
        ("mixtral", "model.layers.1.block_sparse_moe.experts.7.w2.weight"),
    ],
    ids=["mistral", "phi3", "mixtral"],
)
def test_stacked_hf_save_from_two_processes_is_the_source_bitwise(name, tensor, tmp_path):
    """A bf16 Mistral checkpoint loaded by two processes onto 2 x 4 with fsdp, layers
    scanned (each stacked tensor split across both processes), and saved back with several
    files: the export is the source, every tensor bit for bit, under the per-layer names.
    Phi-3: each fused tensor is its parts (q, k, v; gate, up), gathered by both processes
    in the same order and stacked by process 0. Mixtral: each layer's stacked experts
    gathered once by both processes and written as the hub's one tensor per expert."""
    from safetensors.numpy import load_file

    source = str(HERE.parent / "fixtures" / "hf" / name)
    out = tmp_path / "export"
    procs = two_workers(HERE / "mp_hf_save_worker.py", tmp_path, "h", source, str(out))
    codes = wait_all(procs, timeout=150)
    assert codes == [0, 0], _log(tmp_path, "h0.log") + _log(tmp_path, "h1.log")

    def tensors(directory):
        found = {}
        for name in sorted(os.listdir(directory)):
            if name.endswith(".safetensors"):
                found.update(load_file(os.path.join(directory, name)))
        return found

    ours, theirs = tensors(out), tensors(source)
    assert sorted(ours) == sorted(theirs) and tensor in ours
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and np.array_equal(
            ours[k].view(np.uint16), v.view(np.uint16)
        ), k
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1


def test_two_processes_on_text_validate_at_the_same_steps(tmp_path):
    """A Llama on prepared bytes: token rows by data rank, validation in every process at
    the same steps (each one a collective): both processes report the one-process losses
    and validation losses."""
    from jtp.cli.prepare import main as prepare_main
    from jtp.cli.train import main as train_main

    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 200)
    prepare_main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), "--bytes"])
    args = [
        "--model",
        "llama",
        "--data",
        str(tmp_path / "d"),
        "--seq-len",
        "16",
        "--batch-size",
        "8",
        "--data-parallel",
        "2",
        "--tensor-parallel",
        "4",
        "--max-steps",
        "6",
        "--no-progress",
        "--val-check-interval",
        "2",
    ]
    two = _launch(tmp_path, 2, args, "two")
    try:  # the one-process reference, in this process while the two start
        ref = train_main(["--devices", "8", *args, "--root-dir", str(tmp_path / "one")])
    finally:
        codes = wait_all(two)
    assert codes == [0, 0], _log(tmp_path, "two0.log") + _log(tmp_path, "two1.log")
    got = [json.loads((tmp_path / f"two{i}.json").read_text()) for i in range(2)]
    assert got[0]["process_count"] == 2
    assert got[0]["val_history"] == got[1]["val_history"]
    assert [v["step"] for v in got[0]["val_history"]] == [2, 4, 6]
    # Means of positive cross-entropies (no cancellation): relative, seen <= 5e-7. AdamW may
    # flip a step whose gradient is rounding noise; that moves the loss to second order only.
    np.testing.assert_allclose(got[0]["losses"], ref["losses"], rtol=1e-5)
    np.testing.assert_allclose(
        [v["val_loss"] for v in got[0]["val_history"]],
        [v["val_loss"] for v in ref["val_history"]],
        rtol=1e-5,
    )
