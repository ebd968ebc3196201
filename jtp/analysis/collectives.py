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

from jtp.analysis.hlo import (
    close_paren,
    computation_trips,
    dtype_bytes,
    parse_groups,
    parse_type,
    type_leaves,
)

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_OP = re.compile(r"(" + "|".join(KINDS) + r")(-start)?\(")
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")  # `  ROOT %name = `
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # `%body (p: ...) -> ... {`


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program: a *static* occurrence in its HLO text.

    ``bytes`` is per device and per *execution of the program*: the size of the full,
    un-scattered buffer (the result of an all-reduce / all-gather / all-to-all /
    collective-permute, the operand of a reduce-scatter, i.e. its result times the group
    size; a combined (tuple) op sums its buffers) times ``trips``, the number of times the
    computation holding it runs (a loop body's op runs once per trip). An async
    ``*-start``/``*-done`` pair is one record, read from the start.
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
    trips: int = 1  # executions per program run (a while body's trip count)

    @property
    def op_bytes(self) -> int:
        """Bytes of one execution of the op (``bytes / trips``)."""
        return self.bytes // self.trips


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
    trips = computation_trips(text)
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
        end = close_paren(line, start) + 1 if tuple_type else line.find(" ", start)
        op = _OP.match(line, end + 1) if end > start else None
        if not op:
            continue
        typ, attrs = line[start:end], line[close_paren(line, op.end() - 1) + 1 :]
        kind, tree = op.group(1), parse_type(typ)
        if op.group(2) and kind != "all-reduce":
            tree = tree[1]  # async start returns (operands, results[, contexts])
        buffers = type_leaves(tree)
        n_bytes = sum(dtype_bytes(dt) * int(np.prod(dims)) for dt, dims in buffers)
        groups = parse_groups(attrs)
        if not groups and n_devices and kind != "collective-permute":
            groups = (tuple(range(n_devices)),)  # `replica_groups={}`: everyone
        if kind == "reduce-scatter":  # the result is 1/group of the operand, typed or not
            n_bytes *= len(groups[0]) if groups else 1
        name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attrs)
        runs = trips.get(computation, 1)
        records.append(
            Collective(
                kind=kind,
                bytes=n_bytes * runs,
                dtype=",".join(dict.fromkeys(dt for dt, _ in buffers)),
                groups=groups,
                axes=_axes(groups, mesh, assignment) if mesh is not None else None,
                op_name=re.sub(r"\\(.)", r"\1", name.group(1)) if name else "",
                shapes=tuple(dims for _, dims in buffers),
                computation=computation,
                instruction=head.group(1),
                trips=runs,
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
    assignment to places in ``mesh``. Bytes are per execution of the program: an op in a
    loop body counts once per trip (``trips``). On
    CPU, XLA may emit all-reduce + dynamic-slice where a GPU emits reduce-scatter: compare
    kinds with that in mind, and bytes always.
    """
    assignment = _device_assignment(compiled) if mesh is not None else None
    return parse_hlo(compiled.as_text(), mesh, assignment=assignment)


def format_collectives(records: Sequence[Collective]) -> str:
    """A compact table: kind, axes, bytes per op execution, executions per program run
    (identical ops folded; an op in a loop counts once per trip)."""
    counts: Counter = Counter()
    for r in records:
        counts[(r.kind, r.axes, r.op_bytes)] += r.trips
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


def axes_key(record: Collective) -> str:
    """``"tensor"``, ``"data"``, ``"data+tensor"`` (``"-"`` without axes): the one name of
    the axes a collective runs over, used by bench, planner and docs."""
    return "+".join(record.axes or ()) or "-"


def bytes_by_axes(records: Sequence[Collective]) -> dict[str, int]:
    """Bytes summed by :func:`axes_key`."""
    out: dict[str, int] = {}
    for r in records:
        out[axes_key(r)] = out.get(axes_key(r), 0) + r.bytes
    return out
