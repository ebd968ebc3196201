"""Worker for test_watchdog_and_programs: one process of a 2-process job that traces one
program from a different line than the other process does, as ``save_pretrained`` does
(process 0 gathers inside the file writer, the others in a loop beside it).

    python mp_call_sites_worker.py COORD PROCESS_ID
"""

import faulthandler
import sys

faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where it hangs, then exits

import jax  # noqa: E402
import numpy as np  # noqa: E402

coord, pid = sys.argv[1], int(sys.argv[2])
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coord, 2, pid, heartbeat_timeout_seconds=10)

from jtp.distributed import same_programs_on_every_process  # noqa: E402

assert same_programs_on_every_process()
mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.make_array_from_process_local_data(
    jax.NamedSharding(mesh, jax.P("x")), np.arange(2, dtype=np.float32) + 2 * pid
)
total = jax.jit(lambda a: a.sum(), out_shardings=jax.NamedSharding(mesh, jax.P()))


def on_process_0(a):
    return total(a)


def elsewhere(a):
    return total(a)


result = on_process_0(x) if pid == 0 else elsewhere(x)
print("sum", float(np.asarray(result.addressable_data(0))), flush=True)
