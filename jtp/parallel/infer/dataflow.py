"""A model's forward as one flat dataflow graph: what :func:`jtp.infer_plan` reads.

``jax.make_jaxpr`` of ``model(*example_args)`` over the model's state gives the program jax
would compile; this module flattens it into a list of :class:`Op` over numbered values, in
program (topological) order, so the pairing rules (:mod:`jtp.parallel.infer.split_rules`) walk
one list and never recurse:

- calls are inlined: ``jit`` (``jax.nn.silu`` and most of ``jax.nn`` are jitted: the call's
  name is kept as the op's *scope*, for explanations), ``custom_jvp_call`` /
  ``custom_vjp_call`` (their primal), ``checkpoint`` (remat);
- a ``scan`` body is inlined once (one trip stands for all): each per-iteration slice of a
  scanned input is a ``scan_slice`` op (the leading axis dropped: a stacked parameter's
  slice *is* that parameter), each stacked output a ``scan_stack`` op, and a carry crosses
  a ``carry`` op (opaque: nothing split may travel between iterations);
- a ``cond``'s branches are each inlined on the same operands, and each output is a
  ``select_n`` of the branches' (an element-wise op: a split must reach it through every
  branch, so a layout holds whichever branch runs: Gemma's sliding and global layers in
  one scanned block, :mod:`jtp.models.layer_kinds`);
- anything else with a body (``while``, ``shard_map``) stays one opaque op.

Each value knows its shape, whether it depends on a parameter or on the example inputs
(a value that depends on neither, such as a causal mask or a RoPE table, can be sliced on
every device for free), and, when it is a parameter seen through layout-preserving ops
(a dtype cast, a scan's layer slice, a transpose), which parameter dimension each of its
dimensions is (:attr:`Graph.views`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

from jtp.parallel.names import leaf_names

PARAM, DATA_INPUT = 1, 2  # dependency bits of a value
# Ops whose every output is its operand, unchanged in shape and layout.
IDENTITY = frozenset(
    {
        "convert_element_type",
        "copy",
        "copy_p",
        "name",
        "stop_gradient",
        "reduce_precision",
        "sharding_constraint",
        "pvary",
        "mesh_cast",
        "optimization_barrier",
    }
)
ELEMENTWISE = frozenset(
    {
        "abs",
        "acos",
        "acosh",
        "add",
        "add_any",
        "and",
        "asin",
        "asinh",
        "atan",
        "atan2",
        "atanh",
        "cbrt",
        "ceil",
        "clamp",
        "conj",
        "cos",
        "cosh",
        "digamma",
        "div",
        "eq",
        "erf",
        "erf_inv",
        "erfc",
        "exp",
        "exp2",
        "expm1",
        "floor",
        "ge",
        "gt",
        "imag",
        "integer_pow",
        "is_finite",
        "le",
        "lgamma",
        "log",
        "log1p",
        "logistic",
        "lt",
        "max",
        "min",
        "mul",
        "ne",
        "neg",
        "nextafter",
        "not",
        "or",
        "population_count",
        "pow",
        "real",
        "rem",
        "round",
        "rsqrt",
        "select_n",
        "shift_left",
        "shift_right_arithmetic",
        "shift_right_logical",
        "sign",
        "sin",
        "sinh",
        "sqrt",
        "square",
        "sub",
        "tan",
        "tanh",
        "xor",
    }
)
REDUCTIONS = frozenset(
    {
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_prod",
        "reduce_and",
        "reduce_or",
        "argmax",
        "argmin",
    }
)
CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_CALL_JAXPRS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_OPAQUE = frozenset({"while", "cond", "shard_map", "scan"})  # cond, scan: their own rules


@dataclasses.dataclass(frozen=True)
class Op:
    """One primitive application, or a pseudo-op standing for a scan's plumbing."""

    prim: str  # jax primitive name, or "scan_slice" / "scan_stack" / "carry"
    ins: tuple[int, ...]  # value ids (literals are values too)
    outs: tuple[int, ...]
    params: Mapping[str, Any]
    scope: tuple[str, ...]  # names of the enclosing jitted functions, outermost first
    where: str  # "file.py:line (function)" of the user frame that emitted it
    trips: int = 1  # times it runs per forward: the lengths of the scans around it


@dataclasses.dataclass
class Graph:
    """The flattened forward: ops in program order over values ``0 .. len(shapes) - 1``."""

    ops: list[Op]
    shapes: list[tuple[int, ...]]
    deps: list[int]  # PARAM | DATA_INPUT bits per value
    itemsizes: list[int]  # bytes per element of each value (its dtype's)
    params: dict[int, str]  # value id of each nnx.Param leaf -> its path ("w1.kernel")
    outputs: list[int]  # the forward's result leaves
    producer: dict[int, int]  # value id -> index of the op that made it
    users: dict[int, list[int]]  # value id -> indices of the ops reading it, in order
    # value id -> (parameter path, the parameter dimension of each of its dimensions): the
    # parameter itself or seen through casts, scan slices, transposes and size-1 reshapes.
    views: dict[int, tuple[str, tuple[int | None, ...]]]

    def is_free(self, v: int) -> bool:
        """Depends on no parameter and no input: every device can compute (or slice) it."""
        return not self.deps[v]

    def nbytes(self, v: int) -> int:
        """Bytes of the whole value ``v``."""
        n = self.itemsizes[v]
        for size in self.shapes[v]:
            n *= size
        return n


def _where(eqn: Any) -> str:
    try:  # private, but the only way to name the line that emitted an equation
        from jax._src import source_info_util

        text = source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - a missing location must not stop inference
        return "?"
    path, _, rest = text.partition(":")  # "/x/y/norm.py:102:16 (f.<locals>.g)"
    rest = re.sub(r"\.<locals>[^)]*", "", rest)  # the enclosing function is enough
    return os.path.basename(path) + (":" + rest if rest else "")


class _Builder:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.shapes: list[tuple[int, ...]] = []
        self.deps: list[int] = []
        self.itemsizes: list[int] = []
        self.trips = 1  # of the ops being added: inside scans, the product of their lengths

    def value(self, shape: Sequence[int], deps: int = 0, itemsize: int = 4) -> int:
        self.shapes.append(tuple(int(n) for n in shape))
        self.deps.append(deps)
        self.itemsizes.append(itemsize)
        return len(self.shapes) - 1

    def op(
        self,
        prim: str,
        ins: Sequence[int],
        out_shapes: Sequence[Sequence[int]],
        params: Mapping[str, Any],
        scope: tuple[str, ...],
        where: str,
        itemsizes: Sequence[int] | None = None,
    ) -> list[int]:
        deps = 0
        for v in ins:
            deps |= self.deps[v]
        if itemsizes is None:  # plumbing (a scan's slices, a cond's select): its operand's
            itemsizes = [self.itemsizes[ins[-1]] if ins else 4] * len(out_shapes)
        outs = [self.value(shape, deps, n) for shape, n in zip(out_shapes, itemsizes, strict=True)]
        self.ops.append(Op(prim, tuple(ins), tuple(outs), dict(params), scope, where, self.trips))
        return outs

    def read(self, env: dict, var: Any) -> int:
        if isinstance(var, jcore.Literal):
            return self.value(getattr(var.aval, "shape", ()), 0, _itemsize(var.aval))
        return env[var]

    def inline(self, jaxpr: Any, ins: Sequence[int], scope: tuple[str, ...]) -> list[int]:
        """Append ``jaxpr``'s equations applied to values ``ins``; return its outputs."""
        if isinstance(jaxpr, jcore.ClosedJaxpr):
            jaxpr = jaxpr.jaxpr
        # Closed-over constants: values of their own, free (no parameter, no input).
        env: dict = {
            var: self.value(var.aval.shape, 0, _itemsize(var.aval)) for var in jaxpr.constvars
        }
        for var, v in zip(jaxpr.invars, ins, strict=True):
            env[var] = v
        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [self.read(env, x) for x in eqn.invars], scope)
            for var, v in zip(eqn.outvars, outs, strict=True):
                env[var] = v
        return [self.read(env, x) for x in jaxpr.outvars]

    def equation(self, eqn: Any, ins: list[int], scope: tuple[str, ...]) -> list[int]:
        name, where = eqn.primitive.name, _where(eqn)
        out_shapes = [getattr(v.aval, "shape", ()) for v in eqn.outvars]
        if name == "scan":
            return self.scan(eqn, ins, scope, where)
        if name == "cond":  # index, *operands
            outs = [self.inline(b, ins[1:], scope) for b in eqn.params["branches"]]
            return [
                self.op("select_n", [ins[0], *branch_outs], [shape], {}, scope, where)[0]
                for branch_outs, shape in zip(zip(*outs, strict=True), out_shapes, strict=True)
            ]
        body = _call_body(eqn)
        if body is not None and name not in _OPAQUE:
            label = eqn.params.get("name")
            return self.inline(body, ins, scope + ((str(label),) if label else ()))
        params = {k: v for k, v in eqn.params.items() if k not in _CALL_JAXPRS}
        itemsizes = [_itemsize(v.aval) for v in eqn.outvars]
        return self.op(name, ins, out_shapes, params, scope, where, itemsizes)

    def scan(self, eqn: Any, ins: list[int], scope: tuple[str, ...], where: str) -> list[int]:
        p = eqn.params
        if "ft_in" in p:  # jax >= 0.10: ((consts), (carry), (xs)) of the inputs
            n_consts, n_carry, _ = (len(part) for part in p["ft_in"].unpack())
        else:
            n_consts, n_carry = p["num_consts"], p["num_carry"]
        body = p["jaxpr"]
        consts, carry, xs = (
            ins[:n_consts],
            ins[n_consts : n_consts + n_carry],
            ins[n_consts + n_carry :],
        )

        def plumb(prim: str, v: int, shape: tuple[int, ...]) -> int:
            return self.op(prim, [v], [shape], {}, scope, where)[0]

        inner = [
            *consts,
            *(plumb("carry", v, self.shapes[v]) for v in carry),
            *(plumb("scan_slice", v, self.shapes[v][1:]) for v in xs),
        ]
        length = int(p["length"])
        self.trips *= length
        outs = self.inline(body, inner, scope)
        self.trips //= length
        return [
            *(plumb("carry", v, self.shapes[v]) for v in outs[:n_carry]),
            *(plumb("scan_stack", v, (length, *self.shapes[v])) for v in outs[n_carry:]),
        ]


def _itemsize(aval: Any) -> int:
    dtype = getattr(aval, "dtype", None)
    try:
        return int(dtype.itemsize)
    except (AttributeError, TypeError):  # a token or an extended dtype (PRNG keys)
        return 4


def _call_body(eqn: Any) -> Any:
    """The body of a call-like equation whose inputs and outputs are its own, or None."""
    for key in _CALL_JAXPRS:
        body = eqn.params.get(key)
        inner = body.jaxpr if isinstance(body, jcore.ClosedJaxpr) else body
        if isinstance(inner, jcore.Jaxpr) and (
            len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars)
        ):
            return body
    return None


def _views(graph: Graph) -> None:
    """Fill ``graph.views``: each parameter seen through layout-preserving ops."""
    views = graph.views
    for v, path in graph.params.items():
        views[v] = (path, tuple(range(len(graph.shapes[v]))))
    for op in graph.ops:
        if not op.ins or op.ins[0] not in views:
            continue
        path, dims = views[op.ins[0]]
        if op.prim in IDENTITY and len(op.ins) == 1:
            new = dims
        elif op.prim == "scan_slice":
            new = dims[1:]
        elif op.prim == "transpose":
            new = tuple(dims[i] for i in op.params["permutation"])
        elif op.prim == "reshape" and _drops_ones(
            graph.shapes[op.ins[0]], graph.shapes[op.outs[0]]
        ):
            kept = [d for d, n in zip(dims, graph.shapes[op.ins[0]], strict=True) if n != 1]
            it = iter(kept)
            new = tuple(None if n == 1 else next(it) for n in graph.shapes[op.outs[0]])
        else:
            continue
        views[op.outs[0]] = (path, new)


def _drops_ones(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether the reshape ``a -> b`` only adds or removes size-1 dimensions."""
    return [n for n in a if n != 1] == [n for n in b if n != 1]


def trace(
    forward: Callable[..., Any], state: Any, args: Sequence[Any], param_names: Container[str]
) -> Graph:
    """The flat graph of ``forward(state, *args)``.

    ``state``: the model's ``nnx.State`` (arrays or ``jax.ShapeDtypeStruct``s); its leaves
    named in ``param_names`` (the ``nnx.Param`` paths) become :attr:`Graph.params`.
    """
    closed = jax.make_jaxpr(forward)(state, *args)
    names = leaf_names(state)
    b = _Builder()
    n_state = len(jax.tree.leaves(state))
    ins, params = [], {}
    for i, var in enumerate(closed.jaxpr.invars):
        if i < n_state:
            is_param = names[i] in param_names
            v = b.value(var.aval.shape, PARAM if is_param else 0, _itemsize(var.aval))
            if is_param:
                params[v] = names[i]
        else:  # an example argument
            v = b.value(var.aval.shape, DATA_INPUT, _itemsize(var.aval))
        ins.append(v)
    outs = b.inline(closed, ins, ())
    producer = {v: i for i, op in enumerate(b.ops) for v in op.outs}
    users: dict[int, list[int]] = {}
    for i, op in enumerate(b.ops):
        for v in dict.fromkeys(op.ins):
            users.setdefault(v, []).append(i)
    graph = Graph(b.ops, b.shapes, b.deps, b.itemsizes, params, outs, producer, users, {})
    _views(graph)
    return graph
