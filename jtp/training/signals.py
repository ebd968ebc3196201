"""Stop requests (SIGTERM, SIGINT, the runtime's preemption notice) that every process obeys
at the same optimizer step.

A preempted job gets SIGTERM and some grace time, but a cluster delivers it to the processes
of one job at different moments (or to only one of them). If each process stopped on its own
flag they would leave the step sequence at different steps, and the collective save, or the
next step's collectives, would wait forever. So a process only *records* a signal; every
``every`` optimizer steps all processes agree (one tiny all-gather of the signal numbers) and,
if any process has one, all of them save that same step and exit with 128 + the signal
(143 for SIGTERM, 130 for SIGINT), as a process killed by it would report.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax

from jtp.distributed import agree_max


class StopRequest:
    """The first signal this process received (``None`` until one arrives)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signals(
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[StopRequest]:
    """Record the first of ``signals`` instead of dying (main thread only; elsewhere a no-op)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame: object) -> None:
        if stop.signum is None:
            stop.signum = signum

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _runtime_preemption(step: int) -> bool:
    """jax's preemption sync point (all processes answer True at the same step), where the
    distributed runtime runs its preemption service; False elsewhere."""
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the service is not enabled in this runtime
        return False


class StopAgreement:
    """Decides, identically in every process, after which optimizer step to stop.

    Args:
      request: this process's recorded signal.
      every: agree every this many optimizer steps (the only cross-process cost: one
        all-gather of an int32 per process, which also waits for the step to finish).
        With one process there is nothing to agree and the flag is read every step.
    """

    def __init__(self, request: StopRequest, every: int):
        if every < 1:
            raise ValueError(f"stop_check_every_n_steps={every} must be >= 1")
        self.request, self.every = request, every
        self.multi = jax.process_count() > 1
        self.preempted = False  # sticky: the runtime answers True at one step only

    def exit_code(self, step: int) -> int | None:
        """128 + the agreed signal if all processes stop after ``step``, else None.

        Every process must call it after every optimizer step (it is collective on the
        steps that are multiples of ``every``).
        """
        self.preempted = self.preempted or _runtime_preemption(step)
        signum = self.request.signum or 0
        if self.preempted:
            signum = max(signum, int(signal.SIGTERM))
        if self.multi:
            if step % self.every:
                return None
            signum = agree_max(signum)
        return 128 + signum if signum else None
