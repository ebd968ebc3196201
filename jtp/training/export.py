"""Consolidated parameters: one safetensors file, loadable on one device or any mesh.

Lightning's ``consolidate_checkpoint`` analogue. The file holds each ``nnx.Param`` whole,
under its dotted path (``layers.0.attention.wq.kernel``), so the plain single-device model
loads it, and so does a sharded one: each device reads only its slice.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from jtp.parallel.names import path_str
from jtp.parallel.parallelize import sharded_init
from jtp.parallel.plan import Plan
from jtp.training.checkpoint import host_copy


def save_consolidated(model: nnx.Module, path: str) -> None:
    """Write the model's parameters, unsharded, to ``path`` (process 0 writes; atomic)."""
    flat = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    arrays = host_copy(flat)  # every process takes part in the gather
    if jax.process_index() != 0:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)
    os.replace(tmp, path)  # readers see the old file or the whole new one


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
                    current.shape, current.sharding,
                    lambda idx, n=name: f.get_slice(n)[idx],
                )  # fmt: skip
            updates.append((p, var.replace(value.astype(current.dtype))))
    nnx.update(model, nnx.from_flat_state(updates))
    return model
