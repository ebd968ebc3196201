"""Parallel styles: which dimension of a layer's parameters goes on which mesh axis.

A style is a small frozen dataclass that turns a module instance into a *layout*: one
:class:`~jtp.parallel.layer_rules.Rule` (a PartitionSpec plus the dimension that also goes on
``"data"`` under ``fsdp=True``) per parameter. :class:`ColwiseParallel` and
:class:`RowwiseParallel` read the layout off the layer (:mod:`jtp.parallel.layer_rules` holds
one function per Flax layer); :class:`ParamSharding` is the escape hatch that spells it out.
Plans (:mod:`jtp.parallel.plan`) attach styles to module paths; nothing here knows a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from flax import nnx
from jax.sharding import PartitionSpec as P

from jtp.errors import InputError
from jtp.mesh import TENSOR
from jtp.parallel.layer_rules import LARGEST, LAYOUTS, Layout, Rule, layout_fn
from jtp.parallel.names import path_str


@dataclasses.dataclass(frozen=True)
class ParallelStyle:
    """Base of the styles: maps a module to ``{parameter path: Rule | None}``."""

    def layout(self, module: Any) -> Layout:
        """The rule of every parameter this style places, by path relative to ``module``
        (``None``: replicated on purpose). Raises ``ValueError`` saying what to choose when the
        module admits no unambiguous layout (the plan adds the key and module path)."""
        raise NotImplementedError

    def supports(self, module: Any) -> bool:
        """Whether ``module``'s type can take this style (checked before any shape work)."""
        raise NotImplementedError

    def supported_types(self) -> str:
        """The supported module types, for error messages."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _LayerStyle(ParallelStyle):
    """A style defined per Flax layer type by :data:`~jtp.parallel.layer_rules.LAYOUTS`."""

    column: ClassVar[bool]
    # The split features are this many whole heads (q/k/v of attention, the output
    # projection's input): the plan then refuses a tensor size that does not divide it.
    heads: int | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.heads is not None and (
            isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 1
        ):
            raise InputError(
                f"{type(self).__name__}(heads={self.heads!r}): heads must be a positive int "
                "(the number of whole heads the split features hold) or None"
            )

    def layout(self, module: Any) -> Layout:
        fn = layout_fn(module)
        if fn is None:
            raise AssertionError("layout called on an unsupported module")
        layout = fn(module, self.column)
        if self.heads is None:
            return layout
        return {
            name: rule
            if rule is None or TENSOR not in tuple(rule.spec)
            else dataclasses.replace(rule, blocks=self.heads)
            for name, rule in layout.items()
        }

    def supports(self, module: Any) -> bool:
        return layout_fn(module) is not None

    def supported_types(self) -> str:
        return ", ".join(f"nnx.{t.__name__}" for t in LAYOUTS)


@dataclasses.dataclass(frozen=True)
class ColwiseParallel(_LayerStyle):
    """Split the output features: on ``nnx.Linear`` kernel ``P(None, "tensor")``, bias
    ``P("tensor")``.

    Each device computes a slice of the output features from the full input, so no
    communication is needed; the output stays split, which is what a following
    :class:`RowwiseParallel` layer consumes. The same on ``nnx.LinearGeneral`` (first output
    axis: the heads of an attention projection), ``nnx.Einsum`` (first kernel dim reaching the
    output), ``nnx.Conv`` (output channels), ``nnx.LoRA``/``nnx.LoRALinear`` (``lora_b`` split,
    ``lora_a`` replicated, so the low-rank path adds no collective) and ``nnx.Embed`` (the
    feature dimension, as torch). Table: :mod:`jtp.parallel.layer_rules`.

    ``heads=H``: the output features are H whole heads (attention's q, k, v), so a tensor
    size that does not divide H is refused (``ColwiseParallel(heads=8)``).
    """

    column: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class RowwiseParallel(_LayerStyle):
    """Split the input features: on ``nnx.Linear`` kernel ``P("tensor", None)``, bias
    replicated.

    Each device multiplies its slice of the (feature-split) input by its rows of the kernel
    and gets a partial sum of the full output; XLA inserts the one all-reduce over
    ``"tensor"``. The bias is replicated so it is added once, after the reduction. The same
    on ``nnx.LinearGeneral`` (first input axis), ``nnx.Einsum`` (first contracted kernel dim),
    ``nnx.Conv`` (input channels), ``nnx.LoRA``/``nnx.LoRALinear`` (``lora_a`` split,
    ``lora_b`` replicated) and ``nnx.Embed`` (the vocabulary rows, as torch).

    ``heads=H``: the input features are H whole heads (attention's output projection).
    """

    column: ClassVar[bool] = False


def _axes_of(entry: Any) -> tuple[Any, ...]:
    return () if entry is None else tuple(entry) if isinstance(entry, tuple) else (entry,)


@dataclasses.dataclass(frozen=True)
class ParamSharding(ParallelStyle):
    """The escape hatch: a ``PartitionSpec`` per parameter of the matched module, for any
    module the built-in styles do not cover (raw ``nnx.Param``s, an ambiguous einsum).

    Keys are parameter paths relative to the module (``"w"``, ``"sub.kernel"``); spec entries
    name mesh axes (``jtp.TENSOR``, ``jtp.DATA``), as jax does. Parameters not named are
    replicated. Under ``fsdp=True`` each spec that does not use ``"data"`` also gets it on its
    largest remaining dimension divisible by the data size, as the built-in styles do. Names,
    ranks, axes and divisibility are checked before any compile.

    Example::

      plan = {"mixer": jtp.ParamSharding({"w_in": P(None, jtp.TENSOR),
                                           "w_out": P(jtp.TENSOR, None)})}
    """

    specs: Mapping[str, P]

    def __post_init__(self) -> None:
        if not isinstance(self.specs, Mapping) or not self.specs:
            raise InputError(
                f"ParamSharding takes a non-empty dict {{parameter name: PartitionSpec}}, "
                f"got {self.specs!r}"
            )
        for name, spec in self.specs.items():
            ok = isinstance(spec, P) and all(isinstance(a, str) for e in spec for a in _axes_of(e))
            if not isinstance(name, str) or not ok:
                raise InputError(
                    f"ParamSharding({{{name!r}: {spec!r}}}): each entry must map a parameter "
                    "name to a jax.sharding.PartitionSpec of mesh axis names or None, e.g. "
                    "{'w': P(None, 'tensor')}"
                )
        object.__setattr__(self, "specs", MappingProxyType(dict(self.specs)))

    def __hash__(self) -> int:
        return hash(tuple(self.specs.items()))

    def layout(self, module: Any) -> Layout:
        params = {
            path_str(p): tuple(v.get_value().shape)
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
        }
        for name, spec in self.specs.items():
            if name not in params:
                have = ", ".join(f"{n} {s}" for n, s in params.items()) or "(none)"
                raise InputError(
                    f"no parameter {name!r} (spec {spec}) in this module; its parameters "
                    f"are: {have}"
                )
        return {name: Rule(spec, LARGEST) for name, spec in self.specs.items()}

    def supports(self, module: Any) -> bool:
        return isinstance(module, nnx.Module)

    def supported_types(self) -> str:
        return "any nnx.Module"
