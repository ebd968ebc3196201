"""TrainModule: Lightning-like hooks around a plain NNX model.

The step hooks are traced inside ``jax.jit``: they must be pure functions of ``(model,
batch)`` (no Python side effects, no host reads), which is what makes one compiled step per
fit possible. Everything stateful (the model's RNG streams, optimizer state) is threaded by
the :class:`~jtp.Trainer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jtp.parallel.plan import Plan

StepOutput = jax.Array | tuple[jax.Array, dict[str, jax.Array]]


def default_trainable(model: nnx.Module) -> nnx.filterlib.Filter:
    """``nnx.LoRAParam`` if ``model`` holds any (LoRA fine-tuning), else ``nnx.Param``."""
    lora = nnx.state(model, nnx.LoRAParam)
    return nnx.LoRAParam if jax.tree.leaves(lora) else nnx.Param


class TrainerView(Protocol):
    """What a module's hooks may read of the trainer running them (:class:`jtp.Trainer` is
    one): read-only facts, so a hook can size a schedule or log on one process only."""

    global_step: int  # optimizer steps taken so far
    current_epoch: int

    @property
    def mesh(self) -> Mesh: ...

    @property
    def is_global_zero(self) -> bool: ...  # process 0

    @property
    def estimated_stepping_batches(self) -> int: ...  # optimizer steps fit will take


class TrainModule:
    """Subclass and override the hooks you need (``configure_model``, ``training_step`` and
    ``configure_optimizers`` are required).

    Attributes set before ``configure_model``: ``mesh`` (the strategy's mesh, also what
    dataloaders need) and, when a :class:`jtp.Trainer` runs the module, ``trainer`` (a
    :class:`TrainerView`; a step compiled without a trainer, as the planner does, has none).

    Example::

      class LitModel(jtp.TrainModule):
          def configure_model(self, mesh):
              plan = {"w1": jtp.ColwiseParallel(), "w2": jtp.RowwiseParallel(),
                      "w3": jtp.ColwiseParallel()}
              return jtp.sharded_init(lambda: FeedForward(64, 256, rngs=nnx.Rngs(0)),
                                      mesh, plan)

          def training_step(self, model, batch):
              return model(batch).sum()

          def configure_optimizers(self):
              return optax.adamw(3e-3)

          def train_dataloader(self):
              return jtp.DataLoader(jtp.RandomDataset(64, 64), 8, mesh=self.mesh)
    """

    mesh: Mesh
    trainer: TrainerView

    def configure_model(
        self, mesh: Mesh
    ) -> nnx.Module | tuple[Callable[[], nnx.Module] | nnx.Module, Plan]:
        """Build the model, normally ``jtp.sharded_init(factory, mesh, plan)``.

        May instead return ``(factory, plan)`` (or ``(model, plan)``): the trainer then calls
        :func:`jtp.sharded_init` (or :func:`jtp.parallelize`) with the strategy's ``fsdp``.
        Called once per trainer.
        """
        raise NotImplementedError("TrainModule.configure_model must build the model")

    def training_step(self, model: nnx.Module, batch: Any) -> StepOutput:
        """Return a scalar loss, or ``(loss, {name: scalar})``. Traced inside jit."""
        raise NotImplementedError("TrainModule.training_step must return the loss")

    def validation_step(self, model: nnx.Module, batch: Any) -> StepOutput:
        """Like ``training_step``, without gradients; averaged over the val loader."""
        raise NotImplementedError(f"{type(self).__name__} has no validation_step")

    def test_step(self, model: nnx.Module, batch: Any) -> StepOutput:
        """Like ``validation_step``, for ``Trainer.test``."""
        raise NotImplementedError(f"{type(self).__name__} has no test_step")

    def configure_optimizers(self) -> optax.GradientTransformation:
        """An optax transformation; its state is created sharded like the parameters."""
        raise NotImplementedError("TrainModule.configure_optimizers must return an optax optimizer")

    def trainable(self, model: nnx.Module) -> nnx.filterlib.Filter:
        """Which of ``model``'s parameters the optimizer trains (a Flax filter); the others
        are frozen: no gradient, no optimizer state. Default: only the LoRA adapters
        (``nnx.LoRAParam``) when the model has any, as PEFT trains them; else every
        ``nnx.Param``."""
        return default_trainable(model)

    def activation_rules(self) -> Mapping[str, PartitionSpec] | None:
        """Layouts for the model's ``shard_activation`` marks while steps are traced, e.g.
        ``jtp.plans.llama(sequence_parallel=True).activations``. ``None`` (default): those
        of the plan ``configure_model`` returned with ``(factory, plan)``, if any."""
        return None

    def checkpoint_metadata(self) -> dict[str, Any]:
        """JSON-able facts saved beside each checkpoint (model config, plan, ...)."""
        return {"module": type(self).__name__}

    def train_dataloader(self) -> Iterable[Any]:
        raise NotImplementedError(f"{type(self).__name__} has no train_dataloader")

    def val_dataloader(self) -> Iterable[Any]:
        raise NotImplementedError(f"{type(self).__name__} has no val_dataloader")

    def test_dataloader(self) -> Iterable[Any]:
        raise NotImplementedError(f"{type(self).__name__} has no test_dataloader")
