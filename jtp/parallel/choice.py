"""Choosing among the valid groups: the plan :func:`jtp.infer_plan` returns.

Each layer can start a group (:meth:`jtp.parallel.pairing.Search.candidates`), and groups
may overlap: on a residual stream, ``up`` can pair with its block's ``down`` (one
all-reduce of the ``d``-wide stream per block), or the stream itself can stay split from
``inp`` through every ``down`` to the ``ups`` and ``head`` (an all-reduce of each block's
``8d``-wide hidden activation). A plan is a set of groups no two of which decide the same
layer, and a *complete* one: no group left out could be added (every layer that can be
split in it is). Among complete plans the cheapest is chosen: the fewest bytes all-reduced
per forward and backward (:attr:`~jtp.parallel.pairing.Group.forward` / ``backward``), then
the most heads kept whole (the largest tensor size the plan allows: q and o split on 8 query
heads rather than q, k and o on 4 kv heads), then the most parameter bytes split, then
program order.

Groups only conflict with groups sharing a layer, so each connected set of conflicting
groups is solved alone (in jtp's Llama every group stands alone: nothing to choose). Inside
one, a branch and bound over include / exclude in program order (costs only grow as
groups are added, so a partial plan dearer than the best complete one is dropped), started
from the greedy plan (each group in program order that fits) as the first bound; past
``budget`` branches it keeps the best plan found so far, never worse than the greedy one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jtp.parallel.pairing import Group


@dataclasses.dataclass(frozen=True)
class Choice:
    chosen: tuple[int, ...]  # indices of the chosen groups
    # group index -> the group indices of the cheapest complete plan of its component that
    # holds it (the chosen ones for a chosen group)
    best_with: dict[int, tuple[int, ...]]
    component: dict[int, tuple[int, ...]]  # group index -> its component's group indices
    conflicts: dict[int, set[int]]  # group index -> the groups sharing a layer with it


def cost(groups: Sequence[Group], members: Sequence[int]) -> tuple[int, int]:
    """(forward, backward) bytes of the groups ``members``."""
    return (sum(groups[k].forward for k in members), sum(groups[k].backward for k in members))


def _best(
    groups: Sequence[Group], nodes: Sequence[int], conflicts: dict[int, set[int]],
    forced: int | None, budget: int,
) -> tuple[int, ...]:  # fmt: skip
    """The cheapest complete plan over ``nodes`` (sorted) that holds ``forced``."""

    def key(members: Sequence[int]) -> tuple:
        total = sum(groups[k].forward + groups[k].backward for k in members)
        heads = math.gcd(*(groups[k].heads or 0 for k in members)) or math.inf  # 0: no heads
        return total, -heads, -sum(groups[k].sharded for k in members), tuple(members)

    greedy: list[int] = [] if forced is None else [forced]
    for k in nodes:
        if k != forced and not conflicts[k] & set(greedy):
            greedy.append(k)
    best = [key(sorted(greedy))]
    steps = [0]
    excluded = {forced} if forced is not None else set()  # what conflicts with it cannot join

    def walk(i: int, taken: list[int], total: int) -> None:
        steps[0] += 1
        if total > best[0][0] or steps[0] > budget:
            return
        if i == len(nodes):
            left_out = (k for k in nodes if k not in taken)
            if all(conflicts[k] & set(taken) for k in left_out) and key(taken) < best[0]:
                best[0] = key(taken)
            return
        k = nodes[i]
        if k == forced or not conflicts[k] & (set(taken) | excluded):
            taken.append(k)
            walk(i + 1, taken, total + groups[k].forward + groups[k].backward)
            taken.pop()
            if k == forced:
                return
        # Left out: only if a group taken (or one still to come) decides one of its layers.
        if conflicts[k] & set(taken) or any(c > k for c in conflicts[k]):
            walk(i + 1, taken, total)

    walk(0, [], 0)
    members = best[0][-1]
    complete = all(k in members or conflicts[k] & set(members) for k in nodes)
    return members if complete else tuple(sorted(greedy))


def choose(groups: Sequence[Group], budget: int = 100_000) -> Choice:
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
        plan = _best(groups, members, conflicts, None, budget)
        chosen += plan
        for k in members:
            best_with[k] = plan if k in plan else _best(groups, members, conflicts, k, budget)
    return Choice(tuple(sorted(chosen)), best_with, component, conflicts)
