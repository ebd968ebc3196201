"""What keeps a job's processes together (jtp.distributed): one executable per program on
every process, and the collective watchdog that turns a hang into an error. Real processes
on 127.0.0.1, each started with a timeout and killed in a ``finally``."""

import signal
import time
from pathlib import Path

import pytest
from processes import free_port, start_process, stop_all, two_workers, wait_all

from jtp.distributed import HANG_EXIT_CODE, Watchdog
from jtp.training.options import TrainerOptions

HERE = Path(__file__).parent


def test_one_program_traced_from_different_lines_meets_across_processes(tmp_path):
    """Process 0 traces a cross-process sum from one function, process 1 from another (as
    ``save_pretrained``'s writer and its helpers do). With jaxlib 0.12.1 the two executables
    differed by their source locations and the collective never met (both processes hung);
    ``same_programs_on_every_process`` leaves the locations out and both finish."""
    procs = two_workers(HERE / "mp_call_sites_worker.py", tmp_path, "c")
    codes = wait_all(procs, timeout=90)
    logs = [(tmp_path / f"c{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    for log in logs:  # 0 + 1 + 2 + 3 over both processes' devices
        assert "sum 6.0" in log, log


def test_watchdog_ends_a_watched_hang_naming_step_and_wait(tmp_path):
    """A region that never ends: the process exits with 124 within the timeout (plus the
    interpreter's start), saying which step and what it waited on, with the stacks."""
    log = tmp_path / "w.log"
    t0 = time.monotonic()
    proc = start_process(["1.0"], log, program=[str(HERE / "mp_hang_watchdog_worker.py")])
    try:
        assert proc.wait(timeout=60) == HANG_EXIT_CODE, log.read_text()
    finally:
        stop_all([proc])
    assert time.monotonic() - t0 < 30
    text = log.read_text()
    assert "no progress for 1 s at step 7: waiting on a peer that never answers" in text
    assert "mp_hang_watchdog_worker.py" in text and "not reached" not in text  # the stacks


def test_an_untimed_region_inside_a_watched_one_is_not_timed(tmp_path):
    """A compile inside a watched region (the fit's first validation compiles its step) waits
    on no peer and may take longer than any timeout: it runs untimed, for 4x the timeout."""
    log = tmp_path / "u.log"
    worker = [str(HERE / "mp_hang_watchdog_worker.py")]
    proc = start_process(["0.5", "untimed"], log, program=worker)
    try:
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        stop_all([proc])
    assert "survived the untimed region" in log.read_text()


def test_watchdog_idle_outside_regions_and_options_validated():
    dog = Watchdog()
    with dog.watch("not armed: a no-op"):
        pass
    dog.arm(0.2)
    time.sleep(0.5)  # armed, but no region: nothing ends
    with dog.watch("quick"):
        pass
    dog.arm(None)
    with pytest.raises(ValueError, match="collective_timeout=0 must be > 0"):
        TrainerOptions(collective_timeout=0)
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        dog.arm(-1)


def _progressed(log: Path, steps: int) -> bool:
    """Process 0's progress lines (one per step) show ``steps`` steps."""
    return log.exists() and log.read_text().count(" loss ") >= steps


def test_a_stopped_peer_ends_every_process_within_the_timeout(tmp_path):
    """Two training processes; after a few steps process 1 is frozen (SIGSTOP) and process 0
    gets SIGTERM, which its handler cannot act on while it waits in a collective. Process 0
    ends with 124 within the timeout, naming the step and the agreement it waited on; process
    1, let run again, ends too. Before the watchdog both waited forever (only SIGKILL ended
    them)."""
    port, timeout = free_port(), 8
    args = [
        "--devices",
        "4",
        "--data-parallel",
        "2",
        "--tensor-parallel",
        "4",
        "--dim",
        "32",
        "--hidden-dim",
        "64",
        "--samples",
        "64",
        "--max-epochs",
        "100000",
        "--log-every-n-steps",
        "1",
        "--collective-timeout",
        str(timeout),
        "--root-dir",
        str(tmp_path / "runs"),
    ]
    procs = [
        start_process(
            [
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                *args,
            ],
            tmp_path / f"p{i}.log",
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 120
        while not _progressed(tmp_path / "p0.log", 5):
            assert time.monotonic() < deadline, (tmp_path / "p0.log").read_text()[-2000:]
            assert all(p.poll() is None for p in procs), (tmp_path / "p0.log").read_text()
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=timeout + 30) == HANG_EXIT_CODE
        assert time.monotonic() - stopped < timeout + 10
        procs[1].send_signal(signal.SIGCONT)
        assert procs[1].wait(timeout=60) != 0  # its watchdog (or the runtime) ends it too
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        stop_all(procs)
    text = (tmp_path / "p0.log").read_text()
    assert f"jtp: no progress for {timeout} s at step " in text, text[-3000:]
    assert "waiting on " in text and "(process 0 of 2)" in text
