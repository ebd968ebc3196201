"""``jtp.infer_plan(model, *example_args)``: a tensor-parallel plan read off the model's forward.

The forward is traced (:mod:`jtp.parallel.infer.dataflow`); every module with a column/row layout
(:mod:`jtp.parallel.layer_rules`: ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Embed``,
``LoRA``, ``LoRALinear``, ...) is a candidate. Each candidate is tried as a *column* layer:
its output features are split over ``"tensor"`` and the split is followed through the
program (:mod:`jtp.parallel.infer.split_rules`). The attempt grows a
*group*: the other branch of a gate or the keys and values of attention join it as columns
(they must be split the same way), and the matmul that contracts the split features against
a parameter makes that layer a *row* layer, where the split ends in one all-reduce. The
group is kept when every split it makes ends in such a row layer: a Megatron pair (or
several columns and rows that only make sense together, such as q, k, v and the output
projection). Anything that would mix features across the split (a norm or softmax over
them, a reshape cutting a head, a contraction outside a layer, an op the rules do not know)
abandons the attempt: the layer stays replicated, with that reason.

Stacked experts (a mixture of experts' 3-D ``w1``/``w2``/``w3``) follow the hand plan's
rule by their shapes (:mod:`jtp.parallel.infer.experts`): split on the expert dimension, or
on each expert's hidden features when the tensor size does not divide the experts.

Two rules beyond pairs reproduce the hand-written Llama plan (:func:`jtp.plans.llama`):

- an ``nnx.Embed`` is tried as a *row* layer (its table split on vocabulary rows, as torch
  does): a lookup then gives partial rows summed by one all-reduce, and a tied output
  projection (``embed.attend``) is split on the vocabulary like a head;
- a column layer whose split output reaches no row layer but is only returned (or reduced
  over at the very end) is kept when it projects to a *larger* output than its input
  (``out > in``: a vocabulary head, whose logits stay split); otherwise it is replicated.

Groups may overlap (on a residual stream, ``up`` pairs with its block's ``down``, or the
stream stays split from ``inp`` through every ``down`` to the ``ups``): the plan is the set
of non-overlapping groups, leaving out none that could still be added, that all-reduces the
fewest bytes per forward and backward (:mod:`jtp.parallel.infer.choice`); ``reasons`` say what
each other pairing would move, and :attr:`InferredPlan.cost` / ``alternatives`` carry the
counts.

When a reshape cuts the split features into ``(heads, head_dim)``, the group records its
head count and each style carries ``heads=``: ``jtp``'s plan checks then refuse a tensor size
that does not divide it, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from flax import nnx

from jtp.mesh import TENSOR
from jtp.parallel.infer.choice import STYLES, PlanCost, choose, plan_cost, whole_plan
from jtp.parallel.infer.dataflow import trace
from jtp.parallel.infer.experts import ROUTER_WHY, expert_style, router_of, stacked_experts
from jtp.parallel.infer.pairing import Layer, Search, Why
from jtp.parallel.infer.reasons import chosen_over, explain_group, left_out
from jtp.parallel.layer_rules import layout_fn
from jtp.parallel.names import path_str
from jtp.parallel.plan import TPPlan
from jtp.parallel.stacked import layer_axes, match_name, one_layer, stack_roots
from jtp.parallel.styles import ParallelStyle


@dataclasses.dataclass(frozen=True, eq=False)
class InferredPlan(TPPlan):
    """A :class:`jtp.TPPlan` from :func:`infer_plan`, with why each layer got its style.

    ``reasons`` maps plan keys (and the paths of modules left replicated) to one line each:
    ``"column: ..."``, ``"row: ..."``, ``"replicated: ..."``. ``str(plan)`` lists them;
    :func:`jtp.explain` prints them under its table. Usable wherever a plan is.
    """

    reasons: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # What the plan's row layers (and lookups) all-reduce, by the traced program's sizes.
    cost: PlanCost | None = None
    # For each group of layers that could be paired otherwise: the cheapest plan with that
    # other pairing (the rest as chosen), and what it would move.
    alternatives: tuple[PlanCost, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "reasons", MappingProxyType(dict(self.reasons)))

    def __str__(self) -> str:
        return "\n".join(f"{key}: {why}" for key, why in self.reasons.items())


def _layers(model: nnx.Module, used: set[str]) -> tuple[dict[str, Layer], dict[str, str]]:
    """Candidate layers (modules with a layout that own a used parameter), each with the
    tensor-split dimension of each of its parameters per style; and parameter -> layer."""
    roots = stack_roots(model)
    params = {
        path_str(p): tuple(v.get_value().shape)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    supported = {path_str(p): m for p, m in nnx.iter_modules(model) if p and layout_fn(m)}
    layers, owner = {}, {}
    for path, module in supported.items():
        if any(path.startswith(x + ".") for x in supported):  # the outermost layer owns it
            continue
        mine = [n for n in params if n.startswith(path + ".")]
        if not mine or not any(n in used for n in mine):
            continue
        axes = layer_axes(path, roots)
        splits: dict[str, dict[str, int] | str] = {}
        for name, style in STYLES.items():
            try:
                layout = style().layout(one_layer(module, axes))
            except ValueError as e:
                splits[name] = str(e)
                continue
            splits[name] = {
                f"{path}.{rel}": axes + tuple(rule.spec).index(TENSOR)
                for rel, rule in layout.items()
                if rule is not None and f"{path}.{rel}" in params and TENSOR in tuple(rule.spec)
            }
        layers[path] = Layer(isinstance(module, nnx.Embed), splits)
        owner.update(dict.fromkeys(mine, path))
    return layers, owner


def _others(model: nnx.Module, owner: Mapping[str, str], used: set[str]) -> dict[str, Why]:
    """Why each parameter outside a candidate layer is replicated, by its module."""
    modules = {path_str(p): m for p, m in nnx.iter_modules(model)}
    out: dict[str, Why] = {}
    for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = path_str(p)
        module = path_str(p[:-1])
        if name in owner and name in used:
            continue
        if name in owner or name not in used:
            out.setdefault(owner.get(name, module), Why("replicated: the forward does not use it"))
            continue
        kind = type(modules[module]).__name__
        if not module:  # plan keys name sub-modules: the model's own parameters stay whole
            out[name] = Why(f"replicated: a parameter of {kind} itself, outside any layer")
            continue
        out.setdefault(
            module,
            Why(
                f"replicated: {kind} has no column/row layout (norms and scales are small and "
                "needed whole; lay out any other module by hand with jtp.ParamSharding)"
            ),
        )
    return out


_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")  # a whole numeric path component


def _keys(model: nnx.Module, entries: Mapping[str, tuple[Any, Why]]) -> dict[str, str]:
    """The plan key of each entry's module: ``layers.*.attention.wq`` where every layer of
    an unrolled list (or a stack) agrees on style and reason, its own path otherwise."""
    roots = stack_roots(model)
    paths = [path_str(p) for p, _ in nnx.iter_modules(model) if p]
    names = {p: match_name(p, roots) for p in paths} | {m: m for m in entries if m not in paths}
    groups: dict[str, list[str]] = {}
    for m in entries:
        groups.setdefault(_INDEX.sub("*", names[m]), []).append(m)
    keys = {m: names[m] for m in entries}
    for pattern, members in groups.items():
        if len(members) < 2:
            continue
        hits = {
            p
            for p in paths
            if fnmatch.fnmatchcase(names[p], pattern) or fnmatch.fnmatchcase(p, pattern)
        }
        if hits != set(members):
            continue

        def same(m: str) -> tuple:
            style, why = entries[m]

            def star(r: str | tuple[str, ...]) -> str | tuple:
                return _INDEX.sub("*", names[r]) if isinstance(r, str) else tuple(map(star, r))

            return style, why.text, tuple(star(r) for r in why.refs)

        if len({same(m) for m in members}) == 1:
            keys.update(dict.fromkeys(members, pattern))
    return keys


def infer_plan(
    model: nnx.Module | Callable[[], nnx.Module], *example_args: Any, tensor: int | None = None
) -> InferredPlan:
    """Infer a tensor-parallel plan by tracing ``model(*example_args)``.

    Finds the parameterised matmuls of the forward and pairs column -> row layers through
    element-wise ops, gates, norms over other axes and reshapes that keep whole heads on
    each device; everything else stays replicated. ``str(plan)`` (and :func:`jtp.explain`)
    says why each layer got its style. The plan is mesh-independent: heads, when a split
    falls on them, are checked against the tensor size when the plan is applied.

    Args:
      model: an ``nnx.Module`` (concrete, or abstract from ``nnx.eval_shape``), or a
        zero-argument factory (evaluated abstractly: nothing is allocated).
      example_args: the forward's inputs, arrays or ``jax.ShapeDtypeStruct``s (only shapes
        and dtypes are used).
      tensor: the tensor size the plan is for, where a layout depends on it: stacked
        experts (a mixture of experts, :mod:`jtp.parallel.infer.experts`) are split on the
        expert dimension when ``tensor`` divides it (or is None), else on each expert's
        hidden features.

    Example::

      plan = jtp.infer_plan(model, jnp.zeros((8, 64)))
      model = jtp.parallelize(model, mesh, plan)
      print(jtp.explain(model, mesh, plan))
    """
    if not isinstance(model, nnx.Module):
        if not callable(model):
            raise ValueError(
                f"infer_plan takes an nnx.Module or a zero-argument factory, got "
                f"{type(model).__name__}"
            )
        model = nnx.eval_shape(model)
    if not example_args:
        raise ValueError(
            "infer_plan traces model(*example_args): give the forward's inputs (arrays or "
            "jax.ShapeDtypeStruct), e.g. jtp.infer_plan(model, jnp.zeros((8, 64)))"
        )
    graphdef, state = nnx.split(model)

    def forward(state: nnx.State, *args: Any) -> Any:
        return nnx.merge(graphdef, state)(*args)

    params = {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    graph = trace(forward, state, example_args, params)
    used = {path for v, path in graph.params.items() if v in graph.users}
    layers, owner = _layers(model, used)
    search = Search(graph, layers, owner)
    found, whys = search.candidates()
    choice = choose(found)
    groups = {m: k for k in choice.chosen for m in found[k].assign}
    copies = {m for k in choice.chosen for m in found[k].copied}
    for k in choice.chosen:
        for layer, i in found[k].copied.items():
            whys[layer] = Why(
                "replicated: its heads are repeated and each device slices the copies "
                f"that {{0}}'s split needs ({search.at(i)}): split, it would cut heads on a "
                "tensor axis wider than their count (jtp.plans.llama's kv_replicas)",
                (next(iter(found[k].assign)),),
            )
    entries: dict[str, tuple[ParallelStyle | None, Why]] = {}
    for m in search.layers:  # program order
        if m in groups:
            k = groups[m]
            style, group = found[k].assign[m], found[k]
            why = explain_group(m, style, group, layers, graph)
            entries[m] = (STYLES[style](heads=group.heads), chosen_over(why, k, found, choice))
        else:
            lost = None if m in copies else left_out(m, found, choice)
            entries[m] = (None, lost or whys[m])
    for path, shape in stacked_experts(model).items():  # a mixture of experts' own rule
        entries[path] = expert_style(shape, tensor)
        entries[router_of(path)] = (None, Why(ROUTER_WHY.text, (path,)))
    others = _others(model, owner, used)
    entries |= {m: (None, why) for m, why in others.items() if m not in entries}
    if not layers:
        entries[""] = (
            None,
            Why(
                "replicated: the forward has no parameterised matmul, so there is nothing to split"
            ),
        )
    keys = _keys(model, {m: e for m, e in entries.items() if m})
    keys[""] = "(model)"
    plan_styles, reasons = {}, {}
    for m, (style, why) in entries.items():
        key = keys[m]
        if style is not None:
            plan_styles[key] = style
        reasons.setdefault(key, why.render(lambda r: keys.get(r, r)))
    alternatives = {}
    for k in range(len(found)):
        plan = whole_plan(choice, k)
        if plan != choice.chosen:
            alternatives.setdefault(plan, plan_cost(found, plan))
    return InferredPlan(
        plan_styles, {}, reasons, plan_cost(found, choice.chosen), tuple(alternatives.values())
    )
