"""``jtp.explain``: what a plan does to every parameter, before anything is allocated.

One row per variable: path, shape, dtype, the plan key and style that matched it (or
"replicated: no key"), its PartitionSpec, its shard shape and its bytes per device; given a
compute dtype (a precision policy's), also what the layer holding it computes in, with
"float32 (pinned)" where the policy cannot reach it. Then the per-device totals for
parameters, gradients and optimizer state; for a plan from :func:`jtp.infer_plan`, why each
layer got its style. Works on abstract models (``nnx.eval_shape``), so a 70B model is
explained on a laptop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jtp.analysis.dtypes import module_dtypes
from jtp.analysis.memory import nbytes
from jtp.parallel.abstract import abstract_sharded
from jtp.parallel.infer import InferredPlan
from jtp.parallel.names import path_str
from jtp.parallel.optimizer import abstract_opt_state
from jtp.parallel.plan import Placement, Plan, resolve, shard_shape


@dataclasses.dataclass(frozen=True)
class Row:
    placement: Placement
    shard: tuple[int, ...]
    bytes_per_device: int
    is_param: bool
    computes: str | None = None  # the holding layer's compute dtype, given one to explain


@dataclasses.dataclass(frozen=True)
class Explanation:
    rows: list[Row]
    mesh: dict[str, int]
    param_bytes: int  # per device
    grad_bytes: int  # per device (gradients are laid out like their parameters)
    optimizer_bytes: int  # per device
    optimizer_note: str
    pinned: tuple[str, ...] = ()  # modules computing in float32 that a policy cannot reach
    notes: tuple[str, ...] = ()  # an inferred plan's reasons, "key: style: why"

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def __str__(self) -> str:
        head = ("path", "shape", "dtype", "plan key -> style", "spec", "shard", "bytes/dev")
        computes = any(r.computes is not None for r in self.rows)
        head += ("computes in",) if computes else ()
        body = []
        for r in self.rows:
            p = r.placement
            style = f"{p.key} -> {_style_name(p.style)}" if p.key else "replicated: no key"
            spec = "P(" + ", ".join(repr(a) if a else "None" for a in p.spec) + ")"
            body.append(
                (
                    p.path,
                    str(p.shape),
                    str(np.dtype(p.dtype)),
                    style,
                    spec,
                    str(r.shard),
                    f"{r.bytes_per_device:,}",
                    *((r.computes or "inputs' dtype",) if computes else ()),
                )
            )
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

        def fmt(row: tuple[str, ...]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

        lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += [fmt(row) for row in body]
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        lines += [
            "",
            f"per device on mesh {mesh}: params {_gb(self.param_bytes)}, grads "
            f"{_gb(self.grad_bytes)}, optimizer {_gb(self.optimizer_bytes)} "
            f"({self.optimizer_note}); total {_gb(self.total_bytes)}",
        ]
        if self.pinned:
            lines.append(
                "WARNING: these modules compute in float32 whatever the precision (a dtype of "
                f"their own): {', '.join(self.pinned)}"
            )
        if self.notes:
            lines += ["", "why each layer has its style (jtp.infer_plan):", *self.notes]
        return "\n".join(lines)


def _style_name(style: Any) -> str:
    heads = getattr(style, "heads", None)
    return type(style).__name__ + (f"(heads={heads})" if heads else "")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def explain(
    model: nnx.Module | Callable[[], nnx.Module],
    mesh: Mesh,
    plan: Plan,
    *,
    fsdp: bool = False,
    tx: optax.GradientTransformation | None = None,
    strict: bool = False,
    strict_min_bytes: int = 1 << 20,
    compute_dtype: Any = None,
    float8: bool = False,
) -> Explanation:
    """Explain the layout ``plan`` gives ``model`` (a model, or a factory: used abstractly).

    Args:
      tx: the optimizer, for exact optimizer-state bytes (its state is evaluated
        abstractly and sharded like the parameters); default: AdamW's two fp32 moments.
      strict: raise a ``ValueError`` for any parameter the plan leaves unsharded whose whole
        size is at least ``strict_min_bytes`` (a forgotten key costs that on every device).
      compute_dtype: the dtype a precision policy computes in (``jnp.bfloat16`` for
        "bf16-mixed"): adds a "computes in" column and names the modules it cannot reach.
      float8: the policy also runs the linear layers' matmuls in float8
        ("transformer-engine"): their "computes in" says so.
    """
    abstract = model if isinstance(model, nnx.Module) else nnx.eval_shape(model)
    placements = resolve(abstract, mesh, plan, fsdp=fsdp)
    params = {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    dtypes = module_dtypes(abstract, compute_dtype, float8) if compute_dtype is not None else {}
    rows = []
    for p in placements:
        shard = shard_shape(p, mesh)
        owner = p.path.rsplit(".", 1)[0] if "." in p.path else ""
        computes = dtypes.get(owner) if compute_dtype is not None else None
        rows.append(Row(p, shard, nbytes(shard, p.dtype), p.path in params, computes))
        if strict and p.path in params and p.key is None and not any(p.spec):
            whole = nbytes(p.shape, p.dtype)
            if whole >= strict_min_bytes:
                raise ValueError(
                    f"explain(strict=True): parameter {p.path!r} {p.shape} ({whole:,} bytes) is "
                    "replicated on every device because no plan key matches its module; add "
                    "a key for it or raise strict_min_bytes"
                )
    param_bytes = sum(r.bytes_per_device for r in rows if r.is_param)
    if tx is None:
        opt_bytes = sum(2 * nbytes(r.shard, np.float32) for r in rows if r.is_param)
        note = "AdamW: 2 fp32 moments"
    else:
        opt_bytes, note = _optimizer_bytes(tx, abstract, mesh, plan, fsdp), "from tx"
    pinned = tuple(path or "<model>" for path, d in dtypes.items() if d.endswith("(pinned)"))
    notes = tuple(str(plan).splitlines()) if isinstance(plan, InferredPlan) else ()
    return Explanation(
        rows, dict(mesh.shape), param_bytes, param_bytes, opt_bytes, note, pinned, notes
    )


def _optimizer_bytes(tx: Any, abstract: nnx.Module, mesh: Mesh, plan: Plan, fsdp: bool) -> int:
    params = nnx.state(abstract_sharded(abstract, mesh, plan, fsdp=fsdp), nnx.Param)
    return sum(
        nbytes(leaf.sharding.shard_shape(leaf.shape), leaf.dtype)
        for leaf in jax.tree.leaves(abstract_opt_state(tx, params))
    )
