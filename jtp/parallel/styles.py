"""Parallel styles: which dimension of a layer's parameters goes on which mesh axis.

A style is a small frozen dataclass that maps (module type, parameter name) to a rule: the
dimension split on ``"tensor"``, and the one also split on ``"data"`` under ``fsdp=True``.
Plans (:mod:`jtp.parallel.plan`) attach styles to module paths; nothing here knows a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx


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
