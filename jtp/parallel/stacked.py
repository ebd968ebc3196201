"""Stacked layers: n copies of a block held as one module, each variable with a leading layer
axis, so that a model runs them with one ``jax.lax.scan`` (one compiled body, any depth).

:func:`stack` builds the copies with ``nnx.vmap`` (each layer initialised from its own split
of the RNG streams) and marks the result with its layer count. Plans treat a marked module
as the layers it holds (:mod:`jtp.parallel.plan`):

- a plan key names the stacked ``layers.attention.wq`` as ``"layers.*.attention.wq"`` (the
  ``*`` stands for every layer at once), the key an unrolled ``nnx.List`` of blocks takes;
- a style lays out one layer (it sees the module with the layer axis removed, so the
  ``Linear`` rules hold as they are), and the layer axis stays replicated: every device
  holds its shard of every layer, and each trip of the scan reads one layer's slice;
- under ``fsdp=True`` the unplanned rule splits a stacked parameter as it would one layer's.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jtp.parallel.names import path_str

STACK_ATTR = "stacked_layers"  # the mark on a stacked module: its number of layers


def stack[M: nnx.Module](make: Callable[[nnx.Rngs], M], n: int, rngs: nnx.Rngs) -> M:
    """``make(rngs)`` built ``n`` times as one module whose every variable has a leading axis
    of size ``n``; layer ``i`` is initialised from the ``i``-th split of ``rngs``' keys."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(layer_rngs: nnx.Rngs) -> M:
        return make(layer_rngs)

    module = build(rngs)
    setattr(module, STACK_ATTR, n)
    return module


def n_layers(module: Any) -> int | None:
    """The layer count of a module built by :func:`stack`; ``None`` for any other."""
    return getattr(module, STACK_ATTR, None)


def stack_roots(model: nnx.Module) -> list[str]:
    """Paths of the stacked modules in ``model`` (``["layers"]`` for a scanned Llama)."""
    return [path_str(p) for p, m in nnx.iter_modules(model) if p and n_layers(m) is not None]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def layer_axes(path: str, roots: Iterable[str]) -> int:
    """How many leading layer axes the variables at or under ``path`` carry."""
    return sum(_under(path, r) for r in roots)


def match_name(path: str, roots: Iterable[str]) -> str:
    """The name plan keys match ``path`` by: ``*`` after each stacked module
    (``layers.attention.wq`` -> ``layers.*.attention.wq``)."""
    roots, parts, out = set(roots), path.split("."), []
    for i, part in enumerate(parts):
        out.append(part)
        if ".".join(parts[: i + 1]) in roots:
            out.append("*")
    return ".".join(out)


def one_layer[M: nnx.Module](module: M, axes: int) -> M:
    """``module`` as one layer: every variable a ``jax.ShapeDtypeStruct`` without its
    ``axes`` leading layer axes (what a style lays out)."""
    if not axes:
        return module
    graphdef, state = nnx.split(module)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[axes:], x.dtype), state)
    return nnx.merge(graphdef, shapes)


def with_layer_axes(spec: P, axes: int) -> P:
    """A one-layer ``spec`` for the stacked variable: its layer axes replicated."""
    return P(*(None,) * axes, *spec)


def layer_names(name: str, n: int, have: Container[str]) -> list[str] | None:
    """The unrolled names of the ``n`` layers of the stacked variable ``name``, if all are in
    ``have``: ``params.layers.attention.wq.kernel`` -> ``params.layers.0.attention.wq.kernel``,
    ... (the layer index goes after the first prefix for which all ``n`` exist)."""
    parts = name.split(".")
    for cut in range(1, len(parts)):
        names = [".".join([*parts[:cut], str(i), *parts[cut:]]) for i in range(n)]
        if all(x in have for x in names):
            return names
    return None


def stacked_name(name: str, have: Container[str]) -> tuple[str, int] | None:
    """``(stacked name, layer)`` of the unrolled variable ``name`` in ``have``:
    ``params.layers.3.attention.wq.kernel`` -> (``params.layers.attention.wq.kernel``, 3)."""
    parts = name.split(".")
    for cut, part in enumerate(parts):
        joined = ".".join(parts[:cut] + parts[cut + 1 :])
        if part.isdigit() and joined in have:
            return joined, int(part)
    return None
