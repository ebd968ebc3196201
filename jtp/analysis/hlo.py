"""Reading XLA's HLO text: element types and sizes, operand lists, replica groups.

Pure text parsing with no jax dependency, so every format XLA prints (explicit groups,
iota groups, Shardy's mesh groups, tuple and async types) is unit-tested on strings.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

# Bytes per element as XLA lays arrays out in memory: sub-byte types (s4, f4e2m1fn, ...) take
# a byte each unless a layout packs them, which a per-device byte count can ignore.
_DTYPE_BYTES = {
    "pred": 1,
    "s1": 1,
    "u1": 1,
    "s2": 1,
    "u2": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "token": 0,
    "f8e5m2": 1,
    "f8e4m3": 1,
    "f8e4m3fn": 1,
    "f8e4m3b11fnuz": 1,
    "f8e5m2fnuz": 1,
    "f8e4m3fnuz": 1,
    "f8e3m4": 1,
    "f8e8m0fnu": 1,
    "f4e2m1fn": 1,
}
_TYPE_TOKEN = re.compile(r"\(|\)|([a-z][a-z0-9]*)\[([<=\d,]*)\]")
_TYPE_NOISE = re.compile(r"/\*.*?\*/|\{[^{}]*\}")  # `/*index=5*/` comments and layouts
_IOTA = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(.*?)\s*\{([^}]*)\}")
_LIST_GROUPS = re.compile(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,\s]*\},?\s*)*)\}")


def close_paren(text: str, i: int) -> int:
    """Index of the parenthesis closing the one at ``text[i]``."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return j
    raise ValueError(f"unbalanced parentheses in HLO: {text!r}")


def parse_type(text: str) -> Any:
    """``f32[8]{0}`` -> ("f32", (8,)); tuples -> nested lists (layouts and comments dropped)."""
    stack: list[list[Any]] = [[]]
    for tok in _TYPE_TOKEN.finditer(_TYPE_NOISE.sub("", text)):
        if tok.group() == "(":
            stack.append([])
        elif tok.group() == ")":
            done = stack.pop()
            stack[-1].append(done)
        else:
            dims = tuple(int(d.removeprefix("<=")) for d in tok.group(2).split(",") if d)
            stack[-1].append((tok.group(1), dims))  # a dynamic dim `<=n` counts its bound
    return stack[0][0] if stack[0] else []


def type_leaves(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [x for t in tree for x in type_leaves(t)] if isinstance(tree, list) else [tree]


def dtype_bytes(dtype: str) -> int:
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    if dtype[:2] in ("f4", "f6", "f8"):  # a newer narrow float: a byte per element
        return 1
    raise ValueError(f"unknown HLO element type {dtype!r}")


def _iota(spec: str) -> np.ndarray:
    """``[a,b]<=[d0,d1]T(perm)``: iota over dims, transposed by perm, reshaped to (a, b)."""
    m = _IOTA.fullmatch(spec.strip())
    if not m:
        raise ValueError(f"cannot parse iota device list {spec!r}")
    out, dims = ([int(x) for x in m.group(i).split(",")] for i in (1, 2))
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    perm = [int(x) for x in m.group(3).split(",")] if m.group(3) else None
    return (ids.transpose(perm) if perm else ids).reshape(out)


def _mesh_groups(mesh: str, selected: str) -> np.ndarray:
    """Shardy's ``mesh['a'=2,'b'=4] {'b'}``: the (device_ids, default iota) array reshaped to
    the mesh, grouped axes moved last; a sub-axis ``'a':(pre)size`` splits its axis first."""
    ids_m = re.search(r"device_ids=\((.*)\)", mesh)
    ids = ids_m.group(1) if ids_m else ""
    sizes = mesh[: ids_m.start()] if ids_m else mesh
    dims = [(n, int(s)) for n, s in re.findall(r"'?([A-Za-z_][^',=\s\]]*)'?=(\d+)", sizes)]
    refs = re.findall(r"'?([^',:\s]+)'?(?::\((\d+)\)(\d+))?", selected)
    if not dims or {n for n, _, _ in refs} - {n for n, _ in dims}:
        raise ValueError(f"cannot parse replica groups mesh[{mesh} {{{selected}}}")
    reshape: list[int] = []
    grouped: list[int] = []
    for name, size in dims:
        mine = [(int(p or 1), int(s or size), k) for k, (n, p, s) in enumerate(refs) if n == name]
        where, prod = {}, 1
        for pre, sub, k in sorted(mine):
            if pre != prod:  # an ungrouped stretch of this axis before the sub-axis
                reshape.append(pre // prod)
                prod = pre
            where[k] = len(reshape)
            reshape.append(sub)
            prod *= sub
        if prod != size:
            reshape.append(size // prod)
        grouped += [where[k] for _, _, k in mine]
    if not ids:
        flat = np.arange(int(np.prod([s for _, s in dims])))
    else:
        flat = _iota(ids).ravel() if "<=" in ids else np.array(re.findall(r"\d+", ids), int)
    rest = [a for a in range(len(reshape)) if a not in grouped]
    size = int(np.prod([reshape[a] for a in grouped]))
    return flat.reshape(reshape).transpose(rest + grouped).reshape(-1, size)


def parse_groups(attrs: str) -> tuple[tuple[int, ...], ...]:
    """Device groups of an op from ``replica_groups`` (explicit ``{{0,1},{2,3}}``, iota
    ``[2,4]<=[8]`` / ``[4,2]<=[2,4]T(1,0)``, or Shardy's ``mesh[...] {...}``) or, for a
    collective-permute, ``source_target_pairs`` (each pair a group). ``()`` if empty."""
    if m := _MESH_GROUPS.search(attrs):
        rows = _mesh_groups(m.group(1), m.group(2))
    elif m := re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", attrs):
        rows = _iota(m.group(1))
        rows = rows.reshape(rows.shape[0], -1)
    elif m := _LIST_GROUPS.search(attrs):
        rows = [re.findall(r"\d+", g) for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    else:
        return ()
    return tuple(tuple(int(i) for i in row) for row in rows)


_COMPUTATION_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEES = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def computation_trips(text: str) -> dict[str, int]:
    """How many times each HLO computation runs per execution of the program.

    ENTRY runs once; a while loop's body runs its ``known_trip_count`` times (its condition
    once more); every other callee (fusions, branches, reductions) as often as its caller.
    A loop without a known trip count counts once (XLA annotates every loop ``jax.lax.scan``
    or ``fori_loop`` with static bounds produces).
    """
    calls: dict[str, list[tuple[str, int]]] = {}
    entry, current = "", ""
    for line in text.splitlines():
        if head := _COMPUTATION_HEAD.match(line):
            current = head.group(2)
            calls.setdefault(current, [])
            entry = current if head.group(1) else entry
            continue
        if not current:
            continue
        trip = _TRIP_COUNT.search(line) if " while(" in line else None
        n = int(trip.group(1)) if trip else 1
        for role, callee in _CALLEES.findall(line):
            calls[current].append((callee, n + 1 if role == "condition" and trip else n))
        for group in _BRANCHES.findall(line):
            calls[current] += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]
    trips: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        trips[name] = trips.get(name, 0) + times
        for callee, n in calls.get(name, ()):
            visit(callee, times * n)

    if entry:
        visit(entry, 1)
    return trips
