"""The ("data", "tensor") device mesh.

The only file that spells the mesh axis names; everything else imports ``DATA`` and ``TENSOR``.
The tensor axis is innermost so that one tensor-parallel group is a run of consecutive devices,
i.e. sits on one host with its fast links, while the data axis spans hosts (Lightning's "auto").
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA = "data"
TENSOR = "tensor"
AXES = (DATA, TENSOR)


def _resolve_sizes(data: int, tensor: int, n_devices: int) -> tuple[int, int]:
    for name, size in (("data", data), ("tensor", tensor)):
        if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
            raise ValueError(f"make_mesh: {name}={size!r} must be a positive int or -1 (fill)")
    if data == -1 and tensor == -1:
        raise ValueError("make_mesh: only one of data and tensor may be -1")
    if data == -1 or tensor == -1:
        known = tensor if data == -1 else data
        if n_devices % known:
            raise ValueError(
                f"make_mesh: {n_devices} devices are not divisible by "
                f"{'tensor' if data == -1 else 'data'}={known}"
            )
        return (n_devices // known, tensor) if data == -1 else (data, n_devices // known)
    if data * tensor != n_devices:
        raise ValueError(
            f"make_mesh: data={data} x tensor={tensor} = {data * tensor} devices, "
            f"but {n_devices} devices are available; pass sizes whose product is {n_devices} "
            "or -1 for one of them"
        )
    return data, tensor


def make_mesh(
    data: int = -1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Build a ``("data", "tensor")`` mesh with Auto axis types.

    Auto (not jax's new Explicit default) axes let GSPMD/Shardy insert the collectives a
    row-parallel matmul needs, which is the whole point of a plan-based API.

    Args:
      data: size of the data-parallel axis; ``-1`` takes the remaining devices.
      tensor: size of the tensor-parallel axis; ``-1`` takes the remaining devices.
      devices: devices to lay out (default ``jax.devices()``), row-major, tensor innermost.

    Example::

      mesh = jtp.make_mesh(data=2, tensor=4)   # 8 devices: 2 groups of 4
    """
    devs = list(jax.devices() if devices is None else devices)
    d, t = _resolve_sizes(data, tensor, len(devs))
    grid = np.asarray(devs, dtype=object).reshape(d, t)  # (data, tensor)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def select_devices(n: int) -> list[jax.Device]:
    """The first ``n`` devices; on CPU, first force ``n`` host devices if jax has not
    started its backend yet (the only moment that is possible)."""
    if n < 1:
        raise ValueError(f"--devices {n} must be >= 1")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # backend already up (e.g. under pytest): use what exists
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(f"--devices {n}: only {len(devices)} {devices[0].platform} devices")
    return devices[:n]


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """``{"data": d, "tensor": t}`` for a jtp mesh."""
    return {DATA: int(mesh.shape[DATA]), TENSOR: int(mesh.shape[TENSOR])}
