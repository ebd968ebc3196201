"""The one-line reasons of an inferred plan: what each group does, and what the
pairings it was chosen over would move (:mod:`jtp.parallel.infer.choice`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from jtp.parallel.infer.choice import Choice, cost
from jtp.parallel.infer.dataflow import ELEMENTWISE, REDUCTIONS, Graph
from jtp.parallel.infer.pairing import Group, Layer, Why, esc

_STEP_PRIMS = ELEMENTWISE | REDUCTIONS | {"stack", "concatenate"}
_MAX_STEPS = 6  # ops named in an explanation


def _steps(g: Graph, trail: list) -> list[str]:
    names: list[str] = []
    for i, r in trail:
        op = g.ops[i]
        if r.event == "heads":
            split = next(s for s in r.outs if s is not None)
            name = f"a reshape into {g.shapes[op.outs[0]][split.dim]} heads"
        elif r.event == "matmul":
            name = "batched matmul"
        elif op.scope:
            name = op.scope[-1].strip("_")
        elif op.prim in _STEP_PRIMS and r.event is None:
            name = op.prim
        else:
            continue
        if name not in names:
            names.append(name)
    # Heads, named functions (silu, gelu, ...) and attention matmuls first; bare primitives
    # after them.
    return sorted(names, key=lambda n: n in _STEP_PRIMS)


def explain_group(m: str, style: str, group: Group, layers: Mapping[str, Layer], g: Graph) -> Why:
    cols = [x for x, s in group.assign.items() if s == "column"]
    rows = [x for x, s in group.assign.items() if s == "row" and not layers[x].embed]
    # {0}: the columns, {1}: the rows, {2}: the columns but this one (lists: named once each)
    refs = (tuple(cols), tuple(rows), tuple(c for c in cols if c != m))
    steps = _steps(g, group.trail)
    steps = steps[:_MAX_STEPS] + (["..."] if len(steps) > _MAX_STEPS else [])
    through = f" through {', '.join(esc(s) for s in steps)}" if steps else ""
    heads = f"; whole heads: the tensor size must divide {group.heads}" if group.heads else ""
    if layers[m].embed:
        shape = group.lookup_shape
        text = (
            "row (vocabulary rows): an embedding lookup; each device looks up the ids its "
            f"rows hold and one all-reduce of the {shape} result sums them"
        )
        if group.tied:
            out, inner = group.head
            text += (
                f"; its transposed use (tied output projection, {inner} -> {out}) "
                f"makes logits split on the vocabulary, whose split {group.end}"
            )
        return Why(text, refs)
    if style == "row":
        shape = group.pair_shapes[m]
        return Why(
            f"row: contracts the split output of {{0}}; one all-reduce of its "
            f"{shape} result{heads}",
            refs,
        )
    partners = " (with {2})" if refs[2] else ""
    if not rows:
        out, inner = group.head
        through = f" ({through.strip()})" if through else ""
        return Why(
            f"column: a projection to a larger output ({inner} -> {out} features), a "
            f"vocabulary head whose split result {group.end}{through}{partners}{heads}",
            refs,
        )
    return Why(
        f"column: its output stays split{through} into {{1}} (row){partners}{heads}",
        refs,
    )


def _pairing(groups: Sequence[Group]) -> tuple[str, tuple[tuple[str, ...], ...]]:
    """``"{0} (column) -> {1} (row)"`` and its refs: groups in one phrase."""
    cols = tuple(m for g in groups for m, s in g.assign.items() if s == "column")
    rows = tuple(m for g in groups for m, s in g.assign.items() if s == "row")
    parts = [f"{{{n}}} ({s})" for n, s in enumerate(("column", "row")[: 1 + bool(rows)])]
    if not cols:  # an embedding alone
        return "{0} (row)", (rows,)
    return " -> ".join(parts), (cols, rows) if rows else (cols,)


def _bytes(forward: int, backward: int) -> str:
    return f"{forward:,} B forward + {backward:,} B backward"


def _ratio(found: Sequence[Group], other: Sequence[int], chosen: Sequence[int]) -> str:
    """How plan ``other`` compares with ``chosen``: its bytes relative to the chosen one's,
    or, when they move as much, what decided (:func:`jtp.parallel.infer.choice.choose`)."""
    theirs, mine = sum(cost(found, other)), sum(cost(found, chosen))
    if theirs != mine:
        return f"{theirs / mine:.1f}x" if mine else "where the chosen one moves nothing"

    def heads(plan: Sequence[int]) -> float:
        return math.gcd(*(found[k].heads or 0 for k in plan)) or math.inf

    if heads(other) != heads(chosen):
        return f"as many bytes, but whole heads limit the tensor size to {heads(other)}"
    if sum(found[k].sharded for k in other) != sum(found[k].sharded for k in chosen):
        return "as many bytes, but fewer parameters split"
    return "as many bytes; the chosen pairing comes first in the program"


def chosen_over(why: Why, k: int, found: Sequence[Group], choice: Choice) -> Why:
    """``why``, and what the pairings this group beat would move, when there are any."""
    others = sorted(choice.conflicts[k] - set(choice.chosen))
    if not others:
        return why
    mine = cost(found, choice.best_with[k])
    text = f"; the cheapest pairing of these layers, all-reducing {_bytes(*mine)}"
    refs: tuple = ()
    plans: dict[tuple[int, ...], list[int]] = {}  # each other plan, by the groups it swaps in
    for o in others:
        plans.setdefault(choice.best_with[o], []).append(o)
    for plan, swapped in plans.items():
        phrase, more = _pairing([found[o] for o in swapped])
        phrase = phrase.format(*("{" + str(len(refs) + n) + "}" for n in range(len(more))))
        text += (
            f"; {phrase} instead would all-reduce {_bytes(*cost(found, plan))} "
            f"({_ratio(found, plan, choice.best_with[k])})"
        )
        refs += more
    return why.then(text, refs)


def left_out(m: str, found: Sequence[Group], choice: Choice) -> Why | None:
    """Why layer ``m``, which a valid group holds, is replicated: that group's plan moves
    more than the chosen one; ``None`` when no group holds it."""
    mine = [k for k in range(len(found)) if m in found[k].assign]
    if not mine:
        return None
    k = min(mine, key=lambda k: (sum(cost(found, choice.best_with[k])), k))
    phrase, refs = _pairing([found[k]])
    theirs = cost(found, choice.best_with[k])
    chosen = [c for c in choice.chosen if c in choice.component[k]]
    text = (
        f"replicated: it pairs as {phrase}, but the cheapest plan with that pairing "
        f"all-reduces {_bytes(*theirs)}, against {_bytes(*cost(found, chosen))} for the "
        f"chosen one ({_ratio(found, choice.best_with[k], chosen)})"
    )
    return Why(text, refs)
