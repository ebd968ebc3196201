"""The ("data", ["expert",] ["context",] "tensor") device mesh, and ModelParallelStrategy
that sizes it.

The only file that spells the mesh axis names; everything else imports ``DATA``, ``EXPERT``,
``CONTEXT`` and ``TENSOR``. The tensor axis is innermost so that one tensor-parallel group is
a run of consecutive devices, i.e. sits on one host with its fast links, while the data axis spans
hosts (Lightning's "auto"). The expert axis sits between them: its all-to-alls (the MoE
layers' token exchange, :mod:`jtp.parallel.expert_exchange`) move more bytes than the data
axis' once-per-step gradient reduction, so it gets the nearer devices.

Outside the MoE layers "expert" is data-like: a batch's rows are split over
``("data", "expert")`` (:func:`batch_axes`), each (data, expert) pair of indices is one
*batch rank* (data major), and gradients are means over all of them. A mesh built without
an expert axis (or with ``expert=1``) has exactly the axes ``("data", "tensor")`` it always
had, so its programs do not change.

The context axis (context parallelism, :mod:`jtp.parallel.context`) splits every sequence
into pieces: a batch's rows are NOT split over it (each device of a context group holds the
same rows, a different piece of each), and the parameters are replicated over it as over
"data". It sits next to "tensor": attention gathers keys and values over it in every layer,
more often than "data" or "expert" move anything, so its groups get the nearer devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jtp.errors import InputError

DATA = "data"
EXPERT = "expert"
CONTEXT = "context"
TENSOR = "tensor"
AXES = (DATA, TENSOR)  # the axes of a mesh without an expert axis


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


def _resolve_sizes(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    """``sizes`` (axis -> size, at most one ``-1``) with the ``-1`` filled from the devices."""
    for name, size in sizes.items():
        if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
            raise InputError(f"make_mesh: {name}={size!r} must be a positive int or -1 (fill)")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise InputError(f"make_mesh: only one of {' and '.join(fill)} may be -1")
    known = math.prod(int(size) for size in sizes.values() if size != -1)
    shown = {n: v for n, v in sizes.items() if v != -1 and (n in (DATA, TENSOR) or v != 1)}
    given = " x ".join(f"{name}={size}" for name, size in shown.items())
    if fill:
        if n_devices % known:
            valid = ", ".join(str(k) for k in range(1, n_devices + 1) if n_devices % k == 0)
            raise InputError(
                f"make_mesh: {n_devices} devices are not divisible by {given} = {known}; "
                f"valid sizes: {valid}"
            )
        return {name: n_devices // known if size == -1 else size for name, size in sizes.items()}
    if known != n_devices:
        raise InputError(
            f"make_mesh: {given} = {known} devices, but {n_devices} devices are available; "
            f"pass sizes whose product is {n_devices} or -1 for one of them"
        )
    return dict(sizes)


def make_mesh(
    data: int = -1,
    tensor: int = 1,
    *,
    expert: int = 1,
    context: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Build a ``("data", "tensor")`` mesh, with an ``"expert"`` axis after "data" when
    ``expert > 1`` and a ``"context"`` axis before "tensor" when ``context > 1``, with Auto
    axis types.

    Auto (not jax's new Explicit default) axes let GSPMD/Shardy insert the collectives a
    row-parallel matmul needs, which is the whole point of a plan-based API.

    Args:
      data: size of the data-parallel axis; ``-1`` takes the remaining devices.
      tensor: size of the tensor-parallel axis; ``-1`` takes the remaining devices.
      expert: size of the expert-parallel axis (a MoE layer's experts are split over it,
        its tokens exchanged by all-to-all; elsewhere it splits the batch like "data");
        ``1`` (the default) leaves the axis out; ``-1`` takes the remaining devices.
      context: size of the context-parallel axis (each sequence split into that many
        pieces; :mod:`jtp.parallel.context`); ``1`` (the default) leaves the axis out.
      devices: devices to lay out (default ``jax.devices()``), row-major, tensor innermost.

    Example::

      mesh = jtp.make_mesh(data=2, tensor=4)   # 8 devices: 2 groups of 4
      mesh = jtp.make_mesh(data=2, expert=2, tensor=2)  # ("data", "expert", "tensor")
      mesh = jtp.make_mesh(data=2, context=2, tensor=2)  # ("data", "context", "tensor")
    """
    devs = list(jax.devices() if devices is None else devices)
    requested = {DATA: data, EXPERT: expert, CONTEXT: context, TENSOR: tensor}
    sizes = _resolve_sizes(requested, len(devs))
    # Axes of size 1 beyond ("data", "tensor") are left out: the mesh (and every program)
    # of before.
    names = tuple(n for n in (DATA, EXPERT, CONTEXT, TENSOR) if n in AXES or sizes[n] > 1)
    shape = tuple(sizes[n] for n in names)
    grid = np.asarray(devs, dtype=object).reshape(shape)  # (data, [expert,] [context,] tensor)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """``{"data": d, "tensor": t}`` for a jtp mesh, ``{"data": d, "expert": x, "tensor": t}``
    for one with an expert axis (and ``"context": c`` with a context axis)."""
    return {name: int(size) for name, size in mesh.shape.items()}


def context_size(mesh: Mesh) -> int:
    """How many pieces each sequence is split into: the context axis' size, 1 without one."""
    return int(mesh.shape.get(CONTEXT, 1))


def batch_axes(mesh: Mesh) -> str | tuple[str, ...]:
    """The ``PartitionSpec`` entry of a batch's rows: ``"data"``, or ``("data", "expert")``
    on a mesh with an expert axis (data major: batch rank ``d * expert + x``)."""
    return (DATA, EXPERT) if EXPERT in mesh.shape else DATA


def batch_axis_names(mesh: Mesh) -> tuple[str, ...]:
    """The data-like axes of ``mesh`` as a tuple: ``("data",)`` or ``("data", "expert")``."""
    return (DATA, EXPERT) if EXPERT in mesh.shape else (DATA,)


def batch_axes_text(mesh: Mesh) -> str:
    """How an error names the batch axes: ``mesh axis 'data'`` or ``mesh axes ('data',
    'expert')``."""
    axes = batch_axes(mesh)
    return f"mesh axis {axes!r}" if isinstance(axes, str) else f"mesh axes {axes!r}"


def batch_ranks(mesh: Mesh) -> int:
    """How many ways a batch's rows are split: ``data`` (x ``expert``)."""
    return math.prod(int(mesh.shape[a]) for a in batch_axis_names(mesh))


def batch_grid(mesh: Mesh) -> np.ndarray:
    """``mesh.devices`` as ``(batch rank, context x tensor)``: row r holds the devices of
    batch rank r (the same rows; each device its piece of the sequence under context)."""
    return np.asarray(mesh.devices).reshape(batch_ranks(mesh), -1)


Size = int | str


def _check_size(name: str, value: Size) -> None:
    if value == "auto":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"ModelParallelStrategy: {name}={value!r} must be 'auto' or an int >= 1")


class ModelParallelStrategy:
    """Data x tensor (x expert x context) parallelism on a ``("data", ["expert",] ["context",]
    "tensor")`` mesh.

    Args:
      data_parallel_size: data-parallel groups; "auto" = number of processes, or the devices
        left over when ``tensor_parallel_size`` is given.
      tensor_parallel_size: devices per tensor-parallel group; "auto" = devices per process
        (over ``expert_parallel_size``), or the devices left over when
        ``data_parallel_size`` is given.
      expert_parallel_size: size of the "expert" axis (a MoE model's experts split over it;
        elsewhere it splits the batch as "data" does); 1: no expert axis.
      context_parallel_size: size of the "context" axis (each sequence split into that many
        pieces, :mod:`jtp.parallel.context`); 1: no context axis.
      fsdp: also shard parameters and optimizer state over ``"data"`` (and ``"expert"``)
        (2D parallelism) when the module's ``configure_model`` returns ``(factory, plan)``.
      devices: the devices to use (default: all of ``jax.devices()``).
    """

    def __init__(
        self,
        data_parallel_size: Size = "auto",
        tensor_parallel_size: Size = "auto",
        *,
        expert_parallel_size: int = 1,
        context_parallel_size: int = 1,
        fsdp: bool = False,
        devices: Sequence[jax.Device] | None = None,
    ):
        _check_size("data_parallel_size", data_parallel_size)
        _check_size("tensor_parallel_size", tensor_parallel_size)
        if expert_parallel_size == "auto":
            raise InputError("ModelParallelStrategy: expert_parallel_size must be an int >= 1")
        _check_size("expert_parallel_size", expert_parallel_size)
        if context_parallel_size == "auto":
            raise InputError("ModelParallelStrategy: context_parallel_size must be an int >= 1")
        _check_size("context_parallel_size", context_parallel_size)
        self.context_parallel_size = context_parallel_size
        self.data_parallel_size = data_parallel_size
        self.tensor_parallel_size = tensor_parallel_size
        self.expert_parallel_size = expert_parallel_size
        self.fsdp = fsdp
        self.devices = list(devices) if devices is not None else None

    def _extra_axes(self) -> list[tuple[str, int]]:
        """``(argument, size)`` of the expert and context axes this strategy has (> 1)."""
        sizes = (
            ("expert_parallel_size", self.expert_parallel_size),
            ("context_parallel_size", self.context_parallel_size),
        )
        return [(name, size) for name, size in sizes if size > 1]

    def _sizes(self) -> tuple[int, int]:
        """(data, tensor) sizes, ``-1`` where make_mesh fills in the rest."""
        n = len(self.devices) if self.devices is not None else jax.device_count()
        data, tensor = self.data_parallel_size, self.tensor_parallel_size
        x = self.expert_parallel_size * self.context_parallel_size
        if data == "auto" and tensor == "auto":
            processes = jax.process_count()
            return processes, -1
        if data == "auto":
            return -1, tensor
        if tensor == "auto":
            return data, -1
        if data * x * tensor != n:
            shown = "".join(f" x {name}={size}" for name, size in self._extra_axes())
            raise InputError(
                f"ModelParallelStrategy: data_parallel_size={data}{shown} x "
                f"tensor_parallel_size={tensor} = {data * x * tensor}, but there are {n} "
                f"devices; make the product {n}"
            )
        return data, tensor

    @cached_property
    def mesh(self) -> Mesh:
        """The ``("data", ["expert",] ["context",] "tensor")`` mesh over all devices (built on
        first use)."""
        data, tensor = self._sizes()
        return make_mesh(
            data=data,
            tensor=tensor,
            expert=self.expert_parallel_size,
            context=self.context_parallel_size,
            devices=self.devices,
        )

    def __repr__(self) -> str:
        shape = mesh_shape(self.mesh) if "mesh" in self.__dict__ else None
        expert = "".join(f", {name}={size}" for name, size in self._extra_axes())
        return (
            f"ModelParallelStrategy(data_parallel_size={self.data_parallel_size!r}, "
            f"tensor_parallel_size={self.tensor_parallel_size!r}{expert}, fsdp={self.fsdp}, "
            f"mesh={shape})"
        )
