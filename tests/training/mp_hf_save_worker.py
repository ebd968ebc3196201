"""Worker for test_multiprocess: one process of a 2-process job loading a Hugging Face
checkpoint onto a 2 x 4 mesh with fsdp, layers scanned (stacked on a leading layer axis
split across both processes' devices), and saving it back.

    python mp_hf_save_worker.py COORD PROCESS_ID SOURCE_DIR OUT_DIR
"""

import faulthandler
import os
import sys

faulthandler.dump_traceback_later(100, exit=True)  # a hang shows where it hangs, then exits

import jax  # noqa: E402

coord, pid, source, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coord, 2, pid, heartbeat_timeout_seconds=10)

import jtp  # noqa: E402

mesh = jtp.make_mesh(2, 4)  # "data" spans the two processes
model = jtp.hf.load_pretrained(source, mesh, fsdp=True, max_seq_len=16)
assert model.config.scan_layers, "the default form is the one under test"
jtp.hf.save_pretrained(model, out, source=source, max_shard_bytes=40_000)
print("saved", flush=True)
jax.distributed.shutdown()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo may hang there (see jtp.cli.train)
