"""Stacked experts in plan inference: a mixture of experts' ``E`` SwiGLU feed-forwards held
as 3-D parameters (:class:`jtp.models.moe.Experts`: ``w1``, ``w3`` (E, D, F) and ``w2``
(E, F, D)), which no Flax layer layout covers and whose tokens reach them through a sort,
not a matmul the pairing search could follow. They are recognised by their shapes and laid
out by one rule, the hand plan's (:func:`jtp.plans.llama`):

- ``E`` divisible by the tensor size T (or T not given): split on E, ``P("tensor", None,
  None)`` for all three, E / T whole experts per device;
- otherwise (fewer experts than devices, or E not a multiple of T): split each expert's
  hidden features F, ``w1``/``w3`` ``P(None, None, "tensor")`` and ``w2`` ``P(None,
  "tensor", None)``: every expert on every device, each as a column/row pair of a dense
  feed-forward.

The router (the experts' sibling ``router``, a (D, E) kernel) stays replicated: it is small
and every device routes every token it holds. A shared expert is a dense feed-forward of
``nnx.Linear`` layers, which the pairing search lays out as any other.
"""

from __future__ import annotations

from flax import nnx
from jax.sharding import PartitionSpec as P

from jtp.mesh import TENSOR
from jtp.parallel.infer.pairing import Why
from jtp.parallel.names import path_str
from jtp.parallel.stacked import layer_axes, stack_roots
from jtp.parallel.styles import ParamSharding

EXPERT_PARAMS = ("w1", "w2", "w3")


def stacked_experts(model: nnx.Module) -> dict[str, tuple[int, int, int]]:
    """``{module path: (E, D, F)}`` of every module whose parameters are exactly ``w1``,
    ``w3`` (E, D, F) and ``w2`` (E, F, D) per layer (leading layer axes of a stack aside)."""
    roots = stack_roots(model)
    out = {}
    for p, module in nnx.iter_modules(model):
        path = path_str(p)
        own = {
            path_str(q): tuple(v.get_value().shape)
            for q, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
        }
        if not p or set(own) != set(EXPERT_PARAMS):
            continue
        axes = layer_axes(path, roots)
        w1, w2, w3 = (own[n][axes:] for n in EXPERT_PARAMS)
        if len(w1) == 3 and w1 == w3 and w2 == (w1[0], w1[2], w1[1]):
            out[path] = w1
    return out


def expert_style(shape: tuple[int, int, int], tensor: int | None) -> tuple[ParamSharding, Why]:
    """The layout of stacked experts of per-layer ``shape`` (E, D, F) on a tensor axis of
    ``tensor`` devices (None: not known; E is split), and the reason."""
    e, _, f = shape
    if tensor is None or e % tensor == 0:
        whole = "" if tensor is None else f", {e // tensor} per device"
        style = ParamSharding(dict.fromkeys(EXPERT_PARAMS, P(TENSOR, None, None)))
        why = (
            f"experts: {e} stacked experts (w1/w3 (E, D, F), w2 (E, F, D)) split on E over "
            f'"tensor" (whole experts{whole}): each device runs its experts\' grouped matmuls '
            "on the tokens routed to them; a tensor size that does not divide "
            f"{e} splits each expert's F instead"
        )
        return style, Why(why.replace("{", "{{").replace("}", "}}"))
    style = ParamSharding(
        {"w1": P(None, None, TENSOR), "w3": P(None, None, TENSOR), "w2": P(None, TENSOR, None)}
    )
    why = (
        f"experts: {e} stacked experts, not a multiple of tensor={tensor}: each expert's "
        f"hidden features F ({f}) split instead, w1/w3 on their columns and w2 on its rows "
        "(every device holds every expert, a column/row pair as a dense feed-forward: one "
        "all-reduce of the combined output)"
    )
    return style, Why(why)


def router_of(experts_path: str) -> str:
    """The router module beside stacked experts (``...feed_forward.router``)."""
    parent = experts_path.rpartition(".")[0]
    return f"{parent}.router" if parent else "router"


ROUTER_WHY = Why(
    "replicated: the router of {0} ((D, E) logits, float32): small, and every device routes "
    "every token it holds"
)
