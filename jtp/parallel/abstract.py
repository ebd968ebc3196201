"""Shapes-only twins of sharded things: ``jax.ShapeDtypeStruct``s that carry a sharding.

The one place that builds an abstract array with a sharding; :func:`abstract_sharded` is
the shapes-only twin of :func:`jtp.sharded_init`, used to compile or size a step for
devices that need not exist, allocating nothing.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, Sharding

from jtp.parallel.plan import Plan, plan_shardings


def abstract_array(x: Any, sharding: Sharding | None = None) -> jax.ShapeDtypeStruct:
    """``x``'s shape and dtype with ``sharding`` (default: ``x``'s own, if it has one)."""
    sharding = sharding if sharding is not None else getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_tree(tree: Any, shardings: Any = None) -> Any:
    """:func:`abstract_array` over a pytree, with a matching tree of shardings or none."""
    if shardings is None:
        return jax.tree.map(abstract_array, tree)
    return jax.tree.map(abstract_array, tree, shardings)


def is_abstract(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def abstract_sharded[M: nnx.Module](
    abstract: M, mesh: Mesh, plan: Plan, *, fsdp: bool = False
) -> M:
    """``abstract`` (from ``nnx.eval_shape``) with every variable a ``jax.ShapeDtypeStruct``
    carrying its plan sharding: the shapes-only twin of :func:`jtp.sharded_init`."""
    shardings = plan_shardings(abstract, mesh, plan, fsdp=fsdp)
    return nnx.merge(nnx.graphdef(abstract), abstract_tree(nnx.state(abstract), shardings))
