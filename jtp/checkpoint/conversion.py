"""What each entry of a restore target is read from, across the two layouts of a model's layers.

A model's blocks are held unrolled (``params.layers.0.attention.wq.kernel``, ...: one entry
per layer) or stacked for a scan (``params.layers.attention.wq.kernel`` with a leading layer
axis: :mod:`jtp.parallel.stacked`). A checkpoint written under one layout restores into the
other: a stacked entry is read as its layers' unrolled entries, each onto its layer's
sharding, then stacked on the devices; an unrolled entry is read as its slice of the stacked
entry. Entries found under their own name are read as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.parallel.abstract import abstract_array
from jtp.parallel.stacked import layer_names, stacked_name


@dataclasses.dataclass(frozen=True)
class Read:
    """Where one target entry comes from: ``sources[0]`` as it is; or its layers
    ``sources`` stacked (unrolled -> scanned); or slice ``layer`` of ``sources[0]``
    (scanned -> unrolled)."""

    sources: tuple[str, ...]
    layer: int | None = None

    @property
    def stacks(self) -> bool:
        return len(self.sources) > 1


def plan_read(name: str, shape: tuple[int, ...], saved: Mapping[str, Any]) -> Read:
    """How to read the entry ``name`` of ``shape`` from a checkpoint holding ``saved``
    (``{name: metadata}``); an entry in neither layout reads ``name`` (and is then missing)."""
    if name in saved:
        return Read((name,))
    per_layer = layer_names(name, shape[0], saved) if shape else None
    if per_layer:
        return Read(tuple(per_layer))
    found = stacked_name(name, saved)
    return Read((found[0],), layer=found[1]) if found else Read((name,))


def _layer_sharding(sharding: Any, add: bool) -> Any:
    """``sharding`` with a replicated leading layer axis added, or its first axis dropped."""
    if not isinstance(sharding, NamedSharding):
        return sharding  # one device: the same device
    spec = P(None, *sharding.spec) if add else P(*sharding.spec[1:])
    return NamedSharding(sharding.mesh, spec)


def source_targets(
    reads: Mapping[str, Read], target: Mapping[str, Any], saved: Mapping[str, Any]
) -> dict[str, Any]:
    """The abstract arrays to restore the checkpoint's entries onto, ``{saved name: ...}``
    (``saved``: the checkpoint's metadata, for the shape of a stack read one layer from)."""
    out = {}
    for name, read in reads.items():
        want = target[name]
        if read.stacks:  # one layer each, laid out as a layer of the target
            sharding = _layer_sharding(want.sharding, add=False)
            for source in read.sources:
                out[source] = abstract_array(_shaped(want.shape[1:], want.dtype), sharding)
        elif read.layer is not None:  # the whole stack, of which this entry is one layer
            sharding = _layer_sharding(want.sharding, add=True)
            shape = tuple(saved[read.sources[0]].shape)
            out[read.sources[0]] = abstract_array(_shaped(shape, want.dtype), sharding)
        else:
            out[read.sources[0]] = want
    return out


def _shaped(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _stack(*layers: jax.Array) -> jax.Array:
    return jnp.stack(layers)


def _take(stacked: jax.Array, layer: jax.Array) -> jax.Array:
    return stacked[layer]


def assemble(reads: Mapping[str, Read], restored: dict[str, Any], target: Mapping[str, Any]):
    """``{target name: array}`` from the ``restored`` checkpoint entries. Stacked sources
    are dropped as they are used (the devices hold one parameter twice at most)."""
    out = {}
    for name, read in reads.items():
        sharding = target[name].sharding
        if read.stacks:
            layers = [restored.pop(s) for s in read.sources]
            out[name] = jax.jit(_stack, out_shardings=sharding)(*layers)
        elif read.layer is not None:
            out[name] = jax.jit(_take, out_shardings=sharding)(
                restored[read.sources[0]], np.int32(read.layer)
            )
        else:
            out[name] = restored[read.sources[0]]
    return out
