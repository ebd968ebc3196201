"""Worker for test_multiprocess: one process of a 2-process job exporting a sharded model.

    python mp_export_worker.py COORD PROCESS_ID OUT_FILE

Prints one JSON line: this process's peak traced host allocation during
``jtp.save_consolidated`` (tracemalloc sees numpy buffers) and the largest parameter's bytes.
"""

import faulthandler
import json
import os
import sys
import tracemalloc

faulthandler.dump_traceback_later(90, exit=True)  # a hang shows where it hangs, then exits

import jax  # noqa: E402

coord, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coord, 2, pid, heartbeat_timeout_seconds=10)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jtp  # noqa: E402

DIM, HIDDEN = 256, 1024  # three 1 MiB fp32 kernels (bf16: 0.5 MiB)
mesh = jtp.make_mesh(2, 4)
dtype = jnp.bfloat16 if out.endswith("bf16.safetensors") else jnp.float32
factory = lambda: jtp.models.FeedForward(DIM, HIDDEN, param_dtype=dtype, rngs=nnx.Rngs(0))  # noqa: E731
model = jtp.sharded_init(factory, mesh, jtp.plans.feedforward(), fsdp=True)
tracemalloc.start()
jtp.save_consolidated(model, out)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
largest = HIDDEN * DIM * jnp.dtype(dtype).itemsize
print(json.dumps({"process": pid, "peak_host_bytes": peak, "largest_param_bytes": largest}))
jax.distributed.shutdown()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo may hang there (see jtp.cli.train)
