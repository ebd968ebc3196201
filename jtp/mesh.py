"""The ("data", "tensor") device mesh, and ModelParallelStrategy that sizes it.

The only file that spells the mesh axis names; everything else imports ``DATA`` and ``TENSOR``.
The tensor axis is innermost so that one tensor-parallel group is a run of consecutive devices,
i.e. sits on one host with its fast links, while the data axis spans hosts (Lightning's "auto").
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jtp.errors import InputError

DATA = "data"
TENSOR = "tensor"
AXES = (DATA, TENSOR)


def select_devices(n: int) -> list[jax.Device]:
    """The first ``n`` devices; on CPU, first force ``n`` host devices if jax has not
    started its backend yet (the only moment that is possible)."""
    if n < 1:
        raise InputError(f"--devices {n}: must be >= 1")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # backend already up (e.g. under pytest): use what exists
    devices = jax.devices()
    if len(devices) < n:
        raise InputError(
            f"--devices {n}: only {len(devices)} {devices[0].platform} devices; pass at most "
            f"{len(devices)} (on CPU, force more before jax starts: JAX_NUM_CPU_DEVICES={n})"
        )
    return devices[:n]


def _resolve_sizes(data: int, tensor: int, n_devices: int) -> tuple[int, int]:
    for name, size in (("data", data), ("tensor", tensor)):
        if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
            raise InputError(f"make_mesh: {name}={size!r} must be a positive int or -1 (fill)")
    if data == -1 and tensor == -1:
        raise InputError("make_mesh: only one of data and tensor may be -1")
    if data == -1 or tensor == -1:
        known = tensor if data == -1 else data
        if n_devices % known:
            sizes = ", ".join(str(k) for k in range(1, n_devices + 1) if n_devices % k == 0)
            raise InputError(
                f"make_mesh: {n_devices} devices are not divisible by "
                f"{'tensor' if data == -1 else 'data'}={known}; valid sizes: {sizes}"
            )
        return (n_devices // known, tensor) if data == -1 else (data, n_devices // known)
    if data * tensor != n_devices:
        raise InputError(
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


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """``{"data": d, "tensor": t}`` for a jtp mesh."""
    return {DATA: int(mesh.shape[DATA]), TENSOR: int(mesh.shape[TENSOR])}


Size = int | str


def _check_size(name: str, value: Size) -> None:
    if value == "auto":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"ModelParallelStrategy: {name}={value!r} must be 'auto' or an int >= 1")


class ModelParallelStrategy:
    """Data x tensor parallelism on a ``("data", "tensor")`` mesh.

    Args:
      data_parallel_size: data-parallel groups; "auto" = number of processes, or the devices
        left over when ``tensor_parallel_size`` is given.
      tensor_parallel_size: devices per tensor-parallel group; "auto" = devices per process,
        or the devices left over when ``data_parallel_size`` is given.
      fsdp: also shard parameters and optimizer state over ``"data"`` (2D parallelism) when
        the module's ``configure_model`` returns ``(factory, plan)``.
      devices: the devices to use (default: all of ``jax.devices()``).
    """

    def __init__(
        self,
        data_parallel_size: Size = "auto",
        tensor_parallel_size: Size = "auto",
        *,
        fsdp: bool = False,
        devices: Sequence[jax.Device] | None = None,
    ):
        _check_size("data_parallel_size", data_parallel_size)
        _check_size("tensor_parallel_size", tensor_parallel_size)
        self.data_parallel_size = data_parallel_size
        self.tensor_parallel_size = tensor_parallel_size
        self.fsdp = fsdp
        self.devices = list(devices) if devices is not None else None

    def _sizes(self) -> tuple[int, int]:
        n = len(self.devices) if self.devices is not None else jax.device_count()
        data, tensor = self.data_parallel_size, self.tensor_parallel_size
        if data == "auto" and tensor == "auto":
            processes = jax.process_count()
            return processes, n // processes
        if data == "auto":
            return -1, tensor
        if tensor == "auto":
            return data, -1
        if data * tensor != n:
            raise InputError(
                f"ModelParallelStrategy: data_parallel_size={data} x tensor_parallel_size="
                f"{tensor} = {data * tensor}, but there are {n} devices; make the product {n}"
            )
        return data, tensor

    @cached_property
    def mesh(self) -> Mesh:
        """The ``("data", "tensor")`` mesh over all devices (built on first use)."""
        data, tensor = self._sizes()
        return make_mesh(data=data, tensor=tensor, devices=self.devices)

    def __repr__(self) -> str:
        shape = mesh_shape(self.mesh) if "mesh" in self.__dict__ else None
        return (
            f"ModelParallelStrategy(data_parallel_size={self.data_parallel_size!r}, "
            f"tensor_parallel_size={self.tensor_parallel_size!r}, fsdp={self.fsdp}, mesh={shape})"
        )
