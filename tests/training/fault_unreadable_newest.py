"""``python -m jtp.train`` in which process 1 cannot read the newest checkpoint (as after a
transient read error on one host): fault injection from outside the library.

    python fault_unreadable_newest.py [jtp.train flags...]
"""

import jax

from jtp.checkpoint.sharded import Checkpointer
from jtp.cli.train import run

_readable = Checkpointer._readable


def _readable_except_newest_on_process_1(self, step):
    if jax.process_index() == 1 and step == max(self.all_steps()):
        return False
    return _readable(self, step)


Checkpointer._readable = _readable_except_newest_on_process_1
run()
