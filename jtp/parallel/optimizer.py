"""Optimizer state laid out like the parameters it belongs to.

Adam's moments are parameter-shaped: each is sharded exactly like its parameter, so
tensor parallelism (and fsdp) divide the optimizer state as they divide the weights. Scalars
(step counts) are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.parallel.abstract import abstract_tree


def _replicated_on(tree: Any) -> NamedSharding:
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, P())
    raise ValueError("params hold no NamedSharding arrays; shard the model first")


def opt_state_shardings(tx: optax.GradientTransformation, params: Any) -> Any:
    """Shardings for ``tx.init(params)``: every parameter-shaped slot (Adam's moments, ...)
    sharded like its parameter, everything else (step counts) replicated."""
    abstract = jax.eval_shape(tx.init, params)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    replicated = _replicated_on(params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )


def init_opt_state(tx: optax.GradientTransformation, params: Any) -> Any:
    """``tx.init(params)`` created inside jit directly in the parameters' shardings."""
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params))(params)


def abstract_opt_state(tx: optax.GradientTransformation, params: Any) -> Any:
    """``tx.init(params)`` as sharded ``jax.ShapeDtypeStruct``s: nothing allocated (``params``
    may itself be abstract)."""
    return abstract_tree(jax.eval_shape(tx.init, params), opt_state_shardings(tx, params))
