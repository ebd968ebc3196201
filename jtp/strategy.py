"""ModelParallelStrategy: how many devices go to data and to tensor parallelism.

Mirrors Lightning's ``ModelParallelStrategy(data_parallel_size, tensor_parallel_size)``.
"auto" follows Lightning's rule: tensor parallelism over the devices of one process (one host,
fast links), data parallelism across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import jax
from jax.sharding import Mesh

from jtp.mesh import make_mesh, mesh_shape

Size = int | str


def _check_size(name: str, value: Size) -> None:
    if value == "auto":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ModelParallelStrategy: {name}={value!r} must be 'auto' or an int >= 1")


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
            raise ValueError(
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
