"""Column and row layouts of every parameterised Flax layer, read off the layer instance.

A *layout* maps each parameter of a module (its path relative to the module: ``"kernel"``,
``"lora.lora_b"``) to a :class:`Rule`, or to ``None`` for a parameter the style deliberately
leaves replicated (a row layer's bias, the LoRA factor that must not be split). The rules keep
the Megatron contract: a column layer needs no communication and leaves its output split on
the axis it split; a row layer consumes that split input and produces partial sums, so a
column -> row pair costs exactly one all-reduce over ``"tensor"`` in the forward.

============================  ==========================  ==========================
layer (kernel layout)         column: "tensor" on         row: "tensor" on
============================  ==========================  ==========================
``Linear`` ``(in, out)``      out; bias: out              in; bias replicated
``LinearGeneral``             first output axis; bias:    first input axis; bias
``(*batch, *in, *out)``       its first output axis       replicated
``Einsum``                    first kernel dim reaching   first contracted kernel dim;
                              the output; bias follows    bias replicated
``Conv``                      out channels; bias too      in channels; bias replicated
``(*window, in, out)``
``Embed`` ``(vocab, feat)``   features                    vocabulary rows
``LoRA`` ``a (in, r)``,       ``lora_b`` on out,          ``lora_a`` on in,
``b (r, out)``                ``lora_a`` replicated       ``lora_b`` replicated
``LoRALinear``                as ``Linear`` + its LoRA    as ``Linear`` + its LoRA
============================  ==========================  ==========================

Under ``fsdp=True`` a split kernel's *natural* other dimension (the first input dim of a column
layer, the first output dim of a row layer) also goes on ``"data"`` and must divide; where a
parameter has no natural choice (LoRA factors) the largest remaining dimension that divides
does. Nothing here knows a mesh size: :mod:`jtp.parallel.plan` applies the rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from flax import nnx
from jax.sharding import PartitionSpec as P

from jtp.mesh import TENSOR

LARGEST: Literal["largest"] = "largest"  # fsdp_dim: the largest remaining divisible dim


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where one parameter goes: ``spec`` under tensor parallelism; under ``fsdp=True`` also
    ``"data"`` on ``fsdp_dim``: an int (the layer's natural choice, which must divide), the
    largest remaining dim that divides (``LARGEST``; none if none), or never (``None``);
    ``blocks``: the split dimension is made of that many whole heads."""

    spec: P
    fsdp_dim: int | Literal["largest"] | None = LARGEST
    # The "tensor" dimension holds this many indivisible blocks (whole attention heads):
    # the tensor size must divide it, as well as the dimension. None: any divisor will do.
    blocks: int | None = None


Layout = dict[str, Rule | None]  # relative parameter path -> rule; None: replicated on purpose


def check_heads(
    label: str, name: str, shape: tuple[int, ...], dim: int, heads: int | None, n: int
) -> None:
    """Refuse a split of dimension ``dim`` (``heads`` whole heads) over ``n`` devices that
    would cut a head (the plan's divisibility checks see only the dimension's size)."""
    if heads is not None and (shape[dim] % heads or heads % n):
        why = (
            f"is not {heads} equal heads"
            if shape[dim] % heads
            else f"holds {heads} heads, not divisible by mesh axis {TENSOR!r} of size {n}"
        )
        raise ValueError(
            f"{label}: parameter {name!r} of shape {shape}: dimension {dim} of size "
            f"{shape[dim]} {why}; each device must hold whole heads (use a tensor size "
            f"dividing {heads})"
        )


def split(ndim: int, tensor_dim: int, fsdp_dim: int | Literal["largest"] | None) -> Rule:
    """A rule putting dimension ``tensor_dim`` of an ``ndim``-d parameter on ``"tensor"``."""
    return Rule(P(*(TENSOR if d == tensor_dim else None for d in range(ndim))), fsdp_dim)


def _ndim(param: Any) -> int:
    return len(param.get_value().shape) if param is not None else 0


def linear(m: nnx.Linear, column: bool) -> Layout:
    """Kernel ``(in, out)``, bias ``(out,)``: the Megatron layouts everything else mirrors."""
    if column:
        return {"kernel": split(2, 1, 0), "bias": split(1, 0, None)}
    return {"kernel": split(2, 0, 1), "bias": None}


def embed(m: nnx.Embed, column: bool) -> Layout:
    """Table ``(vocab, features)``: column splits the features, row the vocabulary (as torch:
    a lookup in a vocabulary shard is a partial sum, zero for ids another device holds)."""
    return {"embedding": split(2, 1, 0) if column else split(2, 0, 1)}


def linear_general(m: nnx.LinearGeneral, column: bool) -> Layout:
    """Kernel ``(*batch, *in, *out)``, bias ``(*batch, *out)``. The *first* output (input) axis,
    because in ``nnx.MultiHeadAttention`` that is the heads axis of the q/k/v (out) projections,
    and attention is independent per head: the split needs no communication in between."""
    n_batch, n_in, n_out = len(m.batch_axis), len(m.in_features), len(m.out_features)
    first_in, first_out, ndim = n_batch, n_batch + n_in, n_batch + n_in + n_out
    if column:
        bias = split(n_batch + n_out, n_batch, None)
        return {"kernel": split(ndim, first_out, first_in), "bias": bias}
    return {"kernel": split(ndim, first_in, first_out), "bias": None}


def conv(m: nnx.Conv, column: bool) -> Layout:
    """Kernel ``(*window, in // groups, out)``, bias ``(out,)``: channels are the features, for
    any number of window dims (a convolution is a matmul over channels at each offset)."""
    if m.feature_group_count != 1:
        raise ValueError(
            f"no column/row layout for a grouped convolution (feature_group_count="
            f"{m.feature_group_count}): its kernel holds in_features // groups input channels "
            "per group, so a channel split would not line up with the input's; lay it out "
            "with jtp.ParamSharding({'kernel': P(...)})"
        )
    ndim = _ndim(m.kernel)
    if column:
        return {"kernel": split(ndim, ndim - 1, ndim - 2), "bias": split(1, 0, None)}
    return {"kernel": split(ndim, ndim - 2, ndim - 1), "bias": None}


def lora(m: nnx.LoRA, column: bool) -> Layout:
    """``lora_a (in, rank)``, ``lora_b (rank, out)``, laid out so the low-rank path adds no
    collective. Column: ``x @ a`` runs whole on every device (the rank is small) and ``b``
    splits the output like the base kernel; row: ``a`` consumes the split input and its
    ``(..., rank)`` partial sums are reduced in the base layer's all-reduce op. A supported
    ``base_module`` gets the same style."""
    out: Layout = {"lora_a": None, "lora_b": split(2, 1, LARGEST)}
    if not column:
        out = {"lora_a": split(2, 0, LARGEST), "lora_b": None}
    base = layout_fn(m.base_module) if m.base_module is not None else None
    if base is not None:
        out |= {f"base_module.{k}": v for k, v in base(m.base_module, column).items()}
    return out


def lora_linear(m: nnx.LoRALinear, column: bool) -> Layout:
    """An ``nnx.Linear`` whose ``lora`` child follows the same style, so one key covers both."""
    return linear(m, column) | {f"lora.{k}": v for k, v in lora(m.lora, column).items()}


def _einsum_parts(m: nnx.Einsum) -> tuple[str, str, str]:
    """``"btd,dnh->btnh"`` -> ("btd", "dnh", "btnh"), with the kernel's letters checked."""
    inputs, out = m.einsum_str.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    ndim = _ndim(m.kernel)
    if "." in rhs or len(rhs) != ndim or len(set(rhs)) != len(rhs):
        raise ValueError(
            f"the kernel operand {rhs!r} of einsum {m.einsum_str!r} must name each of the "
            f"kernel's {ndim} dimensions with its own letter (no '...'); lay it out with "
            "jtp.ParamSharding({'kernel': P(...)})"
        )
    return lhs, rhs, out


def _spec_str(ndim: int, dim: int) -> str:
    return "P(" + ", ".join("'tensor'" if d == dim else "None" for d in range(ndim)) + ")"


def einsum(m: nnx.Einsum, column: bool) -> Layout:
    """From the einsum string: column splits the first kernel dim reaching the output (an
    output feature), row the first one contracted with the input (a partial sum). A first
    output dim that is also an input (batch) dim is ambiguous and raises, naming both choices."""
    lhs, rhs, out = _einsum_parts(m)
    ndim = len(rhs)
    reaching = [d for d, c in enumerate(rhs) if c in out]  # column candidates
    contracted = [d for d, c in enumerate(rhs) if c in lhs and c not in out]  # row candidates
    kind, dims = ("column", reaching) if column else ("row", contracted)
    if not dims:
        what = "reaches the output" if column else "is contracted with the input"
        raise ValueError(
            f"no kernel dimension of einsum {m.einsum_str!r} {what}, so it has no {kind} "
            "split; lay it out with jtp.ParamSharding({'kernel': P(...)})"
        )
    dim = dims[0]
    if column and rhs[dim] in lhs:
        features = [d for d in reaching if rhs[d] not in lhs]
        other = (
            f" or the first feature dimension {features[0]} ('{rhs[features[0]]}'): "
            f"ParamSharding({{'kernel': {_spec_str(ndim, features[0])}}})"
            if features
            else ""
        )
        raise ValueError(
            f"einsum {m.einsum_str!r}: the first kernel dimension reaching the output, "
            f"{dim} ('{rhs[dim]}'), is also an input dimension (a batch dimension), so the "
            "column split is ambiguous; choose the dimension with jtp.ParamSharding: split "
            f"the batch dimension: ParamSharding({{'kernel': {_spec_str(ndim, dim)}}}){other}"
        )
    natural = contracted if column else [d for d in reaching if rhs[d] not in lhs]
    layout: Layout = {"kernel": split(ndim, dim, natural[0] if natural else LARGEST)}
    layout["bias"] = _einsum_bias(m, rhs, out, rhs[dim]) if column else None
    return layout


def _einsum_bias(m: nnx.Einsum, rhs: str, out: str, letter: str) -> Rule | None:
    """The bias broadcasts over the output dims that come from the kernel, in output order
    (flax's ``_infer_broadcasted_bias_shape``); stored either as exactly those dims or in the
    full broadcast shape. Any other stored shape (a flat bias) has no dimension to follow."""
    if m.bias is None:
        return None
    shape = tuple(m.bias.get_value().shape)
    size = dict(zip(rhs, m.kernel.get_value().shape, strict=True))
    compact = [c for c in out if c in rhs]
    if shape == tuple(size[c] for c in compact):
        return split(len(shape), compact.index(letter), None)
    if shape == tuple(size.get(c, 1) for c in out):
        return split(len(shape), out.index(letter), None)
    raise ValueError(
        f"the bias of shape {shape} of einsum {m.einsum_str!r} is not laid out along the "
        f"output dims {compact!r} it broadcasts over, so it has no dimension to split with "
        "the kernel; lay both out with jtp.ParamSharding({'kernel': P(...), 'bias': P(...)})"
    )


LayoutFn = Callable[[Any, bool], Layout]
# Looked up along the module's MRO, so a subclass (LoRALinear < Linear) gets its own entry and a
# user's subclass of a stock layer gets its parent's.
LAYOUTS: dict[type, LayoutFn] = {
    nnx.Linear: linear,
    nnx.LinearGeneral: linear_general,
    nnx.Einsum: einsum,
    nnx.Conv: conv,
    nnx.Embed: embed,
    nnx.LoRA: lora,
    nnx.LoRALinear: lora_linear,
}


def layout_fn(module: Any) -> LayoutFn | None:
    """The layout function of ``module``'s most specific supported type, or ``None``."""
    return next((LAYOUTS[t] for t in type(module).__mro__ if t in LAYOUTS), None)
