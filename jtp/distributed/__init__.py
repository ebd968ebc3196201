"""What keeps the processes of one job together.

- :mod:`~jtp.distributed.launch`: process start, the launcher (SLURM, Open MPI, Kubernetes
  JobSet) read from the environment and every argument of ``jax.distributed.initialize``.
- :mod:`~jtp.distributed.agreement`: every process learns the same small integer (stop,
  restore which step), so all take each decision together.
- :mod:`~jtp.distributed.programs`: one executable per program on every process.
- :mod:`~jtp.distributed.watchdog`: a collective that makes no progress ends the process
  with a message naming the step and the wait.
"""

import jax  # noqa: F401  (tests patch jtp.distributed.jax.distributed.initialize)

from jtp.distributed.agreement import agree_max, agree_min
from jtp.distributed.launch import (
    JOBSET_PORT,
    Launch,
    detect_launch,
    first_host,
    owned_devices,
    start_distributed,
)
from jtp.distributed.programs import same_programs_on_every_process
from jtp.distributed.watchdog import HANG_EXIT_CODE, Watchdog, watchdog, watching

__all__ = [
    "HANG_EXIT_CODE",
    "JOBSET_PORT",
    "Launch",
    "Watchdog",
    "agree_max",
    "agree_min",
    "detect_launch",
    "first_host",
    "owned_devices",
    "same_programs_on_every_process",
    "start_distributed",
    "watchdog",
    "watching",
]
