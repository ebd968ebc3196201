"""A compiled train step from a module, a mesh and the options: no Trainer needed.

``Trainer.fit`` and the capacity planner (``python -m jtp.capacity``, ``python -m jtp.bench
llama``) both build their step here, so the planner sizes exactly the program ``fit`` runs.
The step is jitted with fixed input and output shardings (parameters and optimizer state keep
their plan layout across steps) and donated state buffers (the update happens in place: the
peak holds one copy of the state, not two). On abstract arrays (``jax.ShapeDtypeStruct`` with
the plan's shardings) nothing is allocated: with forced CPU devices this compiles a 64-GPU
Llama-3-8B step on a laptop, and XLA reports its per-device memory and collectives.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.analysis.dtypes import dot_flops_by_dtype, dots, is_float8, share
from jtp.mesh import ModelParallelStrategy
from jtp.parallel.abstract import abstract_array, abstract_sharded
from jtp.parallel.activations import activation_rules
from jtp.parallel.batch import batch_sharding
from jtp.parallel.plan import Plan, activation_rules_of
from jtp.training.module import TrainModule
from jtp.training.options import TrainerOptions
from jtp.training.precision import policy
from jtp.training.state import TrainState, build_model, shardings
from jtp.training.steps import Step, make_train_step


def build_state(
    module: TrainModule, strategy: ModelParallelStrategy, options: TrainerOptions
) -> tuple[TrainState, dict]:
    """``module.configure_model`` on the strategy's mesh, split into a :class:`TrainState`
    (parameters stored as ``options.precision`` says); and the activation rules in force."""
    module.mesh = strategy.mesh
    model, rules = build_model(module, strategy.mesh, fsdp=strategy.fsdp)
    state = TrainState.from_model(
        model, strategy.mesh, precision=options.precision, trainable=module.trainable(model)
    )
    return state, rules


def optimizer(module: TrainModule, options: TrainerOptions) -> optax.GradientTransformation:
    """The module's optimizer, after global-norm clipping when ``gradient_clip_val`` is set."""
    tx = module.configure_optimizers()
    if options.gradient_clip_val is not None:
        tx = optax.chain(optax.clip_by_global_norm(options.gradient_clip_val), tx)
    return tx


def train_step(
    module: TrainModule, state: TrainState, options: TrainerOptions, *, fsdp: bool
) -> Step:
    """Create the optimizer state on ``state`` (sharded like the parameters) and return the
    pure train step of ``module`` (see :func:`jtp.training.steps.make_train_step`)."""
    tx = optimizer(module, options)
    state.init_optimizer(tx)
    return make_train_step(
        state.graphdef,
        shardings(state.params),
        module.training_step,
        tx,
        precision=options.precision,
        track_grad_norm=options.track_grad_norm,
        accumulate=options.accumulate_grad_batches,
        grad_reduce=options.grad_reduce_for(fsdp=fsdp),
        trainable=state.trainable,
    )


FLOAT32_DOT_WARNING = 0.05  # share of matmul FLOPs in float32 that a bf16 policy flags


def check_compute_dtype(jaxpr: Any, precision: str) -> float:
    """The share of the program's matmul FLOPs that run in the precision's low-precision
    dtypes (bf16; under a float8 policy bf16 or float8); under a bf16 or float8 policy, a
    warning naming the float32 matmuls when more than 5% of the FLOPs are neither (a module
    computing in float32 that the policy could not reach)."""
    p = policy(precision)
    want = str(jax.numpy.dtype(p.compute_dtype))

    def low(dtype: str) -> bool:
        return dtype == want or (p.float8 and is_float8(dtype))

    totals = dot_flops_by_dtype(jaxpr)
    low_share = share(totals, low, empty=1.0)
    if want != "float32" and 1.0 - low_share > FLOAT32_DOT_WARNING:
        where = sorted({d.where for d in dots(jaxpr) if not low(d.dtype) and d.where})[:5]
        kind = f"{want} or float8" if p.float8 else want
        warnings.warn(
            f"precision={precision!r}: {100 * (1 - low_share):.0f}% of the step's matmul FLOPs "
            f"are not {kind} ({ {k: f'{v:.3g}' for k, v in totals.items()} }); made at "
            f"{'; '.join(where) or 'unknown places'}. A module pins float32 (a dtype "
            "attribute of its own, or an astype before a matmul): jtp.explain(..., "
            "compute_dtype=...) lists the modules the policy cannot reach.",
            stacklevel=3,
        )
    return low_share


def trace_train_step(
    step: Step,
    state: TrainState,
    batches: list[Any],
    rules: Mapping | None = None,
    *,
    precision: str = "32-true",
) -> jax.stages.Traced:
    """Trace ``step`` for ``state`` and ``batches`` (the k global batches of one optimizer
    step: arrays, or sharded ``ShapeDtypeStruct``s) under the activation ``rules``, jitted
    with the state's shardings and the state donated; the traced program's matmul dtypes
    are checked against ``precision`` (:func:`check_compute_dtype`). Its ``.jaxpr`` is what
    the step computes, before XLA; ``.lower().compile()`` is :func:`compile_train_step`."""
    state_sh = state.shardings()
    jitted = jax.jit(
        step,
        in_shardings=(*state_sh, shardings(batches)),
        out_shardings=(*state_sh, NamedSharding(state.mesh, P())),
        donate_argnums=(0, 1, 2),
    )
    with activation_rules(state.mesh, dict(rules or {})):
        traced = jitted.trace(*state.arrays(), batches)
    check_compute_dtype(traced.jaxpr, precision)
    return traced


def compile_train_step(*args: Any, **kwargs: Any) -> jax.stages.Compiled:
    """Compile the step :func:`trace_train_step` traces (same arguments: ``step, state,
    batches, rules, *, precision``).

    The result is called as ``compiled(*state.arrays(), batches)`` and returns
    ``(params, opt_state, rest, metrics)``; the state it was given is donated.
    """
    return trace_train_step(*args, **kwargs).lower().compile()


def trace_abstract_step(
    module: TrainModule,
    strategy: ModelParallelStrategy,
    batch: Any,
    *,
    factory: Callable[[], nnx.Module],
    plan: Plan,
    **trainer_options: Any,
) -> jax.stages.Traced:
    """The traced train step ``Trainer(strategy, **trainer_options).fit(module)`` would
    run, on abstract arrays (nothing is allocated); :func:`abstract_train_step` compiles it.

    Args:
      module: supplies ``training_step``, ``configure_optimizers`` and activation rules
        (its ``configure_model`` is not called: ``factory`` and ``plan`` replace it).
      strategy: the mesh (e.g. 64 forced CPU devices).
      batch: pytree of ``jax.ShapeDtypeStruct`` for one global loader batch (sharded or
        not; it is given the loader's ``P("data", ...)`` layout if it has no sharding). The
        step takes ``accumulate_grad_batches`` of them, as ``fit`` does.
      factory, plan: what ``jtp.sharded_init`` would get, with ``strategy.fsdp``.
    """
    options = TrainerOptions(**trainer_options)
    mesh = module.mesh = strategy.mesh
    model = abstract_sharded(nnx.eval_shape(factory), mesh, plan, fsdp=strategy.fsdp)
    rules = module.activation_rules()
    state = TrainState.from_model(
        model, mesh, precision=options.precision, trainable=module.trainable(model)
    )
    step = train_step(module, state, options, fsdp=strategy.fsdp)
    batch = jax.tree.map(
        lambda b: b if b.sharding is not None else abstract_array(b, batch_sharding(mesh, b.ndim)),
        batch,
    )
    rules = rules if rules is not None else activation_rules_of(plan)
    batches = [batch] * options.accumulate_grad_batches
    return trace_train_step(step, state, batches, rules, precision=options.precision)


def abstract_train_step(*args: Any, **kwargs: Any) -> jax.stages.Compiled:
    """The compiled train step ``Trainer(strategy, **trainer_options).fit(module)`` would
    run, compiled on abstract arrays: :func:`trace_abstract_step` (same arguments:
    ``module, strategy, batch, *, factory, plan, **trainer_options``), compiled."""
    return trace_abstract_step(*args, **kwargs).lower().compile()


_CACHE_HIT = "/jax/compilation_cache/cache_hits"  # jax's event: a program loaded from disk


@contextlib.contextmanager
def persistent_cache_hits() -> Iterator[list[str]]:
    """A list that gains one entry per program jax loads from its persistent compilation
    cache (instead of compiling it) inside the ``with`` block: what shows that a repeated
    run compiled nothing, read off jax's own events rather than inferred from wall time."""
    hits: list[str] = []

    def on_event(event: str, **_: Any) -> None:
        if event == _CACHE_HIT:
            hits.append(event)

    jax.monitoring.register_event_listener(on_event)
    try:
        yield hits
    finally:
        jax.monitoring.unregister_event_listener(on_event)
