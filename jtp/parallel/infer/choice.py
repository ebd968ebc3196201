"""Choosing among the valid groups: the plan :func:`jtp.infer_plan` returns.

Each layer can start a group (:meth:`jtp.parallel.infer.pairing.Search.candidates`), and groups
may overlap: on a residual stream, ``up`` can pair with its block's ``down`` (one
all-reduce of the ``d``-wide stream per block), or the stream itself can stay split from
``inp`` through every ``down`` to the ``ups`` and ``head`` (an all-reduce of each block's
``8d``-wide hidden activation). A plan is a set of groups no two of which decide the same
layer, and a *complete* one: no group left out could be added (every layer that can be
split in it is). Among complete plans the cheapest is chosen: the fewest bytes all-reduced
per forward and backward (:attr:`~jtp.parallel.infer.pairing.Group.forward` / ``backward``), then
the most heads kept whole (the largest tensor size the plan allows: q and o split on 8 query
heads rather than q, k and o on 4 kv heads), then the most parameter bytes split, then
program order.

Groups only conflict with groups sharing a layer, so each connected set of conflicting
groups is solved alone (in jtp's Llama every group stands alone: nothing to choose). Inside
one, a dynamic program over the groups in program order (:func:`_best`) whose state is the
groups still open (taken ones a later group conflicts with; left-out ones still waiting for
a taken group to decide them): exact, and small along chains of pairs and residual streams,
where a group conflicts with its neighbours only (or a stream's group with every block's).
Past ``max_states`` open states a component gets the greedy plan (each group in program
order that fits), which is what jtp.infer_plan chose before it compared costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from jtp.parallel.infer.pairing import Group
from jtp.parallel.styles import ColwiseParallel, ParallelStyle, RowwiseParallel

STYLES = {"column": ColwiseParallel, "row": RowwiseParallel}


@dataclasses.dataclass(frozen=True)
class Choice:
    chosen: tuple[int, ...]  # indices of the chosen groups
    # group index -> the group indices of the cheapest complete plan of its component that
    # holds it (the chosen ones for a chosen group)
    best_with: dict[int, tuple[int, ...]]
    component: dict[int, tuple[int, ...]]  # group index -> its component's group indices
    conflicts: dict[int, set[int]]  # group index -> the groups sharing a layer with it


@dataclasses.dataclass(frozen=True)
class PlanCost:
    """Bytes a plan all-reduces over ``"tensor"`` per forward and per backward, each
    activation counted whole (on a mesh whose ``"data"`` axis splits the batch, a device
    moves that over the data size), read off the traced program: each row matmul's result
    (and each vocabulary-split lookup's) forward; the gradient of each column matmul's input
    (made by a parameter) backward; a scan body's ops once per trip."""

    forward: int
    backward: int
    styles: Mapping[str, ParallelStyle]  # module path -> style: the plan, one key a layer

    @property
    def total(self) -> int:
        return self.forward + self.backward


def cost(groups: Sequence[Group], members: Sequence[int]) -> tuple[int, int]:
    """(forward, backward) bytes of the groups ``members``."""
    return (sum(groups[k].forward for k in members), sum(groups[k].backward for k in members))


def _best(
    groups: Sequence[Group],
    nodes: Sequence[int],
    conflicts: dict[int, set[int]],
    forced: int | None,
    max_states: int,
) -> tuple[int, ...]:
    """The cheapest complete plan over ``nodes`` (in program order) that holds ``forced``.

    A dynamic program over ``nodes`` in order. A group only matters to the groups it
    conflicts with, so the state after each step is the groups still *open*: taken ones a
    later group conflicts with, and left-out ones no taken group decides yet (a later one
    must, or the plan is incomplete). Along a chain of pairs (or a residual stream against
    its blocks) few groups are open at once; past ``max_states`` states the greedy plan
    (each group in program order that fits) is returned instead.
    """
    pos = {k: i for i, k in enumerate(nodes)}
    last = {k: max([pos[c] for c in conflicts[k]] + [pos[k]]) for k in nodes}
    banned = conflicts[forced] if forced is not None else set()

    def key(value: tuple) -> tuple:  # fewest bytes, most whole heads, most split, earliest
        total, heads, sharded, members = value
        return total, -(heads or math.inf), -sharded, members

    # state: frozenset of (group, taken?) for the open groups -> (bytes, gcd of heads,
    # parameter bytes split, members) of the best partial plan reaching it
    states: dict[frozenset, tuple] = {frozenset(): (0, 0, 0, ())}
    for i, k in enumerate(nodes):
        g, new = groups[k], {}
        for state, (total, heads, sharded, members) in states.items():
            taken = {a for a, t in state if t}
            options = []
            if not conflicts[k] & taken and k not in banned:
                opened = {a: t for a, t in state if not (not t and a in conflicts[k])}
                value = (
                    total + g.forward + g.backward,
                    math.gcd(heads, g.heads or 0),
                    sharded + g.sharded,
                    (*members, k),
                )
                options.append(({**opened, k: True}, value))
            if k != forced:
                opened = dict(state)
                if not conflicts[k] & taken:  # left out: a later group must decide it
                    opened[k] = False
                options.append((opened, (total, heads, sharded, members)))
            for opened, value in options:
                closing = [a for a in opened if last[a] <= i]
                if any(not opened[a] for a in closing):  # left out, and nothing decides it
                    continue
                after = frozenset((a, t) for a, t in opened.items() if last[a] > i)
                if after not in new or key(value) < key(new[after]):
                    new[after] = value
        if len(new) > max_states:
            return _greedy(nodes, conflicts, forced)
        states = new
    return states[frozenset()][3] if frozenset() in states else _greedy(nodes, conflicts, forced)


def _greedy(nodes: Sequence[int], conflicts: dict[int, set[int]], forced: int | None) -> tuple:
    taken: list[int] = [] if forced is None else [forced]
    for k in nodes:
        if k != forced and not conflicts[k] & set(taken):
            taken.append(k)
    return tuple(sorted(taken))


def choose(groups: Sequence[Group], max_states: int = 4096) -> Choice:
    """The cheapest complete plan over ``groups`` (in program order), and, for each group
    left out, the cheapest complete plan that would hold it."""
    n = len(groups)
    conflicts = {
        a: {b for b in range(n) if b != a and groups[a].footprint & groups[b].footprint}
        for a in range(n)
    }
    component: dict[int, tuple[int, ...]] = {}
    for a in range(n):
        if a in component:
            continue
        seen, todo = {a}, [a]
        while todo:
            for b in conflicts[todo.pop()] - seen:
                seen.add(b)
                todo.append(b)
        members = tuple(sorted(seen))
        component.update(dict.fromkeys(members, members))
    chosen: list[int] = []
    best_with: dict[int, tuple[int, ...]] = {}
    for members in dict.fromkeys(component.values()):
        if len(members) == 1:
            chosen += members
            best_with[members[0]] = members
            continue
        plan = _best(groups, members, conflicts, None, max_states)
        chosen += plan
        for k in members:
            best_with[k] = plan if k in plan else _best(groups, members, conflicts, k, max_states)
    return Choice(tuple(sorted(chosen)), best_with, component, conflicts)


def whole_plan(choice: Choice, k: int) -> tuple[int, ...]:
    """The whole plan: the cheapest one holding group ``k`` in its component, the chosen
    groups elsewhere."""
    inside = set(choice.component[k])
    return tuple(sorted({*choice.best_with[k], *(c for c in choice.chosen if c not in inside)}))


def plan_cost(found: Sequence[Group], plan: Sequence[int]) -> PlanCost:
    forward, backward = cost(found, plan)
    styles = {m: STYLES[s](heads=found[k].heads) for k in plan for m, s in found[k].assign.items()}
    return PlanCost(forward, backward, styles)
