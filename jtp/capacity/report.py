"""The planner's table, from its JSON (:meth:`jtp.capacity.planner.CapacityTable.to_json`):
what ``jtp capacity`` prints and what ``jtp bench docs`` renders into the pages, so a table
in the docs is always the one its JSON holds."""

from __future__ import annotations

from typing import Any

from jtp.capacity.roofline import FP8_RATIO, GB
from jtp.training.precision import policy

KERNELS = {"blockwise": "blockwise, standing for cuDNN's fused kernel", "xla": "XLA's, T^2"}
COLUMNS = (  # (title, width)
    ("d x t, options", 22),
    ("accum", 5),
    ("memory GB", 9),
    ("floor GB", 8),
    ("fits", 4),
    ("tensor GB/step", 14),
    ("data GB/step", 12),
    ("step s (est)", 12),
    ("tok/s/dev (est)", 15),
)
# A mixture of experts' table adds its all-to-all bytes (over an "expert" axis) after "data".
EXPERT_COLUMN = ("a2a GB/step", 11)
# A table with "context" rows adds their exchanges over it (the K/V gathers and scatters).
CONTEXT_COLUMN = ("ctx GB/step", 11)


def _header(r: dict[str, Any], hw: dict[str, Any], context: bool = False) -> str:
    memory, fraction = hw["memory_gb"], hw["mem_fraction"]
    kernel = KERNELS.get(r["attention_compiled"], r["attention_compiled"])
    if context and r["attention_compiled"] == "blockwise":  # cuDNN cannot attend by position
        kernel += " (with a context axis, what the GPU runs too)"
    float8 = policy(r["precision"]).float8
    # XLA's CPU has no float8 dot: it multiplies bf16 copies of the operands, which a GPU's
    # float8 matmul does not make (jtp.capacity.measure.AS_ON_GPU leaves them in)
    copies = "; float8 operands' bf16 copies included: cautious" if float8 else ""
    rate8 = f", float8 at {hw.get('fp8_ratio', FP8_RATIO):g}x" if float8 else ""
    return (
        f"{r['label']} on {r['devices']} devices ({r['devices_per_host']}/host, "
        f"{memory:g} GB), global batch {r['global_batch']} x {r['seq_len']} tokens, "
        f"{r['precision']}, micro-batch {r['micro_batch']}/data rank.\n"
        f"Fits: memory <= {memory * fraction:g} GB usable ({fraction:.0%} of {memory:g} GB: "
        "jax's preallocation). Memory and bytes: compiled (XLA CPU backend sizing what a GPU "
        f"holds: bf16 kept bf16, no CPU-only float32 copies{copies}; attention {kernel}; "
        "per device).\n"
        f"Step time and tokens/s: ESTIMATES (roofline: {hw['compute_efficiency']:.0%} of "
        f"{hw['peak_tflops']:g} TFLOP/s bf16, fp32 matmuls at {hw['fp32_ratio']:g}x that"
        f"{rate8}, {hw['intra_host_gbps']:g} GB/s in host, {hw['inter_host_gbps']:g} GB/s "
        "across, no overlap).\n"
    )


def _has_context(payload: dict[str, Any]) -> bool:
    return any(r["config"].get("context", 1) > 1 for r in payload["rows"])


def _has_expert(payload: dict[str, Any]) -> bool:
    return bool(payload.get("moe")) and any("expert_bytes_per_step" in r for r in payload["rows"])


def _columns(payload: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    expert, context = _has_expert(payload), _has_context(payload)
    if not expert and not context:
        return COLUMNS
    axes = "d x " + "[e x] " * expert + "[c x] " * context + "t, options"
    extra = (EXPERT_COLUMN,) * expert + (CONTEXT_COLUMN,) * context
    return ((axes, 26),) + COLUMNS[1:7] + extra + COLUMNS[7:]


def _row(row: dict[str, Any], mark: str, expert: bool, context: bool) -> str:
    a2a = (f"{row.get('expert_bytes_per_step', 0.0) / GB:>11.1f}",) if expert else ()
    ctx = (f"{row.get('context_bytes_per_step', 0.0) / GB:>11.1f}",) if context else ()
    cells = (
        f"{row['label']:<{26 if expert or context else 22}}",
        f"{row['accumulate']:>5}",
        f"{row['memory_bytes'] / GB:>9.2f}",
        f"{row['floor_bytes'] / GB:>8.2f}",
        f"{'yes' if row['fits'] else 'no':>4}",
        f"{row['tensor_bytes_per_step'] / GB:>14.1f}",
        f"{row['data_bytes_per_step'] / GB:>12.1f}",
        *a2a,
        *ctx,
        f"{row['step_s']:>12.2f}",
        f"{row['tokens_per_s_per_device']:>15,.0f}",
    )
    return f"| {mark} | " + " | ".join(cells) + " |"


def _moe_line(payload: dict[str, Any]) -> str:
    """A mixture of experts' parameters, and its experts' share of the best row's floor."""
    moe = payload.get("moe")
    if not moe:
        return ""
    best = payload["recommended"] or (payload["rows"] or [None])[0]
    share = ""
    if best is not None and "expert_floor_bytes" in best:
        share = (
            f"; the experts' state is {best['expert_floor_bytes'] / GB:.2f} of the "
            f"{best['floor_bytes'] / GB:.2f} GB floor at {best['label'].split()[0]}"
        )
    axis = ""
    if any(r["config"].get("expert", 1) > 1 for r in payload["rows"]):
        axis = '; with an "expert" axis e, on E over it and on F over "tensor"'
    return (
        f"Mixture of experts: {moe['params'] / 1e9:.1f}B parameters, "
        f"{moe['active_params'] / 1e9:.1f}B active per token ({moe['experts_per_token']} of "
        f"{moe['n_experts']} experts per layer), experts {moe['expert_params'] / 1e9:.1f}B, "
        f'split over "tensor" on E (on F where the tensor size does not divide E{axis}){share}.\n'
    )


def _expert_verdict(payload: dict[str, Any]) -> str:
    """Whether an "expert" axis pays (:func:`_axis_verdict`). Empty for a dense model or
    without expert rows."""
    if not payload.get("moe") or not any(r["config"].get("expert", 1) > 1 for r in payload["rows"]):
        return ""
    return _axis_verdict(payload, "expert", lambda row: "")


def _context_verdict(payload: dict[str, Any]) -> str:
    """Whether a "context" axis pays (:func:`_axis_verdict`), and why it can: each device
    keeps 1/C of every sequence's activations, for the K/V exchange over the link its group
    spans. Empty without context rows."""
    if not _has_context(payload):
        return ""
    request = payload["request"]

    def why(row: dict[str, Any]) -> str:
        c, t = row["config"]["context"], row["config"]["tensor"]
        link = "in host" if c * t <= request["devices_per_host"] else "across hosts"
        return (
            f"; each device holds the activations of {request['seq_len'] // c:,} of each "
            f"sequence's {request['seq_len']:,} tokens, for "
            f"{row['context_bytes_per_step'] / GB:.1f} GB/step of K/V exchange {link}"
        )

    return _axis_verdict(payload, "context", why)


def _axis_verdict(payload: dict[str, Any], axis: str, why: Any) -> str:
    """One line on whether an ``axis`` of size > 1 pays: needed (only rows with one fit), or
    the fastest fitting row with one against the fastest without (rows are sorted best
    first). ``why(row)`` adds the axis's own reason to the line."""
    fits = [r for r in payload["rows"] if r["fits"]]
    with_axis = next((r for r in fits if r["config"].get(axis, 1) > 1), None)
    without = next((r for r in fits if r["config"].get(axis, 1) == 1), None)
    an = "an" if axis[0] in "aeiou" else "a"
    if with_axis is None:
        return f'\n{axis} axis: no layout with {an} "{axis}" axis fits'
    if without is None:
        return (
            f"\n{axis} axis: needed (only layouts with one fit; best {with_axis['label']}"
            f"{why(with_axis)})"
        )
    verdict = "pays" if with_axis is fits[0] else "does not pay"
    return (
        f"\n{axis} axis: {verdict} ({with_axis['label']}: "
        f"{with_axis['tokens_per_s_per_device']:,.0f} tok/s/dev against "
        f"{without['label']}: {without['tokens_per_s_per_device']:,.0f}{why(with_axis)})"
    )


def format_table(payload: dict[str, Any]) -> str:
    """The table of a planner JSON: one row per layout, the recommended one starred; a
    mixture of experts' adds its all-to-all bytes and whether an "expert" axis pays, one
    with "context" rows their exchange bytes and whether the axis pays."""
    best = payload["recommended"]
    columns = _columns(payload)
    expert, context = _has_expert(payload), _has_context(payload)
    cells = [f"{n:<{w}}" if i == 0 else f"{n:>{w}}" for i, (n, w) in enumerate(columns)]
    lines = [
        "|   | " + " | ".join(cells) + " |",
        "|---|" + "|".join("-" * (w + 2) for _, w in columns) + "|",
    ]
    for row in payload["rows"]:
        mark = "*" if best is not None and row["label"] == best["label"] else " "
        lines.append(_row(row, mark, expert, context))
    tail = f"\n* recommended: {best['label']}" if best else "\nno configuration fits"
    tail += _expert_verdict(payload) + _context_verdict(payload)
    head = _header(payload["request"], payload["hardware"], context) + _moe_line(payload)
    return head + "\n".join(lines) + tail
