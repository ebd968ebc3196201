"""Cross-process agreement: every process learns the same small integer.

Each decision that changes what the processes do next (stop, restore which step) goes through
here, so all processes take it together; a decision one process took alone would leave the
others waiting in a collective. One call is one all-gather of one int32 per process.
"""

from __future__ import annotations

import jax
import numpy as np

from jtp.distributed.watchdog import watching


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
