"""Worker for test_tokens: one process of a 2-process job reading a TokenDataset.

    python mp_tokens_worker.py COORD PROCESS_ID TOKEN_FILE SEQ_LEN

For meshes (2, 4) and (1, 8) over the two processes, prints one JSON line: per mesh, the
rows each of this process's devices (by mesh position) holds in every batch of one shuffled
epoch, and the window indices this process read from the file.
"""

import faulthandler
import json
import os
import sys

faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where it hangs, then exits

import jax  # noqa: E402

coord, pid, path, seq_len = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coord, 2, pid, heartbeat_timeout_seconds=10)

import numpy as np  # noqa: E402

import jtp  # noqa: E402


class Recording(jtp.TokenDataset):
    """Remembers which windows this process read."""

    read: set

    def __getitem__(self, index):
        self.read.add(int(index))
        return super().__getitem__(index)


report = {}
for shape in [(2, 4), (1, 8)]:
    mesh = jtp.make_mesh(*shape)
    data = Recording(path, seq_len)
    data.read = set()
    loader = jtp.DataLoader(data, 8, mesh=mesh, shuffle=True, seed=3)
    where = {d.id: [int(c) for c in np.argwhere(mesh.devices == d)[0]] for d in mesh.devices.flat}
    batches = []
    for batch in loader:  # per shard: (data rank, tensor rank) and its rows
        batches.append(
            [[*where[s.device.id], np.asarray(s.data).tolist()] for s in batch.addressable_shards]
        )
    report[f"{shape[0]}x{shape[1]}"] = {"batches": batches, "read": sorted(data.read)}
print(json.dumps(report), flush=True)
jax.distributed.shutdown()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo may hang there (see jtp.train._run_and_exit)
