"""What a compiled step costs: collectives from its HLO, memory from its buffer analysis.

Claims about communication and memory are read off the program XLA will actually run
(``jax.jit(f).lower(...).compile()``), never assumed.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
# `%name = <result type> <op>(<operands>), attrs`; async forms end in -start (counted) / -done.
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+"
    r"(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?P<start>-start)?"
    r"\((?P<operands>.*?)\)(?P<attrs>,.*)?$"
)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program (a static occurrence in its HLO text).

    ``bytes`` is the per-device size of the full, un-scattered buffer: the result for
    all-reduce / all-gather / all-to-all / collective-permute, the operand for
    reduce-scatter; a combined (tuple) op counts all its buffers. An op inside a loop body
    appears once, whatever the trip count.
    """

    kind: str
    bytes: int
    dtype: str
    groups: tuple[tuple[int, ...], ...]  # device positions in the program's assignment
    axes: tuple[str, ...] | None  # mesh axes the groups vary over (None without a mesh)
    op_name: str = ""  # jax's name for the op that caused it (HLO metadata), e.g. a param path


def _dtype_bytes(dtype: str) -> int:
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    if dtype.startswith("f8") or dtype.startswith("f4") or dtype.startswith("f6"):
        return 1
    raise ValueError(f"unknown HLO element type {dtype!r}")


def _arrays_bytes(text: str) -> tuple[int, str]:
    arrays = _ARRAY.findall(text)
    total = sum(
        _dtype_bytes(dt) * int(np.prod([int(d) for d in dims.split(",") if d]))
        for dt, dims in arrays
    )
    return total, (arrays[0][0] if arrays else "")


def _parse_iota_groups(spec: str) -> tuple[tuple[int, ...], ...]:
    """``[G,S]<=[d0,d1,...]T(perm)``: iota over dims, transposed by perm, reshaped to (G, S)."""
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    if not m:
        raise ValueError(f"cannot parse replica groups {spec!r}")
    out_shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    ids = ids.reshape(out_shape[0], -1)
    return tuple(tuple(int(i) for i in row) for row in ids)


def _parse_mesh_groups(sizes: str, selected: str) -> tuple[tuple[int, ...], ...]:
    """Shardy's ``mesh['axis_0'=2,'axis_1'=4] {'axis_0'}``: groups vary over the named axes
    of a row-major device mesh and are fixed on the others."""
    dims = [(name, int(n)) for name, n in re.findall(r"'([^']+)'=(\d+)", sizes)]
    names = [name for name, _ in dims]
    chosen = [names.index(a) for a in re.findall(r"'([^']+)'", selected) if a in names]
    if len(chosen) != len(re.findall(r"'[^']+'", selected)):
        raise ValueError(f"cannot parse mesh replica groups {sizes} {selected} (sub-axes?)")
    ids = np.arange(int(np.prod([n for _, n in dims]))).reshape([n for _, n in dims])
    rest = [a for a in range(len(dims)) if a not in chosen]
    ids = ids.transpose(rest + chosen).reshape(-1, int(np.prod([dims[a][1] for a in chosen])))
    return tuple(tuple(int(i) for i in row) for row in ids)


def parse_groups(attrs: str) -> tuple[tuple[int, ...], ...]:
    """Device groups of an op from ``replica_groups`` (explicit, iota, or Shardy's mesh
    notation) or ``source_target_pairs`` (collective-permute: each pair is a group)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        return _parse_mesh_groups(m.group(1), m.group(2))
    m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
    if m:
        return _parse_iota_groups(m.group(1))
    m = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,{} ]*\})?\}", attrs)
    if m and m.group(1):
        return tuple(
            tuple(int(x) for x in g.split(",") if x.strip())
            for g in re.findall(r"\{([\d, ]*)\}", m.group(1))
        )
    return ()


def _axes(groups: tuple[tuple[int, ...], ...], mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes along which the members of a group differ.

    HLO device numbers are positions in the program's device assignment, which for a jit
    over one mesh is ``mesh.devices.flat`` order, so position i sits at
    ``np.unravel_index(i, mesh.devices.shape)``. An empty group list means all devices.
    """
    shape = mesh.devices.shape
    if not groups:
        return tuple(name for name, n in zip(mesh.axis_names, shape, strict=True) if n > 1)
    varying: set[int] = set()
    for group in groups:
        coords = np.array([np.unravel_index(i, shape) for i in group])
        varying |= {a for a in range(len(shape)) if len(set(coords[:, a])) > 1}
    return tuple(mesh.axis_names[a] for a in sorted(varying))


def parse_hlo(text: str, mesh: Mesh | None = None) -> list[Collective]:
    """All collectives in HLO text (see :func:`collectives`)."""
    records = []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        kind = m.group("op")
        source = m.group("operands") if kind == "reduce-scatter" else m.group("type")
        if m.group("start") and kind != "reduce-scatter":
            # An async start returns (operands..., results...): count only the results half.
            n_bytes, dtype = _arrays_bytes(m.group("operands"))
            if kind in ("all-gather", "all-to-all"):
                total, _ = _arrays_bytes(m.group("type"))
                n_bytes = total - n_bytes if total > n_bytes else total
        else:
            n_bytes, dtype = _arrays_bytes(source)
        groups = parse_groups(m.group("attrs") or "")
        axes = _axes(groups, mesh) if mesh is not None else None
        op = re.search(r'op_name="([^"]*)"', m.group("attrs") or "")
        name = op.group(1).replace("\\'", "'") if op else ""
        records.append(Collective(kind, n_bytes, dtype, groups, axes, name))
    return records


def collectives(compiled: Any, mesh: Mesh | None = None) -> list[Collective]:
    """Collectives of a compiled function (``jax.jit(f).lower(...).compile()``).

    With ``mesh`` each record names the mesh axes it runs over (``("tensor",)``,
    ``("data",)``, ...). On CPU, XLA may emit all-reduce + dynamic-slice where a GPU emits
    reduce-scatter: compare kinds with that in mind, and bytes always.
    """
    return parse_hlo(compiled.as_text(), mesh)


def format_collectives(records: list[Collective]) -> str:
    """A compact table: kind, axes, bytes per op, count."""
    counts = Counter((r.kind, r.axes, r.bytes) for r in records)
    lines = [f"{'kind':<20}{'axes':<20}{'bytes':>14}{'count':>7}"]
    for (kind, axes, n), c in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[0][2])):
        lines.append(f"{kind:<20}{','.join(axes or ()) or '-':<20}{n:>14,}{c:>7}")
    return "\n".join(lines)


def total_bytes(
    records: list[Collective], *, kind: str | None = None, axis: str | None = None
) -> int:
    """Sum of ``bytes`` over records, optionally of one kind and/or touching one axis."""
    return sum(
        r.bytes
        for r in records
        if (kind is None or r.kind == kind) and (axis is None or (r.axes and axis in r.axes))
    )


def memory_breakdown(compiled: Any) -> dict[str, int]:
    """Per-device bytes from ``memory_analysis()``, and their total (see below)."""
    ma = compiled.memory_analysis()
    parts = {
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "temps": int(ma.temp_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
    }
    parts["total"] = parts["arguments"] + parts["outputs"] + parts["temps"] - parts["aliased"]
    return parts


def peak_memory_per_device(compiled: Any) -> int:
    """Bytes one device holds while running ``compiled``: arguments + outputs + temporaries
    - donated aliases (outputs written into donated inputs are counted once).

    Not ``memory_analysis().peak_memory_in_bytes``: on CPU it leaves the temporaries out.
    """
    return memory_breakdown(compiled)["total"]


def device_peak_bytes() -> int | None:
    """Largest allocator peak over local devices (GPU), or None where the backend keeps no
    statistics (CPU's ``memory_stats()`` is None)."""
    peaks = []
    for d in jax.local_devices():
        stats = d.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def memory_report(compiled_peak_bytes: int) -> str:
    """``[device i] Peak memory usage: X GB`` per local device, as Lightning's example prints.

    Backends with allocator statistics (GPU) report the measured peak; on CPU the figure is
    the compiled step's footprint per device (arguments + outputs + temporaries - donated
    aliases), which is what each device must hold at the step's peak.
    """
    lines = []
    measured = device_peak_bytes() is not None
    for d in jax.local_devices():
        if measured:
            value, how = (d.memory_stats() or {}).get("peak_bytes_in_use", 0), "allocator peak"
        else:
            value, how = compiled_peak_bytes, "compiled step"
        lines.append(
            f"[device {d.id}] Peak memory usage: {value / 1e9:.2f} GB "
            f"({value / 2**20:.1f} MiB, {how})"
        )
    return "\n".join(lines)
