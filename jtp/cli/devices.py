"""Device selection for the programs: on CPU, force host devices before jax starts; the
mesh axis sizes they take; jax's distributed runtime, started before any other jax call."""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax

from jtp.distributed import Launch, detect_launch, start_distributed


def axis_size(value: str) -> int | str:
    """An argparse type for mesh axis sizes: 'auto' or a positive int."""
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'auto' or a positive integer") from None


def init_distributed(
    devices: int | None,
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int = 20,
) -> Launch | None:
    """Start jax's distributed runtime before any other jax call when this process is one of
    several; its launch settings, or None.

    Explicit flags, else the ``JAX_*`` variables, else what the launcher set (SLURM, Open
    MPI, Kubernetes JobSet): ``jtp.distributed.detect_launch``. Process 0 prints one line
    naming the launcher and the settings. ``devices``: this process's CPU devices, forced first.
    """
    launch = detect_launch(
        os.environ, coordinator=coordinator, num_processes=num_processes, process_id=process_id
    )
    if launch is None:
        return None
    if devices is not None:  # per-process CPU devices must be set before the backend
        jax.config.update("jax_num_cpu_devices", devices)
    start_distributed(launch, heartbeat_timeout=heartbeat_timeout)
    if launch.process_id == 0:
        print(launch.describe(), flush=True)
    return launch


def positive_int(value: str) -> int:
    """An argparse type for a positive int."""
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return size


def add_mesh_flags(
    parser: Any,
    title: str = "mesh (as python -m jtp.train)",
    *,
    expert: bool = False,
    context: bool = False,
) -> None:
    """``--devices``, ``--data-parallel``, ``--tensor-parallel`` (with ``expert``,
    ``--expert-parallel``; with ``context``, ``--context-parallel``): the mesh of a program
    that runs a model on it (``python -m jtp.eval``, ``python -m jtp.generate``)."""
    m = parser.add_argument_group(title)
    m.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="devices to use; on CPU, force this many host devices (before jax starts)",
    )
    m.add_argument(
        "--data-parallel",
        type=axis_size,
        default="auto",
        metavar="N",
        help="size of the 'data' mesh axis, or 'auto'",
    )
    m.add_argument(
        "--tensor-parallel",
        type=axis_size,
        default="auto",
        metavar="N",
        help="size of the 'tensor' mesh axis, or 'auto'",
    )
    if expert:
        m.add_argument(
            "--expert-parallel",
            type=positive_int,
            default=1,
            metavar="X",
            help="size of the 'expert' mesh axis: a MoE model's experts split over X devices "
            "(tokens exchanged by all-to-all), the batch split over data x X; 1: no such axis",
        )
    if context:
        m.add_argument(
            "--context-parallel",
            type=positive_int,
            default=1,
            metavar="C",
            help="size of the 'context' mesh axis: each sequence split into C pieces (two "
            "chunks each, balanced for the causal mask; --seq-len a multiple of 2C), attention "
            "gathering keys and values over them; 1: no such axis",
        )
