"""Named activation constraints: how a big model's activations are laid out, from outside.

Model code marks a few activations by a *logical* name (``shard_activation(x_btd,
"residual")``) and names no mesh axis. A plan's activation rules map those names to
``PartitionSpec``s; they are active only inside ``activation_rules(mesh, rules)`` (the
trainer enters it while tracing its steps). Without rules, or for a name without a rule,
``shard_activation`` returns its input unchanged, so the model runs as plain single-device
code.

``DATA`` in a rule means the batch axes: on a mesh with an expert axis, a rule's ``"data"``
entry is applied as ``("data", "expert")`` (outside the MoE layers "expert" splits the batch
as "data" does), so one plan serves meshes with and without it.

On a mesh with a context axis (context parallelism, :mod:`jtp.parallel.context`) every mark's
second dimension is the sequence, and it is split over "context" as well: the rule's entry
there gains "context" in front (``P("data", "tensor", None)`` for sequence parallelism's
residual becomes ``P("data", ("context", "tensor"), None)``), so a plan written for a mesh
without the axis lays the pieces out unchanged on one with it.

A rule that no mark used while tracing is an error: a typo in a rule name (``"logit"`` for
``"logits"``) must not silently switch sequence or loss parallelism off.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.mesh import CONTEXT, DATA, batch_axis_names


@dataclasses.dataclass
class _Active:
    mesh: Mesh
    rules: Mapping[str, P]
    used: set[str] = dataclasses.field(default_factory=set)
    data_mapped: bool = False  # inside a per-data-rank vmap: "data" is the mapped axis


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar(
    "jtp_activation_rules", default=None
)


@contextlib.contextmanager
def activation_rules(
    mesh: Mesh, rules: Mapping[str, P] | None, *, check_unused: bool = True
) -> Iterator[None]:
    """Apply ``{logical_name: PartitionSpec}`` to ``shard_activation`` calls traced inside.

    With ``check_unused`` (default), leaving the block after tracing at least one mark
    raises ``ValueError`` naming every rule that no mark used. (A block that traced
    nothing, e.g. a cached jit call, is not checked.)
    """
    active = _Active(mesh, dict(rules or {}))
    token = _ACTIVE.set(active)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
    unused = sorted(set(active.rules) - active.used)
    if check_unused and active.used and unused:
        raise ValueError(
            f"activation rules {unused} matched no shard_activation mark while tracing (marks "
            f"used: {sorted(active.used)}); fix the rule names or drop them — a misspelt rule "
            "would silently turn sequence or loss parallelism off"
        )


@contextlib.contextmanager
def per_data_rank() -> Iterator[None]:
    """Inside: code runs once per data-parallel rank under ``jax.vmap(...,
    spmd_axis_name="data")``, which puts "data" on the mapped axis; rules drop "data" (on a
    mesh with an expert axis a rank's rows stay split over "expert": :func:`batch_spec`)."""
    active = _ACTIVE.get()
    if active is None:
        yield
        return
    previous, active.data_mapped = active.data_mapped, True
    try:
        yield
    finally:
        active.data_mapped = previous


def batch_spec(spec: P, mesh: Mesh, *, data_mapped: bool = False) -> P:
    """``spec`` with each ``"data"`` (alone or in a tuple entry) standing for the batch
    axes of ``mesh`` (unchanged on a mesh without an expert axis); ``data_mapped``: inside
    the per-data-rank vmap, where "data" is the mapped axis and a rank's rows are split
    over the rest ("expert", or nothing)."""
    axes = batch_axis_names(mesh)
    if data_mapped:
        axes = tuple(a for a in axes if a != DATA)
    elif axes == (DATA,):
        return spec

    def entry(e):
        names = e if isinstance(e, tuple) else (e,)
        if DATA not in names:
            return e
        out = tuple(a for x in names for a in (axes if x == DATA else (x,)))
        return None if not out else out[0] if len(out) == 1 else out

    return P(*(entry(e) for e in spec))


def sequence_spec(spec: P, mesh: Mesh) -> P:
    """``spec`` of a (B, T, ...) activation with T also split over "context" on a mesh with
    that axis (first, before any axis the rule names there); ``spec`` otherwise."""
    if CONTEXT not in mesh.shape or len(spec) < 2:
        return spec
    entry = spec[1]
    names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    return P(spec[0], (CONTEXT, *names) if names else CONTEXT, *spec[2:])


def active_layout() -> tuple[Mesh, Mapping[str, P], bool] | None:
    """``(mesh, rules, data_mapped)`` inside ``activation_rules``, None outside; marks no
    rule used (for placements that read the layout of several marks)."""
    active = _ACTIVE.get()
    return None if active is None else (active.mesh, active.rules, active.data_mapped)


def active_rule(name: str) -> tuple[Mesh, P, bool] | None:
    """The active rule for ``name`` as ``(mesh, spec, data_mapped)``, marking it used; None
    outside ``activation_rules`` or without that rule. For marks that do more than
    constrain a layout (:func:`jtp.parallel.experts.place_experts`)."""
    active = _ACTIVE.get()
    if active is None:
        return None
    active.used.add(name)
    spec = active.rules.get(name)
    return None if spec is None else (active.mesh, spec, active.data_mapped)


def shard_activation(x: jax.Array, name: str) -> jax.Array:
    """Constrain ``x`` to the active rule for ``name``; a no-op without one."""
    active = _ACTIVE.get()
    if active is None:
        return x
    active.used.add(name)
    spec = active.rules.get(name)
    if spec is None:
        return x
    if len(spec) != x.ndim:
        raise ValueError(
            f"activation rule {name!r}: spec {spec} has {len(spec)} dims but the marked array "
            f"has {x.ndim} (shape {x.shape}); give the rule one entry per dimension"
        )
    spec = sequence_spec(batch_spec(spec, active.mesh, data_mapped=active.data_mapped), active.mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(active.mesh, spec))
