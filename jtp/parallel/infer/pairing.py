"""Growing column -> row groups over a traced forward: the search behind :func:`jtp.infer_plan`.

A *group* starts from one layer (a column layer; an embedding as a row layer) and takes in
what its split needs: a pass over the program (:mod:`jtp.parallel.infer.dataflow`) moves the
split of every member's parameters through each op (:mod:`jtp.parallel.infer.split_rules`); when
an op asks for a whole operand to be split too, :meth:`Search.join` finds the layer that
makes it (the other branch of a gate or attention's keys and values: a column layer, found
by :func:`jtp.parallel.infer.dims.column_source`; the parameter of a contraction: a row layer),
adds it, and the pass runs again. The group is kept when its splits end in row layers (one
all-reduce each), in an embedding lookup, or, for a lone column layer projecting to a larger
output, in the forward's result; anything else is a :class:`Why` the layer stays replicated.
Each group is grown alone (:meth:`Search.candidates`) and counts the bytes it all-reduces;
which of overlapping groups make the plan is :mod:`jtp.parallel.infer.choice`'s decision.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Mapping

from jtp.parallel.infer.dataflow import PARAM, Graph
from jtp.parallel.infer.dims import column_source
from jtp.parallel.infer.split_rules import Moved, Need, Split, Stop, propagate


@dataclasses.dataclass(frozen=True)
class Why:
    """A reason whose module mentions are filled in once the plan keys are known."""

    text: str  # with "{0}", "{1}", ... for the modules in refs
    refs: tuple[str | tuple[str, ...], ...] = ()  # a module, or a list of them

    def render(self, label: Callable[[str], str]) -> str:
        def one(r: str | tuple[str, ...]) -> str:  # a list names each key once
            return label(r) if isinstance(r, str) else ", ".join(dict.fromkeys(map(label, r)))

        return self.text.format(*(one(r) for r in self.refs))

    def then(self, text: str, refs: tuple = ()) -> Why:
        """This reason followed by ``text``, whose ``{0}``, ``{1}``, ... name ``refs``."""
        shifted = text.format(*("{" + str(len(self.refs) + k) + "}" for k in range(len(refs))))
        return Why(self.text + shifted, self.refs + tuple(refs))


def esc(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


@dataclasses.dataclass
class Layer:
    """A module with a column/row layout, as the search sees it."""

    embed: bool  # an nnx.Embed: tried as a row layer (vocabulary rows)
    splits: dict[str, dict[str, int] | str]  # style -> {param path: tensor dim} or why none


@dataclasses.dataclass
class Group:
    assign: dict[str, str]  # layer path -> "column" / "row"
    heads: int | None  # whole heads the split falls on (None: no reshape into heads)
    trail: list[tuple[int, Moved]]  # (op index, what it did) of every op the split crossed
    pair_shapes: dict[str, tuple[int, ...]]  # row layer -> shape of its all-reduced result
    lookup_shape: tuple[int, ...] | None
    head: tuple[int, int] | None  # (out, in) of a lone column head
    end: str | None  # where a lone head's split ends: "is returned as output 0 ...", ...
    tied: bool  # an embedding whose table also makes split logits
    copied: dict[str, int]  # layers whose heads are repeated and sliced -> op index of use
    forward: int  # bytes all-reduced per forward: each row layer's (and lookup's) result
    backward: int  # ... per backward: the gradient of each column layer's input
    sharded: int  # bytes of the parameters it splits

    @property
    def footprint(self) -> frozenset[str]:
        """The layers this group decides: its members and the layers whose copies it slices."""
        return frozenset(self.assign) | frozenset(self.copied)


class Search:
    """Groups over ``graph``'s candidate ``layers`` (``owner``: parameter -> layer path)."""

    def __init__(self, graph: Graph, layers: Mapping[str, Layer], owner: Mapping[str, str]):
        self.g, self.owner = graph, owner
        first: dict[str, int] = {}  # each layer's first use: layers are tried in program order
        for i, op in enumerate(graph.ops):
            for v in op.ins if op.prim in ("dot_general", "gather") else ():
                if v in graph.views:
                    first.setdefault(self.owner.get(graph.views[v][0], ""), i)
        self.layers = dict(sorted(layers.items(), key=lambda kv: first.get(kv[0], len(graph.ops))))
        self.value_of = {path: v for v, path in graph.params.items()}

    def seeds(self, assign: Mapping[str, str]) -> dict[int, Split]:
        out = {}
        for m, style in assign.items():
            for param, dim in self.layers[m].splits[style].items():
                v = self.value_of[param]
                out[v] = Split(dim, self.g.shapes[v][dim])
        return out

    def run(self, seeds: dict[int, Split], allow_reduce: bool, sliced: set[int]) -> tuple:
        """One pass, in program order, over the ops the split reaches (a heap of pending op
        indices: only the region is visited); ``(blocked, states, trail)``."""
        states, trail, g = dict(seeds), [], self.g
        queued = {i for v in seeds for i in g.users.get(v, ())}
        pending = sorted(queued)  # users come after their operands' makers: one visit each
        while pending:
            i = heapq.heappop(pending)
            op = g.ops[i]
            r = propagate(op, [states.get(v) for v in op.ins], g, sliced)
            if isinstance(r, Moved) and r.event == "reduce" and not allow_reduce:
                r = Stop(
                    "is reduced over the split axis (a norm, softmax or mean over the "
                    "split features)"
                )
            if not isinstance(r, Moved):
                return (i, r), states, trail
            for v, s in zip(op.outs, r.outs, strict=True):
                if s is not None:
                    states[v] = s
                    for j in g.users.get(v, ()):
                        if j not in queued:
                            queued.add(j)
                            heapq.heappush(pending, j)
            trail.append((i, r))
        return None, states, trail

    def at(self, i: int) -> str:
        op = self.g.ops[i]
        scope = f" in {'/'.join(op.scope)}" if op.scope else ""
        return esc(f"{op.prim} at {op.where}{scope}")

    def grow(self, start: dict[str, str]) -> Group | Why:
        assign, sliced, copied = dict(start), set(), {}
        for _ in range(2 * len(self.g.ops)):
            rows = any(s == "row" and not self.layers[m].embed for m, s in assign.items())
            blocked, states, trail = self.run(self.seeds(assign), not rows, sliced)
            if blocked is None:
                return self.finish(assign, states, trail, copied)
            i, r = blocked
            reduced = next((j for j, m in trail if m.event == "reduce"), None)
            if reduced is not None:  # allowed only at the very end of a lone head
                r, i = (
                    Stop(
                        "is reduced over the split axis (a norm, softmax or mean over the "
                        "split features)"
                    ),
                    reduced,
                )
            if isinstance(r, Stop):
                return Why(f"its split output {esc(r.reason)} ({self.at(i)})")
            joined = self.join(assign, r, i)
            if isinstance(joined, Why):
                return joined
            if isinstance(joined, tuple):
                assign[joined[0]] = joined[1]
            else:  # copies of heads: each device slices the ones it uses
                sliced.add(r.value)
                copied.setdefault(joined, i)
        raise AssertionError("a group grows by one layer or one sliced value per pass")

    def join(self, assign: Mapping[str, str], need: Need, i: int) -> tuple[str, str] | str | Why:
        """The layer (and style) that ``need`` asks to join the group, or why none can; or,
        when the needed value is a repeat of heads (``jnp.repeat``: jtp's Llama with
        ``kv_replicas``), the layer making them, which stays whole: each device slices the
        copies it uses, as :func:`jtp.plans.llama` does (a split of that layer would have to
        cut heads on a tensor axis wider than their count)."""
        views = self.g.views
        if need.contracted and need.value in views:
            style, (param, dims), at = "row", views[need.value], need.dim
        else:
            src = column_source(self.g, need.value, need.dim)
            if src is None and need.value in views:
                return Why(
                    f"its split output meets parameter {esc(views[need.value][0])}, "
                    f"which no layer splits with it ({self.at(i)})"
                )
            if src is None:
                what = "contracted with" if need.contracted else "combined with"
                return Why(
                    f"its split output is {what} a whole activation that no column layer "
                    f"makes ({self.at(i)})"
                )
            if src.repeat:
                maker = column_source(self.g, src.value, src.dim)
                layer = None if maker is None or maker.repeat else views[maker.value][0]
                if layer not in self.owner:
                    return Why(
                        f"its split output meets heads repeated from no layer ({self.at(i)})"
                    )
                return self.owner[layer]
            style, (param, dims), at = "column", views[src.value], src.dim
        m, pdim = self.owner.get(param), dims[at]
        if m is None:
            return Why(
                f"its split output meets parameter {esc(param)}, which belongs to no "
                f"layer with a column/row layout ({self.at(i)})"
            )
        taken = assign.get(m)
        if taken is not None or (style == "column" and self.layers[m].embed):
            role = f"a {taken} layer in this group" if taken else "an embedding"
            return Why(
                f"its split output needs {{0}} as a {style} layer, but it is {role} ({self.at(i)})",
                (m,),
            )
        split = self.layers[m].splits[style]
        if isinstance(split, str):
            return Why(
                f"its split output needs {{0}} as a {style} layer, which it cannot be: "
                f"{esc(split)}",
                (m,),
            )
        if split.get(param) != pdim:
            return Why(
                f"its split output meets {{0}} on dimension {pdim} of {esc(param)}, which "
                f"its {style} layout does not split ({self.at(i)})",
                (m,),
            )
        return m, style

    def finish(
        self, assign: dict[str, str], states: dict, trail: list, copied: dict[str, int]
    ) -> Group | Why:
        g, views = self.g, self.g.views
        pairs: dict[str, tuple[int, ...]] = {}  # row layer -> its largest all-reduced result
        for i, r in trail:
            if r.event == "pair":
                m, shape = self.owner[views[r.value][0]], g.shapes[g.ops[i].outs[0]]
                if math.prod(shape) > math.prod(pairs.get(m, ())):
                    pairs[m] = shape
        lookups = [g.shapes[g.ops[i].outs[0]] for i, r in trail if r.event == "lookup"]
        ends = [
            f"is returned as output {n} of the forward"
            for n, v in enumerate(g.outputs)
            if v in states
        ] + [f"is reduced over by {self.at(i)}" for i, r in trail if r.event == "reduce"]
        rows = [m for m, s in assign.items() if s == "row" and not self.layers[m].embed]
        for m in rows:
            if m not in pairs:
                return Why("row layer {0} gets no split input", (m,))
        for m in pairs:
            if m not in rows:
                return Why("the split parameter of {0} is contracted as a row layer's", (m,))
        head = None
        if pairs and ends:
            return Why(f"its split output also {esc(ends[0])}, besides reaching its row layer")
        if not pairs and ends:
            for i, r in trail:
                if r.event == "column":
                    out, inner = matmul_sizes(g, i, r.value, states[r.value].dim)
                    if out <= inner:
                        return Why(
                            f"its split output reaches no row layer: it {esc(ends[0])}; only "
                            f"a projection to a larger output is split alone (a vocabulary "
                            f"head), and this one maps {inner} features to {out}"
                        )
                    head = (out, inner)
        elif not pairs and not lookups:
            return Why("its split output reaches no row layer")
        blocks = [s.blocks for s in states.values()]
        heads = math.gcd(*blocks) if any(r.event == "heads" for _, r in trail) else None
        lookup = lookups[0] if lookups else None
        end = ends[0] if ends and not pairs else None
        tied = bool(lookups and head)
        # Bytes XLA all-reduces: forward, each row matmul's (and lookup's) result; backward,
        # the gradient of each column matmul's input unless no parameter made it (q, k and v
        # each: XLA reduces them before adding); a scan body's ops once per trip.
        forward = sum(
            g.nbytes(g.ops[i].outs[0]) * g.ops[i].trips
            for i, r in trail
            if r.event in ("pair", "lookup")
        )
        backward = sum(
            g.nbytes(u) * g.ops[i].trips
            for i, r in trail
            if r.event == "column"
            for u in g.ops[i].ins[:2]
            if u != r.value and g.deps[u] & PARAM
        )
        sharded = sum(
            g.nbytes(self.value_of[p]) for m, s in assign.items() for p in self.layers[m].splits[s]
        )
        return Group(
            assign, heads, trail, pairs, lookup, head, end, tied, copied, forward, backward, sharded
        )

    def candidates(self) -> tuple[list[Group], dict[str, Why]]:
        """Every group one layer starts (a column layer; an embedding as a row layer), each
        grown alone, in program order, and why each layer that starts none cannot."""
        found: list[Group] = []
        whys: dict[str, Why] = {}
        seen: set[frozenset] = set()
        columns: set[str] = set()
        for m, layer in self.layers.items():
            if m in columns:  # its split is that group's: growing from it finds the same
                continue
            start = "row" if layer.embed else "column"
            if isinstance(layer.splits[start], str):
                whys[m] = Why(f"replicated: no {start} layout: {esc(layer.splits[start])}")
                continue
            grown = self.grow({m: start})
            if isinstance(grown, Why):
                what = "an embedding split on its rows" if layer.embed else "a column layer"
                whys[m] = Why(f"replicated: as {what}, {grown.text}", grown.refs)
                continue
            key = frozenset(grown.assign.items())
            if key not in seen:
                seen.add(key)
                found.append(grown)
                columns |= {x for x, s in grown.assign.items() if s == "column"}
        return found, whys


def matmul_sizes(g: Graph, i: int, param: int, dim: int) -> tuple[int, int]:
    """(split output size, contracted size) of the parameter's side of matmul ``i`` (a
    convolution contracts input channels and the window)."""
    op = g.ops[i]
    if op.prim == "conv_general_dilated":
        contract = op.params["dimension_numbers"][1][1:]
    else:
        (lc, rc), _ = op.params["dimension_numbers"]
        contract = lc if op.ins[0] == param else rc
    shape = g.shapes[param]
    return shape[dim], math.prod(shape[c] for c in contract)
