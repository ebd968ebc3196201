"""``jtp.check_replicas``: prove every device of a tensor group holds the same batch.

Tensor parallelism computes one forward pass with a group of devices; if they hold
different rows the result is silently wrong (Lightning's docs example does this across
processes unless every process is seeded alike). This hashes every shard a process holds,
gathers the hashes from all processes, and compares the devices that the sharding says
hold the same slice.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np


def _digest(data: np.ndarray) -> int:
    h = hashlib.blake2b(np.ascontiguousarray(data).tobytes(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF  # fits int64


def _gathered(local: np.ndarray) -> np.ndarray:
    """Element-wise max over processes of a per-global-device table (zeros elsewhere)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.max(np.asarray(multihost_utils.process_allgather(local)), axis=0)


def check_replicas(batch: Any, *, step: int | None = None) -> None:
    """Raise ``ValueError`` if two devices meant to hold the same slice of any leaf differ.

    Every process must call it (it gathers hashes across processes). The error names the
    step, the leaf, the devices and their processes.
    """
    devices = sorted(jax.devices(), key=lambda d: d.id)
    position = {d.id: i for i, d in enumerate(devices)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if not isinstance(leaf, jax.Array):
            continue
        table = np.zeros(len(devices), np.int64)
        for shard in leaf.addressable_shards:
            table[position[shard.device.id]] = _digest(np.asarray(shard.data))
        table = _gathered(table)
        groups: dict[tuple, list[jax.Device]] = {}
        for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
            key = tuple((s.start, s.stop) for s in index)
            groups.setdefault(key, []).append(device)
        for members in groups.values():
            hashes = {int(table[position[d.id]]) for d in members}
            if len(hashes) > 1:
                by_hash: dict[int, list[str]] = {}
                for d in members:
                    by_hash.setdefault(int(table[position[d.id]]), []).append(
                        f"device {d.id} (process {d.process_index})"
                    )
                at = f"step {step}: " if step is not None else ""
                raise ValueError(
                    f"{at}devices that must hold the same rows of batch leaf "
                    f"{jax.tree_util.keystr(path) or '<root>'} differ: "
                    + " vs ".join("[" + ", ".join(v) + "]" for v in by_hash.values())
                    + ". Every process must build identical global batches (derive rows from "
                    "the data-parallel rank; jtp.DataLoader does)."
                )
