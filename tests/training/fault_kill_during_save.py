"""``python -m jtp.train`` that dies like ``kill -9`` right after the async save of step N
has started: fault injection from outside the library.

    python fault_kill_during_save.py N [jtp.train flags...]
"""

import os
import signal
import sys

from jtp.checkpoint.sharded import Checkpointer
from jtp.cli.train import run

KILL_AT = int(sys.argv.pop(1))
_save = Checkpointer.save


def _save_then_die(self, step, state, meta):
    _save(self, step, state, meta)
    if step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


Checkpointer.save = _save_then_die
run()
