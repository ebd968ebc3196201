"""Device selection for the programs: on CPU, force host devices before jax starts; the
mesh axis sizes they take; jax's distributed runtime, started before any other jax call."""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax


def select_devices(n: int) -> list[jax.Device]:
    """The first ``n`` devices; on CPU, first force ``n`` host devices if jax has not
    started its backend yet (the only moment that is possible)."""
    if n < 1:
        raise ValueError(f"--devices {n}: must be >= 1")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # backend already up (e.g. under pytest): use what exists
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(
            f"--devices {n}: only {len(devices)} {devices[0].platform} devices; pass at most "
            f"{len(devices)} (on CPU, force more before jax starts: JAX_NUM_CPU_DEVICES={n})"
        )
    return devices[:n]


def axis_size(value: str) -> int | str:
    """An argparse type for mesh axis sizes: 'auto' or a positive int."""
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'auto' or a positive integer")
    return size


def init_distributed(
    devices: int | None,
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int = 20,
) -> bool:
    """Start jax's distributed runtime before any other jax call, when asked to; whether it
    was started.

    Explicit ``coordinator`` (with ``num_processes`` and ``process_id``), or the standard
    environment (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``)
    or a detected cluster (SLURM, ...), which ``jax.distributed.initialize()`` reads itself.
    ``devices``: this process's CPU devices, forced first (the backend starts with it).
    """
    explicit = coordinator is not None
    from_env = "JAX_COORDINATOR_ADDRESS" in os.environ or "SLURM_JOB_ID" in os.environ
    if not (explicit or from_env):
        return False
    if devices is not None:  # per-process CPU devices must be set before the backend
        jax.config.update("jax_num_cpu_devices", devices)
    kwargs: dict[str, Any] = {"heartbeat_timeout_seconds": heartbeat_timeout}
    if explicit:
        kwargs.update(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    jax.distributed.initialize(**kwargs)
    return True


def add_mesh_flags(parser: Any, title: str = "mesh (as python -m jtp.train)") -> None:
    """``--devices``, ``--data-parallel``, ``--tensor-parallel``: the mesh of a program
    that runs a model on it (``python -m jtp.eval``, ``python -m jtp.generate``)."""
    m = parser.add_argument_group(title)
    m.add_argument(
        "--devices", type=int, default=None, metavar="N",
        help="devices to use; on CPU, force this many host devices (before jax starts)",
    )  # fmt: skip
    m.add_argument(
        "--data-parallel", type=axis_size, default="auto", metavar="N",
        help="size of the 'data' mesh axis, or 'auto'",
    )  # fmt: skip
    m.add_argument(
        "--tensor-parallel", type=axis_size, default="auto", metavar="N",
        help="size of the 'tensor' mesh axis, or 'auto'",
    )  # fmt: skip
