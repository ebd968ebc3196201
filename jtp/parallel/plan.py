"""Plans: which module gets which parallel style, resolved to one PartitionSpec per variable.

A plan is a plain dict ``{module_path_pattern: style}`` kept outside the model, as torch's
``parallelize_module`` takes it. Paths are the model's attribute paths joined by ``.`` (list
items by their index: ``"blocks.0.mlp.up_proj"``); patterns match with :func:`fnmatch.fnmatchcase`,
so ``*`` may cross dots (``"blocks.*.up_proj"`` matches every block's ``up_proj``). Layers
stacked for a scan (:mod:`jtp.parallel.stacked`) match the same keys: each style lays out one
layer, and the leading layer axis stays replicated.

Resolution is pure shape work on an (abstract) model: it never compiles or allocates, so every
mistake in a plan is a ``ValueError`` before any compile, naming the key, the parameter, the
shape and the mesh axis.

Each style turns its module into one rule per parameter: the column and row layouts of every
Flax layer are tabled in :mod:`jtp.parallel.layer_rules` (and ``docs/layers.md``);
:class:`~jtp.parallel.styles.ParamSharding` spells them out for any other module. A parameter
belongs to the nearest matched module above it whose layout names it (so a ``LoRALinear``'s
``lora.lora_a`` follows the ``LoRALinear``'s key); every other variable is unplanned.

The *unplanned rule* under ``fsdp=True``: an ``nnx.Param`` no style shards is split on
``"data"`` along its largest dimension divisible by the data size (the first such on ties),
and stays replicated if none is. Non-parameter state (RNG keys, counters) is replicated.

On a mesh with an expert axis, fsdp's "data" is every data-like axis the spec leaves free:
``("data", "expert")`` (or "data" alone for a parameter already split on "expert", e.g. a
MoE layer's stacked experts), so a parameter is split over all the devices holding different
rows of the batch, as without the axis.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.errors import InputError
from jtp.mesh import DATA, TENSOR, batch_axis_names
from jtp.parallel.layer_rules import LARGEST, Layout, Rule, check_heads
from jtp.parallel.names import path_str
from jtp.parallel.stacked import layer_axes, match_name, one_layer, stack_roots, with_layer_axes
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
        raise InputError(f"plan must be a dict {{module_path: style}}, got {type(plan).__name__}")
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
    modules, roots = _module_table(model), stack_roots(model)
    names = {p: match_name(p, roots) for p in modules}  # stacked layers: "layers.*.wq"
    matched: dict[str, tuple[str, ParallelStyle]] = {}
    for key, style in styles.items():
        if not isinstance(style, ParallelStyle):
            raise InputError(
                f"plan[{key!r}] = {style!r} is not a parallel style; use "
                "jtp.ColwiseParallel(), jtp.RowwiseParallel() or jtp.ParamSharding({...})"
            )
        hits = [
            p for p in modules if fnmatch.fnmatchcase(names[p], key) or fnmatch.fnmatchcase(p, key)
        ]
        if not hits:
            sample = ", ".join(list(names.values())[:12]) or "(none)"
            raise InputError(
                f"plan key {key!r} matches no module of {type(model).__name__}; "
                f"module paths are: {sample}"
            )
        for p in hits:
            if p in matched:
                raise InputError(
                    f"module {p!r} is matched by two plan keys, {matched[p][0]!r} and {key!r}; "
                    "make the patterns disjoint"
                )
            module = modules[p]
            if not style.supports(module):
                raise InputError(
                    f"plan[{key!r}]: {type(style).__name__} cannot shard module {p!r} of type "
                    f"{type(module).__module__}.{type(module).__name__}; it supports "
                    f"{style.supported_types()}; lay out any other module with "
                    "jtp.ParamSharding({parameter: PartitionSpec})"
                )
            matched[p] = (key, style)
    return matched


def _layouts(model: nnx.Module, matched: dict[str, tuple[str, ParallelStyle]]) -> dict[str, Layout]:
    """``{module_path: layout}`` of every matched module; a style's complaint gets the key."""
    modules, roots, out = _module_table(model), stack_roots(model), {}
    for path, (key, style) in matched.items():
        module = modules[path]
        try:  # a stack of layers is laid out as one layer (its layer axes replicated)
            out[path] = style.layout(one_layer(module, layer_axes(path, roots)))
        except ValueError as e:
            raise InputError(
                f"plan[{key!r}]: {type(style).__name__} on module {path!r} of type "
                f"{type(module).__module__}.{type(module).__name__}: {e}"
            ) from None
    return out


def _check_divisible(key: str, name: str, shape: tuple[int, ...], dim: int, axis: Any, n: int):
    if shape[dim] % n:
        raise InputError(
            f"{key}: parameter {name!r} of shape {shape} has dimension {dim} of size "
            f"{shape[dim]}, not divisible by mesh axis {axis!r} of size {n}"
        )


def _largest_divisible_dim(
    shape: tuple[int, ...], n: int, dims: Iterable[int] | None = None
) -> int | None:
    dims = [d for d in (range(len(shape)) if dims is None else dims) if shape[d] % n == 0]
    dims = [d for d in dims if shape[d] >= n]
    return max(dims, key=lambda d: (shape[d], -d)) if dims else None


def _place(label: str, name: str, shape: tuple[int, ...], rule: Rule, mesh: Mesh, fsdp: bool) -> P:
    """The spec ``rule`` gives parameter ``name`` on ``mesh``, every entry checked."""
    spec = rule.spec
    if len(spec) != len(shape):
        raise InputError(
            f"{label}: spec {spec} for parameter {name!r} of shape {shape} has {len(spec)} "
            f"entries, but the parameter has {len(shape)} dimensions; give one per dimension"
        )
    used: list[str] = []
    for dim, entry in enumerate(spec):
        axes = () if entry is None else tuple(entry) if isinstance(entry, tuple) else (entry,)
        for axis in axes:
            if axis not in mesh.shape or axis in used:
                why = "used twice" if axis in used else f"not a mesh axis of {tuple(mesh.shape)}"
                raise InputError(
                    f"{label}: spec {spec} for parameter {name!r} of shape {shape} puts "
                    f"dimension {dim} on mesh axis {axis!r}, {why}"
                )
            used.append(axis)
        n = math.prod(int(mesh.shape[a]) for a in axes)
        _check_divisible(label, name, shape, dim, axes[0] if len(axes) == 1 else axes, n)
        check_heads(label, name, shape, dim, rule.blocks if TENSOR in axes else None, n)
    fsdp_axes = _fsdp_axes(mesh, used)
    if not fsdp or not fsdp_axes or rule.fsdp_dim is None:
        return spec
    n_data = math.prod(int(mesh.shape[a]) for a in fsdp_axes)
    entry = fsdp_axes[0] if len(fsdp_axes) == 1 else fsdp_axes
    dim = rule.fsdp_dim
    if dim == LARGEST:
        dim = _largest_divisible_dim(shape, n_data, [d for d in range(len(shape)) if not spec[d]])
        if dim is None:
            return spec
    else:
        _check_divisible(label + " with fsdp=True", name, shape, dim, entry, n_data)
    return P(*(entry if d == dim else e for d, e in enumerate(spec)))


def _fsdp_axes(mesh: Mesh, used: Iterable[str] = ()) -> tuple[str, ...]:
    """The data-like axes fsdp splits a parameter over: those of the batch not in ``used``
    (``()`` when "data" is used: a spec naming "data" is laid out by hand)."""
    used = set(used)
    return () if DATA in used else tuple(a for a in batch_axis_names(mesh) if a not in used)


def _owner(
    path: tuple[Any, ...], matched: Mapping[str, Any], layouts: Mapping[str, Layout]
) -> tuple[str, str] | None:
    """(module path, relative name) of the nearest matched module above variable ``path``
    whose layout names it; ``None`` if no such module (the variable is unplanned)."""
    for k in range(len(path) - 1, 0, -1):
        module_path = path_str(path[:k])
        if module_path in matched:
            rel = path_str(path[k:])
            return (module_path, rel) if rel in layouts[module_path] else None
    return None


def resolve(model: nnx.Module, mesh: Mesh, plan: Plan, *, fsdp: bool = False) -> list[Placement]:
    """The placement of every variable of ``model`` (concrete or from ``nnx.eval_shape``)."""
    for axis in (DATA, TENSOR):
        if axis not in mesh.shape:
            raise InputError(f"mesh axes are {tuple(mesh.shape)}; jtp needs {(DATA, TENSOR)}")
    matched = match_plan(model, plan)
    layouts, roots = _layouts(model, matched), stack_roots(model)
    placements = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = path_str(path)
        shape = tuple(var.get_value().shape)
        axes = layer_axes(name, roots)  # stacked layers: rules apply to one layer's shape
        owner = _owner(path, matched, layouts)
        key, style = matched[owner[0]] if owner else (None, None)
        rule = layouts[owner[0]][owner[1]] if owner else None
        if rule is not None:
            spec = _place(f"plan[{key!r}]", name, shape[axes:], rule, mesh, fsdp)
        elif fsdp and isinstance(var, nnx.Param):
            fsdp_axes = _fsdp_axes(mesh)
            entry = fsdp_axes[0] if len(fsdp_axes) == 1 else fsdp_axes
            n_data = math.prod(int(mesh.shape[a]) for a in fsdp_axes)
            dim = _largest_divisible_dim(shape[axes:], n_data)
            spec = P(*(entry if d == dim else None for d in range(len(shape) - axes)))
        else:
            spec = P(*(None,) * (len(shape) - axes))
        spec = with_layer_axes(spec, axes)
        placements.append(Placement(name, shape, var.get_value().dtype, key, style, spec))
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
