"""Named activation constraints: how a big model's activations are laid out, from outside.

Model code marks a few activations by a *logical* name (``shard_activation(x_btd,
"residual")``) and names no mesh axis. A plan's activation rules map those names to
``PartitionSpec``s; they are active only inside ``activation_rules(mesh, rules)`` (the
trainer enters it while tracing its steps). Without rules, or for a name without a rule,
``shard_activation`` returns its input unchanged, so the model runs as plain single-device
code.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping[str, P]] | None] = contextvars.ContextVar(
    "jtp_activation_rules", default=None
)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Mapping[str, P] | None) -> Iterator[None]:
    """Apply ``{logical_name: PartitionSpec}`` to ``shard_activation`` calls traced inside."""
    token = _ACTIVE.set((mesh, dict(rules or {})))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def shard_activation(x: jax.Array, name: str) -> jax.Array:
    """Constrain ``x`` to the active rule for ``name``; a no-op without one."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = rules.get(name)
    if spec is None:
        return x
    if len(spec) != x.ndim:
        raise ValueError(
            f"activation rule {name!r}: spec {spec} has {len(spec)} dims, array has {x.ndim}"
        )
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
