"""Worker for test_multiprocess: one process of a 2-process job checking its batches.

    python mp_replicas_worker.py COORD PROCESS_ID {good|bad}

"bad" builds the batch the way Lightning's docs example does without seeding: each process
draws its own random rows, so the tensor group spanning both processes disagrees.
Exit 0: replicas agree; 3: jtp.check_replicas raised (message printed).
"""

import faulthandler
import os
import sys

faulthandler.dump_traceback_later(45, exit=True)  # a hang shows where it hangs, then exits

import jax  # noqa: E402

coord, pid, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coord, 2, pid, heartbeat_timeout_seconds=10)

import numpy as np  # noqa: E402

import jtp  # noqa: E402

mesh = jtp.make_mesh(1, 8)  # one tensor group over both processes
if mode == "bad":
    rows = np.random.default_rng(jax.process_index()).standard_normal((8, 16), dtype=np.float32)
    batch = jtp.shard_batch(rows, mesh)  # each process passes its own "global" batch
else:
    batch = next(iter(jtp.DataLoader(jtp.RandomDataset(16, 64), 8, mesh=mesh, shuffle=True)))
import time  # noqa: E402

t0 = time.perf_counter()
code = 0
try:
    jtp.check_replicas(batch, step=1)
    print(f"replicas agree ({(time.perf_counter() - t0) * 1e3:.1f} ms)", flush=True)
except ValueError as err:
    print(err, flush=True)
    code = 3
jax.distributed.shutdown()
sys.stdout.flush()
os._exit(code)  # skip interpreter teardown: gloo may hang there (see jtp.train._run_and_exit)
