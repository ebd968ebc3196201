"""Compile the real train step for devices that need not exist, allocating nothing.

The trainer's step is lowered on abstract arrays (``jax.ShapeDtypeStruct`` with the plan's
shardings) and compiled for the mesh: XLA then reports the per-device memory and the
collectives of the exact program ``Trainer.fit`` would run. With forced CPU devices this
sizes a 64-GPU Llama-3-8B job on a laptop; memory and bytes are compiler-exact for the CPU
backend's program (a GPU program differs in fusion and scheduling, not in what is sharded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jtp.mesh import ModelParallelStrategy
from jtp.parallel.abstract import abstract_array, abstract_sharded
from jtp.parallel.batch import batch_sharding
from jtp.parallel.plan import Plan, activation_rules_of
from jtp.training.module import TrainModule
from jtp.training.trainer import Trainer


def abstract_train_step(
    module: TrainModule,
    strategy: ModelParallelStrategy,
    batch: Any,
    *,
    factory: Callable[[], nnx.Module],
    plan: Plan,
    **trainer_options: Any,
) -> jax.stages.Compiled:
    """The compiled train step ``Trainer(strategy, **trainer_options).fit(module)`` would run.

    Args:
      module: supplies ``training_step``, ``configure_optimizers`` and activation rules
        (its ``configure_model`` is not called: ``factory`` and ``plan`` replace it).
      strategy: the mesh (e.g. 64 forced CPU devices).
      batch: pytree of ``jax.ShapeDtypeStruct`` for one global loader batch (sharded or
        not; it is given the loader's ``P("data", ...)`` layout if it has no sharding). The
        step takes ``accumulate_grad_batches`` of them, as ``fit`` does.
      factory, plan: what ``jtp.sharded_init`` would get, with ``strategy.fsdp``.
    """
    trainer = Trainer(
        strategy, logger=None, enable_progress_bar=False, report_memory=False, **trainer_options
    )
    mesh = strategy.mesh
    model = abstract_sharded(nnx.eval_shape(factory), mesh, plan, fsdp=strategy.fsdp)
    rules = module.activation_rules()
    trainer.setup(
        module, model=model, rules=rules if rules is not None else activation_rules_of(plan)
    )
    step = trainer.train_step_fn(module)
    batch = jax.tree.map(
        lambda b: b if b.sharding is not None else abstract_array(b, batch_sharding(mesh, b.ndim)),
        batch,
    )
    return trainer.compile_train_step(step, [batch] * trainer.options.accumulate_grad_batches)
