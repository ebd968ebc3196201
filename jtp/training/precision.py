"""Precision: the one place that decides which dtypes parameters are stored and computed in.

Lightning's names. ``"32-true"``: float32 everywhere. ``"bf16-mixed"``: float32 parameters
and optimizer state; each step computes with bf16 copies of the parameters (the cast's
transpose brings the gradients back to float32 for the optimizer) and takes the loss in
float32. ``"bf16-true"``: parameters and optimizer state are stored in bf16 and the step
computes with them as they are.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jtp.parallel.abstract import is_abstract


@dataclasses.dataclass(frozen=True)
class Precision:
    """What one precision name means."""

    name: str
    param_dtype: Any  # what parameters (and so the optimizer state) are stored in
    compute_dtype: Any  # what the step casts the parameters to before the forward


POLICIES = {
    "32-true": Precision("32-true", jnp.float32, jnp.float32),
    "bf16-mixed": Precision("bf16-mixed", jnp.float32, jnp.bfloat16),
    "bf16-true": Precision("bf16-true", jnp.bfloat16, jnp.bfloat16),
}
PRECISIONS = tuple(POLICIES)


def policy(name: str) -> Precision:
    """The :class:`Precision` called ``name``; an unknown name lists the choices."""
    if name not in POLICIES:
        raise ValueError(f"precision={name!r} must be one of {PRECISIONS}")
    return POLICIES[name]


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Cast the floating leaves of ``tree`` to ``dtype`` (integers, keys untouched)."""

    def cast(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def compute_params(params: Any, precision: str) -> Any:
    """The parameters a step computes with (traced inside the step): bf16 copies under
    "bf16-mixed", the stored ones otherwise (already in their compute dtype)."""
    p = policy(precision)
    return cast_floats(params, p.compute_dtype) if p.compute_dtype != p.param_dtype else params


def stored_params(params: Any, precision: str) -> Any:
    """``params`` (arrays on the mesh, or abstract ones) in the dtype the precision stores
    them in, keeping each leaf's sharding. Under "bf16-true" the float32 values are not
    kept: the cast runs in one jitted call whose inputs the caller then drops."""
    dtype = policy(precision).param_dtype
    if dtype == jnp.float32:
        return params
    out = jax.tree.map(lambda a: a.sharding, params)
    cast = jax.jit(partial(cast_floats, dtype=dtype), out_shardings=out)
    return jax.eval_shape(cast, params) if is_abstract(params) else cast(params)
