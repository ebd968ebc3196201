"""Where a dimension goes through one op of the forward, and where it came from.

Shape facts shared by the forward rules (:mod:`jtp.parallel.infer.split_rules`) and the search
for a split's partners (:mod:`jtp.parallel.infer.pairing`): how a reshape maps a dimension
(:func:`reshape_dim`), a matmul's batch / contracted / free dimensions (:func:`dot_dims`),
whether a value is constant along a dimension (:func:`broadcast_along`), and which
parameter's matmul made a dimension of a value (:func:`column_source`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jtp.parallel.infer.dataflow import ELEMENTWISE, IDENTITY, Graph, Op


def broadcast_along(g: Graph, v: int, d: int) -> bool:
    """Whether value ``v`` is the same along its dimension ``d`` (size 1, or broadcast)."""
    while True:
        shape = g.shapes[v]
        if not shape or shape[d] == 1:
            return True
        i = g.producer.get(v)
        if i is None:
            return False
        op = g.ops[i]
        if op.prim == "broadcast_in_dim":
            dims = tuple(op.params["broadcast_dimensions"])
            return d not in dims or g.shapes[op.ins[0]][dims.index(d)] == 1
        if op.prim in IDENTITY or (op.prim in ELEMENTWISE and len(op.ins) == 1):
            v = op.ins[0]
            continue
        return False


def reshape_dim(src: Sequence[int], dst: Sequence[int], d: int) -> tuple[int, int | None] | None:
    """Where dimension ``d`` of ``src`` goes in ``dst`` if a split on it stays a contiguous
    split: ``(dst dim, heads)``, ``heads`` set when ``d`` is cut into ``(heads, ...)`` (the
    split then falls on whole heads); ``None`` when ``d`` becomes an inner factor of a
    merged dimension or is cut and merged at once."""
    before, n = math.prod(src[:d]), src[d]
    acc, c = 1, 0
    while c < len(dst) and not (acc == before and dst[c] != 1):
        acc, c = acc * dst[c], c + 1
        if acc > before:  # d is an inner factor of a merged dimension
            return None
    if c == len(dst):
        return None
    m = dst[c]
    if m == n:
        return c, None
    if m < n:  # cut: n -> (m, ...), the split on the leading factor
        acc, k = m, c + 1
        while acc < n and k < len(dst):
            acc, k = acc * dst[k], k + 1
        return (c, m) if acc == n else None
    acc, k = n, d + 1  # merged: (n, ...) -> m, the split dim the outermost factor
    while acc < m and k < len(src):
        acc, k = acc * src[k], k + 1
    return (c, None) if acc == m else None


def dot_dims(op: Op, g: Graph) -> tuple[list[tuple[int, ...]], list[list[int]]]:
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    contract, batch = [tuple(lc), tuple(rc)], [tuple(lb), tuple(rb)]
    free = [
        [i for i in range(len(g.shapes[v])) if i not in contract[k] and i not in batch[k]]
        for k, v in enumerate(op.ins)
    ]
    return [*contract, *batch], free


@dataclasses.dataclass(frozen=True)
class Source:
    """What makes dimension ``dim`` of a value: a parameter's matmul (``value`` is the
    parameter view, ``dim`` its free dimension) or, with ``repeat``, copies: ``value``'s
    ``dim`` repeated (``jnp.repeat``: broadcast to a new inner axis, merged into it)."""

    value: int
    dim: int
    repeat: bool = False


def column_source(g: Graph, v: int, d: int) -> Source | None:
    """What makes dimension ``d`` of ``v`` (:class:`Source`), walking back through the ops
    a split travels through; ``None`` if neither a parameter's free dimension nor a repeat."""
    seen: set[tuple[int, int]] = set()

    def walk(v: int, d: int) -> Source | None:
        while (v, d) not in seen:
            seen.add((v, d))
            i = g.producer.get(v)
            if i is None or v in g.views:
                return None
            op, p = g.ops[i], g.ops[i].params
            shape_in = g.shapes[op.ins[0]] if op.ins else ()
            if op.prim == "dot_general":
                (_, _, lb, _), free = dot_dims(op, g)
                if d < len(lb):
                    return None  # a batch dimension: both operands make it
                d -= len(lb)
                side = int(d >= len(free[0]))
                v, d = op.ins[side], free[side][d - side * len(free[0])]
                if v in g.views:
                    return Source(v, d)
            elif op.prim == "conv_general_dilated":  # output channels: the kernel's
                _, rhs, out = p["dimension_numbers"]
                kernel = op.ins[1]
                return Source(kernel, rhs[0]) if d == out[1] and kernel in g.views else None
            elif op.prim in IDENTITY:
                v = op.ins[op.outs.index(v)]
            elif op.prim in ELEMENTWISE or op.prim in ("stack", "concatenate"):
                if op.prim == "stack":
                    if d == p["axis"]:
                        return None
                    d -= d > p["axis"]
                elif op.prim == "concatenate" and d == p["dimension"]:
                    return None
                for u in op.ins:
                    if g.shapes[u] and not g.is_free(u) and not broadcast_along(g, u, d):
                        hit = walk(u, d)
                        if hit is not None:
                            return hit
                return None
            elif op.prim == "transpose":
                v, d = op.ins[0], tuple(p["permutation"])[d]
            elif op.prim == "broadcast_in_dim":
                dims = tuple(p["broadcast_dimensions"])
                if d not in dims or shape_in[dims.index(d)] != g.shapes[v][d]:
                    return None
                v, d = op.ins[0], dims.index(d)
            elif op.prim == "squeeze":
                kept = [k for k in range(len(shape_in)) if k not in p["dimensions"]]
                v, d = op.ins[0], kept[d]
            elif op.prim == "reshape":
                back = reshape_dim(g.shapes[v], shape_in, d)
                if back is None:
                    return None
                inner, k = g.shapes[v][d] // shape_in[back[0]], back[0] + 1
                while inner > 1 and k < len(shape_in):  # a merge: (n, r) -> n * r
                    if shape_in[k] > 1 and broadcast_along(g, op.ins[0], k):  # r copies
                        return Source(op.ins[0], back[0], repeat=True)
                    inner, k = inner // shape_in[k], k + 1
                v, d = op.ins[0], back[0]
            elif op.prim == "slice" and g.shapes[v][d] == shape_in[d]:
                v = op.ins[0]
            elif op.prim == "scan_slice":
                v, d = op.ins[0], d + 1
            elif op.prim == "scan_stack" and d:
                v, d = op.ins[0], d - 1
            else:
                return None
        return None

    return walk(v, d)
