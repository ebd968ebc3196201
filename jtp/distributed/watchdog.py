"""The collective watchdog: a hang becomes an error naming the step and the wait."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator

import jax

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
    def watch(self, what: str, step: int | None = None, *, timed: bool = True) -> Iterator[None]:
        """Run the body as the region ``what`` (at optimizer ``step``, if given). ``timed=False``:
        the body is not timed, whatever the regions around it (a compile: it waits on no peer,
        and a large one may take longer than any timeout)."""
        if self.timeout is None:
            yield
            return
        region = (what, step, timed)
        with self._cv:
            self._regions.append(region)
            self._since = time.monotonic()
            self._cv.notify()
        try:
            yield
        finally:
            with self._cv:
                self._regions.remove(region)
                self._since = time.monotonic()

    def _run(self) -> None:
        while True:
            with self._cv:
                if self.timeout is None or not self._regions or not self._regions[-1][2]:
                    self._cv.wait()  # nothing watched, or an untimed region innermost
                    continue
                left = self._since + self.timeout - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                what = self._regions[-1][0]  # the innermost wait, at the step around it
                step = next((s for _, s, _ in reversed(self._regions) if s is not None), None)
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
