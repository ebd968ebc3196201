"""What a compiled step communicates: every collective of its HLO, by kind, axes and bytes.

Claims about communication and memory are read off the program XLA will actually run
(``jax.jit(f).lower(...).compile()``), never assumed.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# Bytes per element as XLA lays arrays out in memory: sub-byte types (s4, f4e2m1fn, ...) take
# a byte each unless a layout packs them, which a per-device byte count can ignore.
_DTYPE_BYTES = {
    "pred": 1, "s1": 1, "u1": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0,
    "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fn": 1, "f8e4m3b11fnuz": 1, "f8e5m2fnuz": 1,
    "f8e4m3fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 1,
}  # fmt: skip
_OP = re.compile(r"(" + "|".join(KINDS) + r")(-start)?\(")
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")  # `  ROOT %name = `
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # `%body (p: ...) -> ... {`
_TYPE_TOKEN = re.compile(r"\(|\)|([a-z][a-z0-9]*)\[([<=\d,]*)\]")
_TYPE_NOISE = re.compile(r"/\*.*?\*/|\{[^{}]*\}")  # `/*index=5*/` comments and layouts
_IOTA = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(.*?)\s*\{([^}]*)\}")
_LIST_GROUPS = re.compile(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,\s]*\},?\s*)*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program: a *static* occurrence in its HLO text.

    ``bytes`` is the per-device size of the full, un-scattered buffer: the result of an
    all-reduce / all-gather / all-to-all / collective-permute, the operand of a reduce-scatter
    (its result times the group size); a combined (tuple) op sums its buffers. An async
    ``*-start``/``*-done`` pair is one record, read from the start. An op inside a while body
    or any called computation appears once whatever the trip count: multiply by hand.
    """

    kind: str  # one of KINDS
    bytes: int
    dtype: str  # element type(s) of the counted buffers: "f32", or "f32,bf16" for a mixed tuple
    groups: tuple[tuple[int, ...], ...]  # device positions in the program's device assignment
    axes: tuple[str, ...] | None  # mesh axes the groups vary over (None without a mesh)
    op_name: str = ""  # jax's name for the op that caused it (HLO metadata), e.g. a param path
    shapes: tuple[tuple[int, ...], ...] = ()  # the counted buffers' shapes
    computation: str = ""  # enclosing HLO computation (a loop body is not the ENTRY one)
    instruction: str = ""  # HLO instruction name


def _close(text: str, i: int) -> int:
    """Index of the parenthesis closing the one at ``text[i]``."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return j
    raise ValueError(f"unbalanced parentheses in HLO: {text!r}")


def _parse_type(text: str) -> Any:
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


def _leaves(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [x for t in tree for x in _leaves(t)] if isinstance(tree, list) else [tree]


def _dtype_bytes(dtype: str) -> int:
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


def _axes(
    groups: tuple[tuple[int, ...], ...], mesh: Mesh, assignment: Sequence[Any] | None
) -> tuple[str, ...]:
    """Mesh axes along which the members of some group differ.

    HLO numbers devices by position in the program's device assignment. With ``assignment``
    (the compiled program's devices) a position maps to a device and the device to its place
    in ``mesh``; without it position i is taken as ``mesh.devices.flat[i]``, which is what jit
    uses for a program over that one mesh. No groups means every device.
    """
    shape = mesh.devices.shape
    if not groups:
        return tuple(n for n, s in zip(mesh.axis_names, shape, strict=True) if s > 1)
    place = {d.id: np.unravel_index(k, shape) for k, d in enumerate(mesh.devices.flat)}
    varying: set[int] = set()
    for group in groups:
        if assignment is None:
            coords = np.array([np.unravel_index(i, shape) for i in group])
        else:
            missing = [assignment[i] for i in group if assignment[i].id not in place]
            if missing:
                raise ValueError(f"the program runs on {missing}, which are not in {mesh}")
            coords = np.array([place[assignment[i].id] for i in group])
        varying |= {a for a in range(len(shape)) if len(set(coords[:, a])) > 1}
    return tuple(mesh.axis_names[a] for a in sorted(varying))


def parse_hlo(
    text: str, mesh: Mesh | None = None, *, assignment: Sequence[Any] | None = None
) -> list[Collective]:
    """All collectives in HLO text, in text order (see :func:`collectives`).

    ``assignment``: the program's devices in HLO position order (default: ``mesh`` order).
    """
    m = re.search(r"num_partitions=(\d+)", text)
    n_devices = len(assignment) if assignment else int(m.group(1)) if m else None
    records, computation = [], ""
    for line in text.splitlines():
        if c := _COMPUTATION.match(line):
            computation = c.group(1)
        head = _HEAD.match(line) if _OP.search(line) else None
        if not head:
            continue
        # `<type> <opcode>(<operands>), <attrs>`: a tuple type is balanced parentheses, an
        # array type has no spaces; the opcode must come right after it.
        start = head.end()
        tuple_type = line.startswith("(", start)
        end = _close(line, start) + 1 if tuple_type else line.find(" ", start)
        op = _OP.match(line, end + 1) if end > start else None
        if not op:
            continue
        typ, attrs = line[start:end], line[_close(line, op.end() - 1) + 1 :]
        kind, tree = op.group(1), _parse_type(typ)
        if op.group(2) and kind != "all-reduce":
            tree = tree[1]  # async start returns (operands, results[, contexts])
        buffers = _leaves(tree)
        n_bytes = sum(_dtype_bytes(dt) * int(np.prod(dims)) for dt, dims in buffers)
        groups = parse_groups(attrs)
        if not groups and n_devices and kind != "collective-permute":
            groups = (tuple(range(n_devices)),)  # `replica_groups={}`: everyone
        if kind == "reduce-scatter":  # the result is 1/group of the operand, typed or not
            n_bytes *= len(groups[0]) if groups else 1
        name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attrs)
        records.append(
            Collective(
                kind=kind,
                bytes=n_bytes,
                dtype=",".join(dict.fromkeys(dt for dt, _ in buffers)),
                groups=groups,
                axes=_axes(groups, mesh, assignment) if mesh is not None else None,
                op_name=re.sub(r"\\(.)", r"\1", name.group(1)) if name else "",
                shapes=tuple(dims for _, dims in buffers),
                computation=computation,
                instruction=head.group(1),
            )
        )
    return records


def _device_assignment(compiled: Any) -> tuple[Any, ...] | None:
    """The compiled program's devices in HLO position order, or None if not exposed.

    jax keeps the exact list on the executable (private, so guarded); failing that, every
    sharding of a jit shares one device order, which for a NamedSharding is its mesh's flat
    order, so any NamedSharding among the program's in/out shardings gives it (public API).
    """
    try:
        return tuple(compiled._executable._unloaded_executable.device_list)
    except (AttributeError, TypeError):  # private: may be gone in another jax version
        pass
    leaves = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
    named = [s for s in leaves if isinstance(s, NamedSharding)]
    return tuple(named[0].mesh.devices.flat) if named else None


def collectives(compiled: Any, mesh: Mesh | None = None) -> list[Collective]:
    """Collectives of a compiled function (``jax.jit(f).lower(...).compile()``).

    With ``mesh`` each record names the mesh axes it runs over (``("tensor",)``,
    ``("data",)``, ...), mapping HLO device positions through the program's own device
    assignment to places in ``mesh``. Counts are static (a loop body's op appears once). On
    CPU, XLA may emit all-reduce + dynamic-slice where a GPU emits reduce-scatter: compare
    kinds with that in mind, and bytes always.
    """
    assignment = _device_assignment(compiled) if mesh is not None else None
    return parse_hlo(compiled.as_text(), mesh, assignment=assignment)


def format_collectives(records: Sequence[Collective]) -> str:
    """A compact table: kind, axes, bytes per op, count (identical ops folded)."""
    counts = Counter((r.kind, r.axes, r.bytes) for r in records)
    lines = [f"{'kind':<20}{'axes':<16}{'bytes':>14}{'count':>7}"]
    for (kind, axes, n), c in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[0][2])):
        lines.append(f"{kind:<20}{','.join(axes or ()) or '-':<16}{n:>14,}{c:>7}")
    return "\n".join(lines)


def total_bytes(
    records: Sequence[Collective],
    kind: str | None = None,
    axes: tuple[str, ...] | None = None,
    *,
    axis: str | None = None,
) -> int:
    """Sum of ``bytes``, optionally of one kind, exactly these ``axes``, or touching ``axis``."""
    return sum(
        r.bytes
        for r in records
        if (kind is None or r.kind == kind)
        and (axes is None or r.axes == tuple(axes))
        and (axis is None or axis in (r.axes or ()))
    )


def bytes_by_axes(records: Sequence[Collective]) -> dict[str, int]:
    """Bytes summed by the mesh axes they run over: ``{"tensor": ..., "data": ...,
    "data+tensor": ...}`` (``"-"`` for records without axes). The one grouping that bench,
    planner and docs use."""
    out: dict[str, int] = {}
    for r in records:
        key = "+".join(r.axes or ()) or "-"
        out[key] = out.get(key, 0) + r.bytes
    return out
