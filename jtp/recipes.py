"""Ready-made TrainModules used by ``python -m jtp.train`` and the benchmarks."""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from jtp.data import DataLoader, RandomDataset
from jtp.models import FeedForward
from jtp.module import TrainModule
from jtp.parallelize import sharded_init
from jtp.plan import ColwiseParallel, RowwiseParallel

FEEDFORWARD_PLAN = {"w1": ColwiseParallel(), "w2": RowwiseParallel(), "w3": ColwiseParallel()}


@dataclasses.dataclass(frozen=True)
class FeedForwardConfig:
    dim: int = 8192  # the Lightning docs' example size
    hidden_dim: int = 8192
    samples: int = 64  # RandomDataset length
    batch_size: int = 8  # global batch
    lr: float = 3e-3  # AdamW, as in the docs
    seed: int = 0  # parameter init and data order
    fsdp: bool = False  # 2D: also shard over "data"


class FeedForwardTask(TrainModule):
    """Lightning's tensor-parallel docs example: FeedForward, ``output.sum()``, AdamW."""

    def __init__(self, config: FeedForwardConfig = FeedForwardConfig()):
        self.config = config

    def configure_model(self, mesh: Mesh) -> nnx.Module:
        c = self.config

        def factory() -> FeedForward:
            return FeedForward(c.dim, c.hidden_dim, rngs=nnx.Rngs(c.seed))

        return sharded_init(factory, mesh, FEEDFORWARD_PLAN, fsdp=c.fsdp)

    def training_step(self, model: nnx.Module, batch: jax.Array) -> jax.Array:
        return model(batch).sum()

    def validation_step(self, model: nnx.Module, batch: jax.Array) -> jax.Array:
        return model(batch).sum()

    def configure_optimizers(self) -> optax.GradientTransformation:
        return optax.adamw(self.config.lr)

    def train_dataloader(self) -> DataLoader:
        c = self.config
        dataset = RandomDataset(c.dim, c.samples, seed=c.seed)
        return DataLoader(dataset, c.batch_size, mesh=self.mesh, shuffle=True, seed=c.seed)

    val_dataloader = train_dataloader
