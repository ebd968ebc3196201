"""The Lightning docs' tensor-parallel example as a task: a FeedForward, ``output.sum()``,
AdamW, random inputs (``jtp train --model feedforward``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jtp.data.datasets import RandomDataset
from jtp.data.loader import DataLoader
from jtp.models import FeedForward
from jtp.models.plans import feedforward
from jtp.parallel.infer import infer_plan
from jtp.parallel.parallelize import sharded_init
from jtp.parallel.plan import Plan
from jtp.recipes.config import FeedForwardConfig
from jtp.training.module import TrainModule
from jtp.training.optimizers import adamw

FEEDFORWARD_PLAN = feedforward()


class FeedForwardTask(TrainModule):
    """Lightning's tensor-parallel docs example: FeedForward, ``output.sum()``, AdamW."""

    plan: Plan = FEEDFORWARD_PLAN

    def __init__(self, config: FeedForwardConfig | None = None):
        c = self.config = config or FeedForwardConfig()
        if c.plan == "auto":  # read off the forward of one global batch (shapes only)
            batch = jax.ShapeDtypeStruct((c.batch_size, c.dim), jnp.float32)
            self.plan = infer_plan(self.model_factory(), batch)

    def model_factory(self, mesh: Mesh | None = None) -> Callable[[], FeedForward]:
        """The model's factory (any mesh: the plan applies to every one that divides it)."""
        c = self.config
        return lambda: FeedForward(c.dim, c.hidden_dim, rngs=nnx.Rngs(c.seed))

    def configure_model(self, mesh: Mesh) -> nnx.Module:
        return sharded_init(self.model_factory(), mesh, self.plan, fsdp=self.config.fsdp)

    def checkpoint_metadata(self) -> dict:
        plan = {k: type(v).__name__ for k, v in self.plan.items()}
        return {"model": "FeedForward", "config": dataclasses.asdict(self.config), "plan": plan}

    def training_step(self, model: nnx.Module, batch: jax.Array) -> jax.Array:
        return model(batch).sum()

    def validation_step(self, model: nnx.Module, batch: jax.Array) -> jax.Array:
        return model(batch).sum()

    def configure_optimizers(self) -> optax.GradientTransformation:
        return adamw(self.config, self)

    def train_dataloader(self) -> DataLoader:
        c = self.config
        dataset = RandomDataset(c.dim, c.samples, seed=c.seed)
        return DataLoader(dataset, c.batch_size, mesh=self.mesh, shuffle=True, seed=c.seed)

    val_dataloader = train_dataloader
