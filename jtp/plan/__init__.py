"""Parallel styles and plans: which parameter dimension goes on which mesh axis.

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
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.mesh import DATA, TENSOR

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class _Rule:
    """Where one parameter of one module type goes: dim on "tensor", dim on "data" under fsdp."""

    tensor_dim: int
    fsdp_dim: int | None


@dataclasses.dataclass(frozen=True)
class ParallelStyle:
    """Base of the styles: maps (module type, parameter name) to a tensor/fsdp layout."""

    def rules(self) -> dict[type, dict[str, _Rule | None]]:
        raise NotImplementedError

    def rule_for(self, module: Any, param: str) -> _Rule | None:
        """The rule for ``param`` of ``module``; ``None`` means the style leaves it unplanned."""
        for module_type, params in self.rules().items():
            if isinstance(module, module_type):
                return params.get(param)
        raise AssertionError("rule_for called on an unsupported module")

    def supports(self, module: Any) -> bool:
        return any(isinstance(module, t) for t in self.rules())

    def supported_types(self) -> str:
        return ", ".join(f"nnx.{t.__name__}" for t in self.rules())


@dataclasses.dataclass(frozen=True)
class ColwiseParallel(ParallelStyle):
    """Split the output features: kernel ``P(None, "tensor")``, bias ``P("tensor")``.

    Each device computes a slice of the output features from the full input, so no
    communication is needed; the output stays sharded on its last dimension, which is what a
    following :class:`RowwiseParallel` layer consumes. On ``nnx.Embed`` it splits the feature
    dimension of the table, as torch does.
    """

    def rules(self) -> dict[type, dict[str, _Rule | None]]:
        return {
            nnx.Linear: {"kernel": _Rule(1, 0), "bias": _Rule(0, None)},
            nnx.Embed: {"embedding": _Rule(1, 0)},
        }


@dataclasses.dataclass(frozen=True)
class RowwiseParallel(ParallelStyle):
    """Split the input features: kernel ``P("tensor", None)``, bias replicated.

    Each device multiplies its slice of the (feature-sharded) input by its rows of the kernel
    and gets a partial sum of the full output; XLA inserts the one all-reduce over
    ``"tensor"``. The bias is replicated so it is added once, after the reduction. On
    ``nnx.Embed`` it splits the vocabulary rows, as torch does.
    """

    def rules(self) -> dict[type, dict[str, _Rule | None]]:
        return {
            nnx.Linear: {"kernel": _Rule(0, 1), "bias": None},
            nnx.Embed: {"embedding": _Rule(0, 1)},
        }


Plan = Mapping[str, ParallelStyle]


class TPPlan(dict):
    """A plan dict that also carries activation rules ``{logical_name: PartitionSpec}``
    for the model's :func:`jtp.activations.shard_activation` marks (sequence and loss
    parallelism). Used wherever a plain plan dict is."""

    def __init__(self, styles: Plan, activations: Mapping[str, P] | None = None):
        super().__init__(styles)
        self.activations = dict(activations or {})


def activation_rules_of(plan: Plan) -> dict[str, P]:
    """The activation rules a plan carries (none for a plain dict)."""
    return dict(getattr(plan, "activations", {}) or {})


@dataclasses.dataclass(frozen=True)
class Placement:
    """How one model variable is laid out on the mesh (one row of ``jtp.explain``)."""

    path: str  # "blocks.0.mlp.up.kernel"
    shape: tuple[int, ...]
    dtype: Any
    key: str | None  # the plan key that matched its module, None if unplanned
    style: ParallelStyle | None
    spec: P


def path_str(path: Path) -> str:
    """``("blocks", 0, "mlp")`` -> ``"blocks.0.mlp"``."""
    return ".".join(str(p) for p in path)


def _module_table(model: nnx.Module) -> dict[str, Any]:
    return {path_str(p): m for p, m in nnx.iter_modules(model) if p}


def match_plan(model: nnx.Module, plan: Plan) -> dict[str, tuple[str, ParallelStyle]]:
    """Resolve plan patterns to modules: ``{module_path: (key, style)}``.

    Raises ``ValueError`` for a key that matches no module, a module matched by two keys, a
    value that is not a style, or a style on a module type it cannot shard.
    """
    if not isinstance(plan, Mapping):
        raise ValueError(f"plan must be a dict {{module_path: style}}, got {type(plan).__name__}")
    modules = _module_table(model)
    matched: dict[str, tuple[str, ParallelStyle]] = {}
    for key, style in plan.items():
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


def bytes_per_device(placements: list[Placement], mesh: Mesh) -> int:
    """Sum of the per-device shard bytes of the given placements."""
    return sum(
        int(np.prod(shard_shape(p, mesh))) * np.dtype(p.dtype).itemsize
        for p in placements
        if not jax.dtypes.issubdtype(p.dtype, jax.dtypes.prng_key)
    )
