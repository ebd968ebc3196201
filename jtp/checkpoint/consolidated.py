"""Consolidated parameters: one safetensors file, loadable on one device or any mesh.

Lightning's ``consolidate_checkpoint`` analogue. The file holds each ``nnx.Param`` whole,
under its dotted path (``layers.0.attention.wq.kernel``), so the plain single-device model
loads it, and so does a sharded one: each device reads only its slice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

from jtp.checkpoint.outputs import FILE_KEY, check_output_file, checked_on_process_0
from jtp.checkpoint.tensor_file import TensorFileWriter
from jtp.distributed import same_programs_on_every_process, watching
from jtp.parallel.names import path_str
from jtp.parallel.parallelize import sharded_init
from jtp.parallel.plan import Plan


def _take(a: jax.Array, layer: jax.Array) -> jax.Array:
    return a[layer]


def _identity(a: jax.Array) -> jax.Array:
    return a


def gathered_on_process_0(x: jax.Array, layer: int | None = None) -> np.ndarray | None:
    """The whole of a sharded array (or of ``x[layer]``, one layer of a stacked parameter),
    on process 0's host; ``None`` elsewhere.

    Every process takes part (the gather is one collective over the array's mesh); only
    process 0 copies the result to host memory. Device memory holds the whole array (or
    layer) transiently, one at a time.
    """
    same_programs_on_every_process()  # process 0 traces this from another line than the rest
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and (
        layer is not None or not sharding.is_fully_replicated
    ):
        whole = NamedSharding(sharding.mesh, P())
        if layer is None:
            x = jax.jit(_identity, out_shardings=whole)(x)
        else:  # the layer index is traced: one program for every layer of this shape
            x = jax.jit(_take, out_shardings=whole)(x, np.int32(layer))
    elif layer is not None:
        x = x[layer]
    with watching("a parameter gathered to process 0"):
        jax.block_until_ready(x)  # every process waits for its gather: a hang is watched
    if jax.process_index() != 0:
        return None
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def save_consolidated(model: nnx.Module, path: str) -> None:
    """Write the model's parameters, unsharded, to ``path``.

    Every process must call it. Parameters are gathered one at a time; process 0 streams
    each into the file and drops it, so no process ever holds more than one whole parameter
    on the host (the model never exists whole anywhere). The file appears complete or not
    at all.
    """
    params = [
        (path_str(p), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    ]
    specs = [(name, tuple(a.shape), a.dtype) for name, a in params]
    flag = "save_consolidated: path"  # refused before any gather, by every process
    checked_on_process_0(
        lambda: check_output_file(path, flag=flag, kind="consolidated"), path, flag
    )
    marked = {FILE_KEY: "consolidated"}
    writer = TensorFileWriter(path, specs, metadata=marked) if jax.process_index() == 0 else None
    with writer or contextlib.nullcontext():
        for name, array in params:
            whole = gathered_on_process_0(array)
            if writer is not None:
                writer.write(name, whole)
            del whole


def load_consolidated(
    path: str,
    model_or_factory: nnx.Module | Callable[[], nnx.Module],
    mesh: Mesh | None = None,
    plan: Plan | None = None,
    *,
    fsdp: bool = False,
) -> nnx.Module:
    """Load parameters saved by :func:`save_consolidated`.

    ``load_consolidated(path, model)`` fills a plain model in place (one device).
    ``load_consolidated(path, factory, mesh, plan)`` builds the sharded model
    (``sharded_init``) and fills each parameter from the file, every device reading only its
    own slice. A missing parameter or a shape mismatch is a ``ValueError`` naming it.
    """
    if mesh is None:
        model = model_or_factory
        if not isinstance(model, nnx.Module):
            raise ValueError(
                "load_consolidated without a mesh takes a built model; pass the model, or "
                "a factory together with mesh and plan"
            )
    else:
        model = sharded_init(model_or_factory, mesh, plan or {}, fsdp=fsdp)
    with safe_open(path, framework="numpy") as f:
        keys = set(f.keys())
        updates = []
        for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            name, current = path_str(p), var.get_value()
            if name not in keys:
                held = sorted(keys)
                shown = ", ".join(held[:20]) + (
                    f", ... ({len(held)} in all)" if len(held) > 20 else ""
                )
                raise ValueError(
                    f"{path} has no parameter {name!r}; it holds: {shown}. It was saved from "
                    "another model (or an older one): load it into the model it came from"
                )
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(current.shape):
                raise ValueError(
                    f"{path}: parameter {name!r} has shape {shape}, the model expects "
                    f"{tuple(current.shape)}"
                )
            if mesh is None:
                value = jax.numpy.asarray(f.get_tensor(name))
            else:
                value = jax.make_array_from_callback(
                    current.shape,
                    current.sharding,
                    lambda idx, n=name: f.get_slice(n)[idx],
                )
            updates.append((p, var.replace(value.astype(current.dtype))))
    nnx.update(model, nnx.from_flat_state(updates))
    return model
