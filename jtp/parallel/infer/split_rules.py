"""How a feature axis split over ``"tensor"`` travels through one op of the forward.

A value is either whole on every device (``None``) or :class:`Split` on one dimension,
which holds ``blocks`` indivisible units (the features of a linear; whole heads once a
reshape has cut the features into ``(heads, head_dim)``): the tensor size must divide
``blocks``. :func:`propagate` says what one op does with its operands' splits:

- :class:`Moved`: the split carries on (element-wise ops, gates, transposes, reshapes that
  keep whole heads, slices and reductions of *other* dimensions, batched matmuls over the
  split heads, a column layer's own matmul); or ends where it should: a ``"pair"`` (a matmul
  contracting the split axis against a parameter split the same way: the row layer, whose
  partial sums XLA all-reduces), a ``"lookup"`` (an embedding table split on its rows), a
  ``"reduce"`` over the split axis (allowed only at the end of a lone column head);
- :class:`Need`: the op combines the split value with a whole one that must be split too
  (the other branch of a gate, the keys of attention, the kernel of the row layer): the
  caller finds which layer makes it (:mod:`jtp.parallel.infer.pairing`) or refuses;
- :class:`Stop`: anything that mixes features across the split (a norm or softmax over
  it, a reshape cutting through a head, a contraction outside a layer, an op not listed
  here) ends the attempt, with the reason.

Rules are per primitive and need no model: shapes and dimension numbers only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence, Set

from jtp.parallel.infer.dataflow import CUMULATIVE, ELEMENTWISE, IDENTITY, REDUCTIONS, Graph, Op
from jtp.parallel.infer.dims import broadcast_along, dot_dims, reshape_dim


@dataclasses.dataclass(frozen=True)
class Split:
    dim: int  # the dimension split over "tensor"
    blocks: int  # indivisible units along it: the tensor size must divide this


@dataclasses.dataclass(frozen=True)
class Moved:
    outs: tuple[Split | None, ...]
    event: str | None = None  # "pair", "lookup", "reduce", "heads", "matmul", "column"
    value: int | None = None  # the parameter view of a "pair" / "column" matmul


@dataclasses.dataclass(frozen=True)
class Need:
    value: int  # a whole value that must be split ...
    dim: int  # ... on this dimension for the op to stay local
    contracted: bool  # the op is a matmul contracting that dimension


@dataclasses.dataclass(frozen=True)
class Stop:
    reason: str  # completes "its split output ..."


State = Split | None


def _elementwise(
    op: Op, states: Sequence[State], g: Graph, sliced: Set[int], out_dim=None
) -> Moved | Need | Stop:
    split = [s for s in states if s is not None]
    dims = {s.dim for s in split}
    if len(dims) > 1:
        return Stop(f"meets a value split on another dimension in {op.prim}")
    d = dims.pop()
    rank = len(g.shapes[op.ins[states.index(split[0])]])
    for v, s in zip(op.ins, states, strict=True):
        if s is not None or not g.shapes[v]:
            continue
        if len(g.shapes[v]) != rank:
            return Stop(f"meets an operand of another rank in {op.prim}")
        if not broadcast_along(g, v, d) and not g.is_free(v) and v not in sliced:
            return Need(v, d, contracted=False)
    blocks = math.gcd(*(s.blocks for s in split))
    return Moved((Split(d if out_dim is None else out_dim(d), blocks),) * len(op.outs))


def _reshape(op: Op, s: Split, g: Graph) -> Moved | Stop:
    if op.params.get("dimensions") is not None:
        return Stop("is reshaped with a transposition")
    src, dst = g.shapes[op.ins[0]], g.shapes[op.outs[0]]
    where = reshape_dim(src, dst, s.dim)
    if where is None:
        return Stop(
            f"is reshaped {src} -> {dst}, which cuts dimension {s.dim} across the split "
            "(a head would straddle two devices)"
        )
    c, heads = where
    if heads is None:
        return Moved((Split(c, s.blocks),))
    return Moved((Split(c, math.gcd(s.blocks, heads)),), event="heads")


def _dot(op: Op, states: Sequence[State], g: Graph, sliced: Set[int]) -> Moved | Need | Stop:
    (lc, rc, lb, rb), free = dot_dims(op, g)
    contract, batch = (lc, rc), (lb, rb)

    def kind(side: int, d: int) -> tuple[str, int]:
        if d in batch[side]:
            return "batch", batch[side].index(d)
        if d in contract[side]:
            return "contract", contract[side].index(d)
        return "free", free[side].index(d)

    def out_dim(side: int, i: int) -> int:
        return len(lb) + (len(free[0]) if side else 0) + i

    sides = [k for k in (0, 1) if states[k] is not None]
    if len(sides) == 2:
        (kl, il), (kr, ir) = kind(0, states[0].dim), kind(1, states[1].dim)
        blocks = math.gcd(states[0].blocks, states[1].blocks)
        if kl == kr == "batch" and il == ir:
            return Moved((Split(il, blocks),), event="matmul")
        if kl == kr == "contract" and il == ir:
            param = next((v for v in op.ins if v in g.views), None)
            if param is not None:
                return Moved((None,), event="pair", value=param)
            return Stop(
                "is contracted over the split axis by a matmul of two activations (no "
                "parameter: not a row layer), whose partial sums would need an all-reduce"
            )
        return Stop("meets, in a matmul, another split that does not line up with it")
    side = sides[0]
    other = op.ins[1 - side]
    k, i = kind(side, states[side].dim)
    if k == "free":
        param = op.ins[side] if op.ins[side] in g.views else None
        event = "column" if param is not None else None
        return Moved((Split(out_dim(side, i), states[side].blocks),), event=event, value=param)
    other_dim = (batch if k == "batch" else contract)[1 - side][i]
    local = g.is_free(other) or other in sliced  # every device may take its slice
    if local or (k == "batch" and broadcast_along(g, other, other_dim)):
        if k == "batch":
            return Moved((Split(i, states[side].blocks),), event="matmul")
        return Stop("is contracted with a constant over the split axis")
    return Need(other, other_dim, contracted=k == "contract")


def _conv(op: Op, states: Sequence[State], g: Graph) -> Moved | Need | Stop:
    """A convolution is a matmul over channels at every offset: its channels pair like a
    dot's features (output channels: column, input channels: row); other splits stop."""
    p = op.params
    lhs, rhs, out = p["dimension_numbers"]  # (batch, feature, *spatial), (out, in, *spatial)
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return Stop("enters a grouped convolution")
    (sl, sr), kernel = states[:2], op.ins[1]
    if sl is not None and sl.dim == lhs[1]:  # input channels: the row contraction
        if sr is None:
            return Need(kernel, rhs[1], contracted=True)
        if sr.dim == rhs[1] and kernel in g.views:
            return Moved((None,), event="pair", value=kernel)
    elif sl is None and sr is not None and sr.dim == rhs[0]:  # output channels: a column
        event = "column" if kernel in g.views else None
        return Moved((Split(out[1], sr.blocks),), event=event, value=kernel)
    return Stop("is convolved along the split axis, or mixed with another split")


def _gather(op: Op, states: Sequence[State], g: Graph) -> Moved | Stop:
    if any(s is not None for s in states[1:]):
        return Stop("is used as gather indices")
    s, dn = states[0], op.params["dimension_numbers"]
    sizes, operand = op.params["slice_sizes"], op.ins[0]
    if s.dim in dn.collapsed_slice_dims and sizes[s.dim] == 1 and operand in g.views:
        return Moved((None,), event="lookup")  # rows of a table: partial rows, all-reduced
    offset = [
        i
        for i in range(len(g.shapes[operand]))
        if i not in dn.collapsed_slice_dims and i not in dn.operand_batching_dims
    ]
    if s.dim in offset and sizes[s.dim] == g.shapes[operand][s.dim]:
        return Moved((Split(dn.offset_dims[offset.index(s.dim)], s.blocks),))
    return Stop("is indexed along the split axis (gather)")


def _one(op: Op, s: Split, g: Graph) -> Moved | Stop | None:
    """Single-operand shape ops; ``None`` if ``op`` is not one of them."""
    shape, p, d = g.shapes[op.ins[0]], op.params, s.dim
    if op.prim == "transpose":
        return Moved((Split(tuple(p["permutation"]).index(d), s.blocks),))
    if op.prim == "broadcast_in_dim":
        return Moved((Split(tuple(p["broadcast_dimensions"])[d], s.blocks),))
    if op.prim == "squeeze":
        return Moved((Split(d - sum(x < d for x in p["dimensions"]), s.blocks),))
    if op.prim == "reshape":
        return _reshape(op, s, g)
    if op.prim in REDUCTIONS:
        if d in p["axes"]:
            return Moved((None,), event="reduce")
        return Moved((Split(d - sum(a < d for a in p["axes"]), s.blocks),))
    if op.prim in CUMULATIVE or op.prim == "sort":
        axis = p.get("axis", p.get("dimension"))
        return Moved((s,)) if axis != d else Stop(f"is accumulated or sorted along it ({op.prim})")
    if op.prim == "slice":
        whole = p["start_indices"][d] == 0 and p["limit_indices"][d] == shape[d]
        whole = whole and (p["strides"] is None or p["strides"][d] == 1)
        return Moved((s,)) if whole else Stop("is sliced along the split axis")
    if op.prim == "pad":
        return Moved((s,)) if tuple(p["padding_config"][d]) == (0, 0, 0) else Stop("is padded")
    if op.prim == "rev":
        return Moved((s,)) if d not in p["dimensions"] else Stop("is reversed along it")
    if op.prim == "split":
        if p["axis"] == d:
            return Stop("is split into pieces along the split axis")
        return Moved((s,) * len(op.outs))
    if op.prim == "scan_slice":
        return Moved((Split(d - 1, s.blocks),)) if d else Stop("is split on a scan's layer axis")
    if op.prim == "scan_stack":
        return Moved((Split(d + 1, s.blocks),))
    if op.prim == "carry":
        return Stop("is carried from one loop iteration to the next")
    return None


def propagate(
    op: Op, states: Sequence[State], g: Graph, sliced: Set[int] = frozenset()
) -> Moved | Need | Stop:
    """What ``op`` does with its operands' splits (at least one is split). ``sliced``:
    whole values each device may slice (copies of heads, :func:`~jtp.parallel.infer.dims.
    column_source`'s repeats) as if they were split."""
    prim = op.prim
    if prim in IDENTITY:
        return Moved(tuple(states))
    if prim in ELEMENTWISE:
        return _elementwise(op, states, g, sliced)
    if prim == "dot_general":
        return _dot(op, states, g, sliced)
    if prim == "gather":
        return _gather(op, states, g)
    if prim == "conv_general_dilated":
        return _conv(op, states, g)
    if prim == "stack":
        axis = op.params["axis"]
        return _elementwise(op, states, g, sliced, out_dim=lambda d: d + (d >= axis))
    if prim == "concatenate":
        first = next(s for s in states if s is not None)
        if op.params["dimension"] == first.dim:
            return Stop("is concatenated along the split axis")
        return _elementwise(op, states, g, sliced)
    if prim == "dynamic_slice":  # operand, *start indices
        s = states[0]
        if s is None or any(x is not None for x in states[1:]):
            return Stop("is used as a dynamic_slice index")
        if op.params["slice_sizes"][s.dim] != g.shapes[op.ins[0]][s.dim]:
            return Stop("is sliced along the split axis (dynamic_slice)")
        return Moved((s,))
    if prim == "dynamic_update_slice":  # operand, update, *start indices
        s = states[0] or states[1]
        if any(x is not None for x in states[2:]):
            return Stop("is used as a dynamic_update_slice index")
        if g.shapes[op.ins[1]][s.dim] != g.shapes[op.ins[0]][s.dim]:
            return Stop("is updated in part along the split axis (dynamic_update_slice)")
        return _elementwise(op, states, g, sliced)
    if len(op.ins) == 1:
        moved = _one(op, states[0], g)
        if moved is not None:
            return moved
    return Stop(f"reaches {prim}, which jtp.infer_plan does not see through")
