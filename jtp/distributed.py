"""What keeps the processes of one job together: agreement (every process learns the same
small integer), one executable per program on every process, and the collective watchdog.

Each decision that changes what the processes do next (stop, restore which step) goes through
here, so all processes take it together; a decision one process took alone would leave the
others waiting in a collective. One call is one all-gather of one int32 per process.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np


def agree_max(value: int) -> int:
    """The largest ``value`` over all processes (every process must call it)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    with watching("a cross-process agreement (an all-gather of one int32 per process)"):
        return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def agree_min(value: int) -> int:
    """The smallest ``value`` over all processes (every process must call it)."""
    return -agree_max(-int(value))


# ---------------------------------------------------------------- one program on every process


def same_programs_on_every_process() -> bool:
    """In a multi-process run, compile every program without Python source locations, so
    that each process's copy of a program is the same executable; whether it was needed.

    Why: with jax/jaxlib 0.12.1, a CPU program's cross-process collectives only meet when
    every process runs an executable with the same fingerprint, and the fingerprint covers
    the program's metadata, which names the Python call stack it was traced from (up to
    ``jax_traceback_in_locations_limit`` frames). Two processes that trace one program from
    different lines (process 0 gathers a tensor inside the file writer, the others in a
    loop beside it), or one that loads it from the persistent compilation cache while the
    other compiles it (a deserialised executable gets another fingerprint), wait for each
    other forever. Measured: a warm-cache second run and a two-process ``save_pretrained``
    both hung; with the locations left out both finish (``tests/test_distributed.py``). The
    cost: HLO dumps and profiles of a multi-process run show op names but no source lines.
    Call after ``jax.distributed.initialize`` and before tracing anything that crosses
    processes; calling it again is free.
    """
    if jax.process_count() == 1:
        return False
    if jax.config.jax_traceback_in_locations_limit != 0:
        jax.config.update("jax_traceback_in_locations_limit", 0)
    return True


# ---------------------------------------------------------------- the collective watchdog

#: The exit status of a process the watchdog ended (as ``timeout(1)``'s).
HANG_EXIT_CODE = 124


class Watchdog:
    """Ends this process when a watched operation makes no progress for ``timeout`` seconds.

    A stuck collective (a peer stopped, dead, or waiting in another collective) blocks the
    main thread inside the runtime, where neither a Python signal handler nor the
    trainer's stop agreement can run: without this, SIGTERM is recorded and never acted on
    and only SIGKILL ends the process. Like NCCL's watchdog and torch's collective timeout,
    a thread of its own watches: code that may block on other processes runs inside
    :meth:`watch`; entering or leaving a watched region is progress; when the innermost
    region has lasted ``timeout`` seconds the thread prints which step and what it waited
    on, with every thread's stack, and ends the process with :data:`HANG_EXIT_CODE`. Every
    process runs its own, so each ends within ``timeout`` of its own last progress (a
    process that was itself stopped ends as soon as it runs again). jax releases the GIL
    while it waits on the devices, so the thread runs during the hang.
    """

    def __init__(self) -> None:
        self.timeout: float | None = None
        self._cv = threading.Condition()
        self._regions: list[tuple[str, int | None]] = []
        self._since = time.monotonic()
        self._thread: threading.Thread | None = None

    def arm(self, timeout: float | None) -> None:
        """Watch with ``timeout`` seconds from now on (``None``: stop watching)."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"collective timeout {timeout!r} must be > 0 seconds (or None)")
        with self._cv:
            self.timeout = timeout
            self._since = time.monotonic()
            if timeout is not None and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="jtp-watchdog")
                self._thread.daemon = True
                self._thread.start()
            self._cv.notify()

    @contextlib.contextmanager
    def watch(self, what: str, step: int | None = None) -> Iterator[None]:
        """Run the body as the region ``what`` (at optimizer ``step``, if given)."""
        if self.timeout is None:
            yield
            return
        with self._cv:
            self._regions.append((what, step))
            self._since = time.monotonic()
            self._cv.notify()
        try:
            yield
        finally:
            with self._cv:
                self._regions.remove((what, step))
                self._since = time.monotonic()

    def _run(self) -> None:
        while True:
            with self._cv:
                if self.timeout is None or not self._regions:
                    self._cv.wait()
                    continue
                left = self._since + self.timeout - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                what = self._regions[-1][0]  # the innermost wait, at the step around it
                step = next((s for _, s in reversed(self._regions) if s is not None), None)
                timeout = self.timeout
            self._expire(what, step, timeout)

    def _expire(self, what: str, step: int | None, timeout: float) -> None:
        at = f" at step {step}" if step is not None else ""
        proc = f"process {jax.process_index()} of {jax.process_count()}"
        sys.stderr.write(
            f"\njtp: no progress for {timeout:g} s{at}: waiting on {what} ({proc}). A peer "
            "process is stopped, dead, or waiting in another collective; ending this process "
            f"with status {HANG_EXIT_CODE} (--collective-timeout / "
            "Trainer(collective_timeout=...)). Stacks:\n"
        )
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(HANG_EXIT_CODE)


#: This process's watchdog (armed by the Trainer in a multi-process fit, or by the programs).
watchdog = Watchdog()


def watching(what: str, step: int | None = None) -> contextlib.AbstractContextManager[None]:
    """``with watching("the stop agreement", step):`` the body is watched (a no-op unless
    :data:`watchdog` is armed)."""
    return watchdog.watch(what, step)
