"""Plans: which module gets which parallel style, resolved to one PartitionSpec per variable.

A plan is a plain dict ``{module_path_pattern: style}`` kept outside the model, as torch's
``parallelize_module`` takes it. Paths are the model's attribute paths joined by ``.`` (list
items by their index: ``"blocks.0.mlp.up_proj"``); patterns match with :func:`fnmatch.fnmatchcase`,
so ``*`` may cross dots (``"blocks.*.up_proj"`` matches every block's ``up_proj``).

Resolution is pure shape work on an (abstract) model: it never compiles or allocates, so every
mistake in a plan is a ``ValueError`` before any compile, naming the key, the parameter, the
shape and the mesh axis.

The layout rules (Flax kernels are ``(in_features, out_features)``):

============  =====================  ==========================  ==========================
style         module                 tensor-parallel             + ``fsdp=True``
============  =====================  ==========================  ==========================
Colwise       ``nnx.Linear`` kernel  ``P(None, "tensor")``       ``P("data", "tensor")``
Colwise       ``nnx.Linear`` bias    ``P("tensor")``             ``P("tensor")``
Rowwise       ``nnx.Linear`` kernel  ``P("tensor", None)``       ``P("tensor", "data")``
Rowwise       ``nnx.Linear`` bias    replicated                  unplanned rule
Colwise       ``nnx.Embed`` table    ``P(None, "tensor")``       ``P("data", "tensor")``
Rowwise       ``nnx.Embed`` table    ``P("tensor", None)``       ``P("tensor", "data")``
(no key)      any parameter          replicated                  unplanned rule
============  =====================  ==========================  ==========================

The *unplanned rule* under ``fsdp=True``: an ``nnx.Param`` no style shards is split on
``"data"`` along its largest dimension divisible by the data size (the first such on ties),
and stays replicated if none is. Non-parameter state (RNG keys, counters) is replicated.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.mesh import DATA, TENSOR
from jtp.parallel.names import path_str
from jtp.parallel.styles import ParallelStyle

StyleMap = Mapping[str, ParallelStyle]


@dataclasses.dataclass(frozen=True, eq=False)
class TPPlan:
    """A plan's styles ``{module_path_pattern: style}`` plus activation rules
    ``{logical_name: PartitionSpec}`` for the model's :func:`jtp.shard_activation` marks
    (sequence and loss parallelism). Accepted wherever a plain plan dict is.

    Deliberately *not* a dict: ``{**plan, key: style}`` or ``dict(plan)`` would keep the
    styles and silently drop the activation rules (switching sequence or loss parallelism
    off), so they raise ``TypeError`` instead. Merge with ``plan | {key: style}`` (or
    ``{key: style} | plan``), which keeps the rules; ``plan | other_tpplan`` merges both.
    """

    styles: Mapping[str, ParallelStyle]
    activations: Mapping[str, P] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "styles", MappingProxyType(dict(self.styles)))
        object.__setattr__(self, "activations", MappingProxyType(dict(self.activations)))

    def __or__(self, other: StyleMap | TPPlan) -> TPPlan:
        if isinstance(other, TPPlan):
            return TPPlan(
                {**self.styles, **other.styles}, {**self.activations, **other.activations}
            )
        if isinstance(other, Mapping):
            return TPPlan({**self.styles, **other}, self.activations)
        return NotImplemented

    def __ror__(self, other: StyleMap) -> TPPlan:
        if isinstance(other, Mapping):
            return TPPlan({**other, **self.styles}, self.activations)
        return NotImplemented

    def __getitem__(self, key: str) -> ParallelStyle:
        return self.styles[key]

    def __iter__(self):  # noqa: ANN204 - refuses, see the class docstring
        raise TypeError(
            "a TPPlan is not a dict: {**plan} or dict(plan) would drop its activation rules; "
            "merge with plan | {key: style}, or iterate plan.styles"
        )

    def __contains__(self, key: object) -> bool:
        return key in self.styles

    def __len__(self) -> int:
        return len(self.styles)

    def items(self):  # noqa: ANN201 - a view, like dict.items()
        return self.styles.items()


Plan = StyleMap | TPPlan  # what every function taking a plan accepts


def plan_styles(plan: Plan) -> StyleMap:
    """The ``{pattern: style}`` part of a plan (a plain dict or a :class:`TPPlan`)."""
    if isinstance(plan, TPPlan):
        return plan.styles
    if not isinstance(plan, Mapping):
        raise ValueError(f"plan must be a dict {{module_path: style}}, got {type(plan).__name__}")
    return plan


def activation_rules_of(plan: Plan) -> dict[str, P]:
    """The activation rules a plan carries (none for a plain dict)."""
    return dict(plan.activations) if isinstance(plan, TPPlan) else {}


@dataclasses.dataclass(frozen=True)
class Placement:
    """How one model variable is laid out on the mesh (one row of ``jtp.explain``)."""

    path: str  # "blocks.0.mlp.up.kernel"
    shape: tuple[int, ...]
    dtype: Any
    key: str | None  # the plan key that matched its module, None if unplanned
    style: ParallelStyle | None
    spec: P


def _module_table(model: nnx.Module) -> dict[str, Any]:
    return {path_str(p): m for p, m in nnx.iter_modules(model) if p}


def match_plan(model: nnx.Module, plan: Plan) -> dict[str, tuple[str, ParallelStyle]]:
    """Resolve plan patterns to modules: ``{module_path: (key, style)}``.

    Raises ``ValueError`` for a key that matches no module, a module matched by two keys, a
    value that is not a style, or a style on a module type it cannot shard.
    """
    styles = plan_styles(plan)
    modules = _module_table(model)
    matched: dict[str, tuple[str, ParallelStyle]] = {}
    for key, style in styles.items():
        if not isinstance(style, ParallelStyle):
            raise ValueError(
                f"plan[{key!r}] = {style!r} is not a parallel style; use jtp.ColwiseParallel() "
                "or jtp.RowwiseParallel()"
            )
        hits = [p for p in modules if fnmatch.fnmatchcase(p, key)]
        if not hits:
            sample = ", ".join(list(modules)[:12]) or "(none)"
            raise ValueError(
                f"plan key {key!r} matches no module of {type(model).__name__}; "
                f"module paths are: {sample}"
            )
        for p in hits:
            if p in matched:
                raise ValueError(
                    f"module {p!r} is matched by two plan keys, {matched[p][0]!r} and {key!r}; "
                    "make the patterns disjoint"
                )
            module = modules[p]
            if not style.supports(module):
                raise ValueError(
                    f"plan[{key!r}]: {type(style).__name__} cannot shard module {p!r} of type "
                    f"{type(module).__module__}.{type(module).__name__}; it supports "
                    f"{style.supported_types()}"
                )
            matched[p] = (key, style)
    return matched


def _check_divisible(key: str, name: str, shape: tuple[int, ...], dim: int, axis: str, n: int):
    if shape[dim] % n:
        raise ValueError(
            f"{key}: parameter {name!r} of shape {shape} has dimension {dim} of size "
            f"{shape[dim]}, not divisible by mesh axis {axis!r} of size {n}"
        )


def _largest_divisible_dim(shape: tuple[int, ...], n: int) -> int | None:
    dims = [d for d in range(len(shape)) if shape[d] % n == 0 and shape[d] >= n]
    return max(dims, key=lambda d: (shape[d], -d)) if dims else None


def _spec(ndim: int, axes: dict[int, str]) -> P:
    return P(*(axes.get(d) for d in range(ndim)))


def resolve(model: nnx.Module, mesh: Mesh, plan: Plan, *, fsdp: bool = False) -> list[Placement]:
    """The placement of every variable of ``model`` (concrete or from ``nnx.eval_shape``)."""
    for axis in (DATA, TENSOR):
        if axis not in mesh.shape:
            raise ValueError(f"mesh axes are {tuple(mesh.shape)}; jtp needs {(DATA, TENSOR)}")
    n_tensor, n_data = int(mesh.shape[TENSOR]), int(mesh.shape[DATA])
    matched = match_plan(model, plan)
    modules = _module_table(model)
    placements = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = path_str(path)
        shape = tuple(var.get_value().shape)
        module_path, param = path_str(path[:-1]), path[-1]
        key, style = matched.get(module_path, (None, None))
        rule = style.rule_for(modules[module_path], param) if style else None
        axes: dict[int, str] = {}
        if rule is not None:
            label = f"plan[{key!r}]"
            _check_divisible(label, name, shape, rule.tensor_dim, TENSOR, n_tensor)
            axes[rule.tensor_dim] = TENSOR
            if fsdp and rule.fsdp_dim is not None:
                _check_divisible(
                    label + " with fsdp=True", name, shape, rule.fsdp_dim, DATA, n_data
                )
                axes[rule.fsdp_dim] = DATA
        elif fsdp and isinstance(var, nnx.Param):
            dim = _largest_divisible_dim(shape, n_data)
            if dim is not None:
                axes[dim] = DATA
        placements.append(
            Placement(name, shape, var.get_value().dtype, key, style, _spec(len(shape), axes))
        )
    return placements


def plan_shardings(model: nnx.Module, mesh: Mesh, plan: Plan, *, fsdp: bool = False) -> nnx.State:
    """A ``nnx.State`` shaped like ``nnx.state(model)`` holding one ``NamedSharding`` per leaf.

    Usable directly as ``out_shardings`` of a jitted function returning ``nnx.state(model)``,
    or with ``jax.device_put``.
    """
    by_path = {p.path: NamedSharding(mesh, p.spec) for p in resolve(model, mesh, plan, fsdp=fsdp)}
    flat = [
        (path, var.replace(by_path[path_str(path)]))
        for path, var in nnx.to_flat_state(nnx.state(model))
    ]
    return nnx.from_flat_state(flat)


def shard_shape(placement: Placement, mesh: Mesh) -> tuple[int, ...]:
    """Per-device shape of a placed variable."""
    return NamedSharding(mesh, placement.spec).shard_shape(placement.shape)
