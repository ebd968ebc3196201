"""Ready-made TrainModules used by ``python -m jtp.train`` and the benchmarks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jtp.analysis.abstract import abstract_train_step
from jtp.mesh import ModelParallelStrategy
from jtp.models import FeedForward
from jtp.models.hf import config_of, load_pretrained
from jtp.models.llama import PRESETS, Llama, LlamaConfig, cross_entropy
from jtp.models.plans import check_llama, feedforward, llama
from jtp.parallel.parallelize import sharded_init
from jtp.training.data import DataLoader
from jtp.training.datasets import RandomDataset, RandomTokenDataset
from jtp.training.module import TrainModule

FEEDFORWARD_PLAN = feedforward()


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

    plan = FEEDFORWARD_PLAN

    def model_factory(self) -> Callable[[], FeedForward]:
        c = self.config
        return lambda: FeedForward(c.dim, c.hidden_dim, rngs=nnx.Rngs(c.seed))

    def configure_model(self, mesh: Mesh) -> nnx.Module:
        return sharded_init(self.model_factory(), mesh, self.plan, fsdp=self.config.fsdp)

    def checkpoint_metadata(self) -> dict:
        plan = {k: type(v).__name__ for k, v in FEEDFORWARD_PLAN.items()}
        return {"model": "FeedForward", "config": dataclasses.asdict(self.config), "plan": plan}

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


def preset_config(name: str) -> LlamaConfig:
    """The :class:`LlamaConfig` of a preset name; an unknown name lists the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown Llama preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclasses.dataclass(frozen=True)
class LlamaTaskConfig:
    preset: str = "tiny"  # key of jtp.models.llama.PRESETS
    seq_len: int = 32  # tokens per sample fed to the model (the dataset adds one for labels)
    samples: int = 64  # RandomTokenDataset length
    batch_size: int = 8  # global batch
    lr: float = 3e-3  # AdamW
    seed: int = 0  # parameter init and data order
    fsdp: bool = False  # 2D: also shard over "data"
    sequence_parallel: bool = False  # residual stream split on the sequence over "tensor"
    loss_parallel: bool = False  # cross-entropy on vocabulary-sharded logits
    remat: bool = False  # activation checkpointing per block
    hf: str | None = None  # start from this Hugging Face checkpoint directory (not `preset`)


class LlamaTask(TrainModule):
    """Lightning's tensor-parallel Llama example: next-token loss on random tokens."""

    def __init__(self, config: LlamaTaskConfig = LlamaTaskConfig()):
        self.config = config
        if config.hf:  # the checkpoint's shapes; positions used: seq_len (sliding windows)
            self.model_config = config_of(config.hf, max_seq_len=config.seq_len, remat=config.remat)
        else:
            self.model_config = dataclasses.replace(
                preset_config(config.preset), remat=config.remat
            )
        self.plan = llama(
            self.model_config,
            sequence_parallel=config.sequence_parallel,
            loss_parallel=config.loss_parallel,
        )

    def model_factory(self, mesh: Mesh | None = None) -> Callable[[], Llama]:
        """The model's factory; given ``mesh``, first check that the plan applies there
        (heads, and the sequence under sequence parallelism, divisible by the tensor size)."""
        mc, c = self.model_config, self.config
        if mesh is not None:
            check_llama(mc, mesh, seq_len=c.seq_len, sequence_parallel=c.sequence_parallel)
        return lambda: Llama(mc, rngs=nnx.Rngs(c.seed))

    def configure_model(self, mesh: Mesh) -> nnx.Module:
        c = self.config
        factory = self.model_factory(mesh)  # checks the plan applies on this mesh
        if c.hf:  # each device reads its slice of the checkpoint
            return load_pretrained(
                c.hf, mesh, fsdp=c.fsdp, sequence_parallel=c.sequence_parallel,
                loss_parallel=c.loss_parallel, remat=c.remat, max_seq_len=c.seq_len,
            )  # fmt: skip
        return sharded_init(factory, mesh, self.plan, fsdp=c.fsdp)

    def activation_rules(self) -> Mapping[str, PartitionSpec]:
        return self.plan.activations

    def checkpoint_metadata(self) -> dict:
        return {
            "model": "Llama",
            "config": dataclasses.asdict(self.config),
            "model_config": dataclasses.asdict(self.model_config),
            "plan": {k: type(v).__name__ for k, v in self.plan.items()},
        }

    def training_step(self, model: nnx.Module, batch: jax.Array) -> jax.Array:
        inputs_bt, labels_bt = batch[:, :-1], batch[:, 1:]
        return cross_entropy(model(inputs_bt), labels_bt)

    validation_step = training_step

    def configure_optimizers(self) -> optax.GradientTransformation:
        return optax.adamw(self.config.lr)

    def train_dataloader(self) -> DataLoader:
        c = self.config
        data = RandomTokenDataset(self.model_config.vocab_size, c.seq_len, c.samples, seed=c.seed)
        return DataLoader(data, c.batch_size, mesh=self.mesh, shuffle=True, seed=c.seed)

    val_dataloader = train_dataloader


def abstract_llama_step(
    config: Any,
    shape: tuple[int, int],
    devices: list[jax.Device],
    *,
    precision: str = "32-true",
    n_layers: int | None = None,
    accumulate: int = 1,
    grad_reduce: str | None = None,
    model_config: LlamaConfig | None = None,
) -> tuple[jax.stages.Compiled, Mesh]:
    """The compiled Llama train step for ``LlamaTaskConfig`` ``config`` on a (data, tensor)
    mesh over the first devices, optionally with ``n_layers`` blocks; and that mesh.

    One optimizer step over ``accumulate`` global batches of ``config.batch_size``
    sequences of ``config.seq_len + 1`` tokens. Shared by ``python -m jtp.bench llama`` and
    the planner. ``model_config`` replaces the preset's (a model that has no preset).
    """
    task = LlamaTask(config)
    if model_config is not None:
        task.model_config = model_config
    if n_layers is not None:
        task.model_config = dataclasses.replace(task.model_config, n_layers=n_layers)
    strategy = ModelParallelStrategy(
        *shape, fsdp=config.fsdp, devices=devices[: shape[0] * shape[1]]
    )
    batch = jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32)
    compiled = abstract_train_step(
        task, strategy, batch, factory=task.model_factory(strategy.mesh), plan=task.plan,
        precision=precision, accumulate_grad_batches=accumulate, grad_reduce=grad_reduce,
    )  # fmt: skip
    return compiled, strategy.mesh
