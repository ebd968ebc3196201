"""What dtype a step's matmuls and collectives carry, read off the program.

The CPU backend rewrites bf16 dots and collectives to float32 *during* optimisation, so
``compiled.as_text()`` cannot tell what a GPU would run. Matmuls are read from the jaxpr
(what the step traced to, before XLA); collectives from the HLO right after SPMD
partitioning (when XLA has inserted them and not yet normalised their types), which a
compile with a dump option writes.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jtp.analysis import compiling

try:  # a readable "file:line (function)" for a warning; optional
    from jax._src import source_info_util
except ImportError:  # pragma: no cover
    source_info_util = None


@dataclasses.dataclass(frozen=True)
class Dot:
    """One ``dot_general`` (or convolution) of a program."""

    dtypes: tuple[str, str]  # operand dtypes, e.g. ("bfloat16", "bfloat16")
    flops: float  # 2 * output elements * contracted size, times the loop trips around it
    where: str  # source line that made it

    @property
    def dtype(self) -> str:
        """The operands' dtype, or "a x b" when they differ."""
        a, b = self.dtypes
        return a if a == b else f"{a} x {b}"


def _sub_jaxprs(value: Any):
    if hasattr(value, "jaxpr") and hasattr(value, "consts"):  # ClosedJaxpr
        yield value.jaxpr
    elif hasattr(value, "eqns"):  # Jaxpr
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _sub_jaxprs(item)


def _where(eqn: Any) -> str:
    if source_info_util is None:
        return ""
    try:
        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - a label only
        return ""


def _ragged_size(eqn: Any, lhs: Any) -> float:
    """Products per output element of a ``ragged_dot_general`` (a grouped matmul: each row
    of the ragged dimension meets one group). Ragged in a free dimension (the forward,
    ``(M, K) x (G, K, N) -> (M, N)``): the contracted size, as a dot. Ragged in the
    contracted dimension (a weight's gradient, ``(M, K) x (M, N) -> (G, K, N)``): each
    output group sums only its own rows, ``M / G`` of them on average, so the ``G`` output
    groups together cost what one dense ``(K, M) x (M, N)`` does."""
    numbers = eqn.params["ragged_dot_dimension_numbers"]
    (contract, _), _ = numbers.dot_dimension_numbers
    size = math.prod(lhs.shape[d] for d in contract)
    if set(numbers.lhs_ragged_dimensions) & set(contract):
        size /= eqn.invars[2].aval.shape[-1]  # G groups in the output, each its rows only
    return size


def dots(jaxpr: Any, trips: float = 1.0) -> list[Dot]:
    """Every ``dot_general``, grouped matmul (``ragged_dot_general``) and convolution of
    ``jaxpr`` (a ``ClosedJaxpr`` or ``Jaxpr``, e.g. ``jax.make_jaxpr(step)(...)`` or
    ``jitted.trace(...).jaxpr``), nested ones included; a dot inside a ``scan`` counts once
    per trip, one inside a ``shard_map`` once per device of its manual axes (its shapes are
    a shard's), so the FLOPs are always the global program's. A grouped matmul counts the
    work of its groups, not the dense product the CPU backend lowers it to (each row times
    all G groups' weights, masked)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found: list[Dot] = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated", "ragged_dot_general"):
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            out = eqn.outvars[0].aval
            if eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                size = math.prod(lhs.shape[d] for d in contract)
            elif eqn.primitive.name == "ragged_dot_general":
                size = _ragged_size(eqn, lhs)
            else:  # each output element sums kernel-window x input-features products
                out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
                size = math.prod(rhs.shape) // out_features
            flops = 2.0 * math.prod(out.shape) * size * trips
            found.append(Dot((str(lhs.dtype), str(rhs.dtype)), flops, _where(eqn)))
            continue
        inner = trips * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else trips
        if eqn.primitive.name == "shard_map":  # the body runs on every device of its manual
            # axes, on its shard: the global program does that many times its local shapes
            mesh = eqn.params["mesh"]
            manual = eqn.params.get("newly_manual_axes", mesh.axis_names)
            inner *= math.prod(mesh.shape[a] for a in manual)
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                found += dots(sub, inner)
    return found


def dot_flops_by_dtype(jaxpr: Any) -> dict[str, float]:
    """Matmul FLOPs of ``jaxpr`` by operand dtype (``"bfloat16"``, ``"float32"``, or
    ``"float32 x bfloat16"`` for a mixed pair)."""
    totals: Counter[str] = Counter()
    for d in dots(jaxpr):
        totals[d.dtype] += d.flops
    return dict(totals)


def total(totals: dict[str, float], keep: Callable[[str], bool]) -> float:
    """The FLOPs in ``totals`` (:func:`dot_flops_by_dtype`) whose dtype ``keep`` accepts."""
    return float(sum(v for k, v in totals.items() if keep(k)))


def share(totals: dict[str, float], keep: Callable[[str], bool], empty: float = 0.0) -> float:
    """The share of the FLOPs in ``totals`` (:func:`dot_flops_by_dtype`) whose dtype
    ``keep`` accepts; ``empty`` for a program without matmuls."""
    everything = sum(totals.values())
    return total(totals, keep) / everything if everything else empty


def flops_fraction(jaxpr: Any, dtype: str) -> float:
    """The share of ``jaxpr``'s matmul FLOPs whose operands are both ``dtype``."""
    return share(dot_flops_by_dtype(jaxpr), lambda k: k == dtype)


FLOAT8 = ("float8_e4m3fn", "float8_e5m2")  # the float8 formats a training step multiplies


def is_float8(dtype: str) -> bool:
    """Whether a :attr:`Dot.dtype` (``"a"`` or ``"a x b"``) has float8 operands only: an
    fp8 forward (e4m3 x e4m3) or backward (e5m2 gradient x e4m3 residual) matmul."""
    return all(d in FLOAT8 for d in dtype.split(" x "))


def float8_fraction(jaxpr: Any) -> float:
    """The share of ``jaxpr``'s matmul FLOPs whose operands are both float8 (any format)."""
    return share(dot_flops_by_dtype(jaxpr), is_float8)


_COLLECTIVE = re.compile(
    r"=\s*(?P<type>\(?[a-z0-9]+\[[^=]*?)\s+(?P<kind>all-reduce|all-gather|reduce-scatter|"
    r"all-to-all|collective-permute)(?:-start)?\("
)
_ELEMENT = re.compile(
    r"\b(bf16|f16|f32|f64|s32|u32|s8|u8|pred|s64|u64|f8e4m3fn|f8e5m2)\[([0-9,]*)\]"
)
ELEMENT_BYTES = {
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "bf16": 2,
    "f16": 2,
    "f32": 4,
    "f64": 8,
    "s32": 4,
    "u32": 4,
    "s8": 1,
    "u8": 1,
    "pred": 1,
    "s64": 8,
    "u64": 8,
}


def partitioned_hlo(lowered: jax.stages.Lowered) -> str:
    """The HLO text of ``lowered`` right after SPMD partitioning: the collectives XLA
    inserted, with the element types the program asked for (the CPU backend promotes bf16
    ones to float32 only later). Compiles ``lowered`` once more, with a dump option, and
    without jax's persistent compilation cache (:func:`jtp.analysis.compiling.afresh`: jax leaves
    dump options out of a cache key, so a warm cache would load the program, dumping
    nothing)."""
    with tempfile.TemporaryDirectory() as tmp, compiling.afresh():
        lowered.compile(
            compiler_options={"xla_dump_to": tmp, "xla_dump_hlo_pass_re": "spmd-partitioning"}
        )
        found = glob.glob(os.path.join(tmp, "*after_spmd-partitioning*.txt"))
        if not found:
            raise RuntimeError("XLA wrote no after_spmd-partitioning dump for this program")
        with open(found[0]) as f:
            return f.read()


def collective_dtypes(hlo_text: str) -> Counter[tuple[str, str]]:
    """``{(kind, element type): count}`` of the collectives in an HLO text (e.g.
    :func:`partitioned_hlo`), e.g. ``{("all-reduce", "bf16"): 4}``."""
    counts: Counter[tuple[str, str]] = Counter()
    for m in _COLLECTIVE.finditer(hlo_text):
        for element in {e for e, _ in _ELEMENT.findall(m.group("type"))}:
            counts[(m.group("kind"), element)] += 1
    return counts


def collective_bytes(hlo_text: str) -> Counter[tuple[str, str]]:
    """``{(kind, element type): bytes}`` of the collectives' results in an HLO text (each
    op counted once, loops not unrolled: a dtype census, not a traffic count)."""
    found: Counter[tuple[str, str]] = Counter()
    for m in _COLLECTIVE.finditer(hlo_text):
        for element, dims in _ELEMENT.findall(m.group("type")):
            size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            found[(m.group("kind"), element)] += size * ELEMENT_BYTES[element]
    return found


# Flax's stock layers whose ``dtype`` attribute is their compute dtype (a precision policy
# sets it; see jtp.training.precision).
POLICY_LAYERS = tuple(
    getattr(nnx, name)
    for name in (
        "Linear",
        "LinearGeneral",
        "Einsum",
        "Embed",
        "Conv",
        "ConvTranspose",
        "MultiHeadAttention",
        "LayerNorm",
        "RMSNorm",
        "GroupNorm",
        "BatchNorm",
        "InstanceNorm",
        "LoRA",
    )
    if hasattr(nnx, name)
)


# The stock layers whose matmul a float8 policy replaces (jtp.training.precision).
FLOAT8_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
FLOAT8_MATMUL = "float8 (e4m3; e5m2 grads)"  # what those compute in, as explain shows it


def module_dtypes(model: nnx.Module, compute_dtype: Any, float8: bool = False) -> dict[str, str]:
    """What each module with a compute dtype computes in under a policy of
    ``compute_dtype``: ``{module path: dtype}`` for the stock layers (the policy sets them;
    with ``float8``, :data:`FLOAT8_MATMUL` for the linear ones),
    ``{path: "float32 (pinned)"}`` for a module of another class whose own float ``dtype``
    attribute differs (its code decides; the policy cannot reach it). Modules without a
    ``dtype`` attribute compute in what their inputs and parameters are: not listed."""
    want = jnp.dtype(compute_dtype)
    found = {}
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Module):
            continue
        name = ".".join(str(p) for p in path)
        dtype = getattr(module, "dtype", None)
        if float8 and isinstance(module, FLOAT8_LAYERS):
            found[name] = FLOAT8_MATMUL
        elif isinstance(module, POLICY_LAYERS):
            found[name] = want.name
        elif dtype is not None and _is_float(dtype) and jnp.dtype(dtype) != want:
            found[name] = f"{jnp.dtype(dtype).name} (pinned)"
    return found


def _is_float(dtype: Any) -> bool:
    try:
        return jnp.issubdtype(dtype, jnp.floating)
    except TypeError:
        return False
