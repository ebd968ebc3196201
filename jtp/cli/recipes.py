"""Ready-made TrainModules used by ``python -m jtp.train`` and the benchmarks."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jtp.cli.task_config import LR_SCHEDULES, FeedForwardConfig, LlamaTaskConfig
from jtp.data.datasets import RandomDataset, RandomTokenDataset
from jtp.data.loader import DataLoader
from jtp.data.tokens import TokenDataset, read_meta
from jtp.errors import InputError
from jtp.mesh import ModelParallelStrategy
from jtp.models import FeedForward
from jtp.models.hf import config_of, load_pretrained
from jtp.models.hf.config import max_positions_of, read_config
from jtp.models.llama import PRESETS, Llama, LlamaConfig, cross_entropy
from jtp.models.lora import parse_targets
from jtp.models.plans import check_llama, feedforward, llama, replicate_kv
from jtp.parallel.infer import infer_plan
from jtp.parallel.parallelize import parallelize, sharded_init
from jtp.parallel.plan import Plan
from jtp.training.compile import trace_abstract_step
from jtp.training.module import TrainModule

FEEDFORWARD_PLAN = feedforward()
FINAL_LR_RATIO = 0.1  # cosine decays to lr / 10 (nanoGPT's and Chinchilla's choice)


def lr_schedule(
    kind: str, lr: float, *, warmup_steps: int = 0, total_steps: int | None = None
) -> optax.ScalarOrSchedule:
    """``constant`` (after an optional linear warmup from 0) or ``cosine``: linear warmup
    from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * FINAL_LR_RATIO`` at
    ``total_steps`` (the run's optimizer steps; the warmup counts in them)."""
    if kind not in LR_SCHEDULES:
        raise InputError(f"--lr-schedule {kind!r}: choose one of {LR_SCHEDULES}")
    if warmup_steps < 0:
        raise InputError(f"--warmup-steps {warmup_steps} must be >= 0")
    if kind == "constant":
        return optax.warmup_constant_schedule(0.0, lr, warmup_steps) if warmup_steps else lr
    if total_steps is None or total_steps <= warmup_steps:
        raise InputError(
            f"--lr-schedule cosine: --warmup-steps {warmup_steps} must be below the run's "
            f"{total_steps} optimizer steps"
        )
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, total_steps, end_value=lr * FINAL_LR_RATIO
    )


def adamw(config: Any, module: TrainModule) -> optax.GradientTransformation:
    """AdamW with ``config``'s lr, schedule and weight decay, its hyperparameters kept in
    the optimizer state (``optax.inject_hyperparams``) so the trainer logs the lr applied.
    A cosine schedule decays over the trainer's ``estimated_stepping_batches``."""
    total = module.trainer.estimated_stepping_batches if config.lr_schedule == "cosine" else None
    schedule = lr_schedule(
        config.lr_schedule, config.lr, warmup_steps=config.warmup_steps, total_steps=total
    )
    # Only lr and weight decay live in the state: the betas and eps stay Python constants,
    # as in optax.adamw. In the state they would take the parameters' dtype, and under
    # bf16-true b2 = 0.999 rounds to 1.0 in bf16 (Adam's bias correction then divides by 0).
    static = ("b1", "b2", "eps", "eps_root")
    adamw_ = optax.inject_hyperparams(optax.adamw, static_args=static)
    return adamw_(learning_rate=schedule, weight_decay=config.weight_decay)


def data_vocab(directory: str, model_vocab: int | None = None) -> int:
    """The vocabulary of a prepared token directory (its ``meta.json``); given the
    vocabulary of a model that has its own (a checkpoint), they must be equal: ids from
    another tokenizer would mean other tokens."""
    meta = read_meta(directory)
    vocab = int(meta["vocab_size"])
    if model_vocab is not None and model_vocab != vocab:
        raise InputError(
            f"--data {directory}: vocabulary {vocab} (tokenizer {meta.get('tokenizer')}) but "
            f"the model's is {model_vocab}; prepare the text with the model's tokenizer: "
            f"python -m jtp.prepare FILES... --out DIR --tokenizer CHECKPOINT/tokenizer.json"
        )
    return vocab


class FeedForwardTask(TrainModule):
    """Lightning's tensor-parallel docs example: FeedForward, ``output.sum()``, AdamW."""

    plan: Plan = FEEDFORWARD_PLAN

    def __init__(self, config: FeedForwardConfig | None = None):
        c = self.config = config or FeedForwardConfig()
        if c.plan == "auto":  # read off the forward of one global batch (shapes only)
            batch = jax.ShapeDtypeStruct((c.batch_size, c.dim), jnp.float32)
            self.plan = infer_plan(self.model_factory(), batch)

    def model_factory(self) -> Callable[[], FeedForward]:
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


def preset_config(name: str) -> LlamaConfig:
    """The :class:`LlamaConfig` of a preset name; an unknown name lists the presets."""
    if name not in PRESETS:
        raise InputError(f"unknown Llama preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def _lora(config: LlamaTaskConfig) -> dict[str, Any]:
    """The LoRA fields of a task config as LlamaConfig / load_pretrained take them."""
    return {
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_targets": parse_targets(config.lora_targets),
    }


def check_positions(seq_len: int, positions: int, where: str) -> None:
    """``--seq-len`` within the positions the model was built for (``where`` says which)."""
    if seq_len > positions:
        raise InputError(
            f"--seq-len {seq_len} is longer than the model allows: {positions} positions "
            f"({where}); pass --seq-len {positions} or less"
        )


class LlamaTask(TrainModule):
    """Lightning's tensor-parallel Llama example: next-token loss on random tokens, or on
    the token files of ``config.data`` (the vocabulary then comes from its ``meta.json``).
    The model's shape is ``config.hf``'s, or ``config.preset``'s, or ``model_config``."""

    checked_splits: tuple[str, ...] = ("train",)  # token files checked on construction

    def __init__(
        self, config: LlamaTaskConfig | None = None, *, model_config: LlamaConfig | None = None
    ):
        config = self.config = config or LlamaTaskConfig()
        if model_config is not None:  # recorded elsewhere (a training checkpoint's metadata)
            self.model_config = model_config
            if config.data:  # token ids must come from the model's own tokenizer
                data_vocab(config.data, model_config.vocab_size)
        elif config.hf:  # the checkpoint's shapes; positions used: seq_len (sliding windows)
            positions = max_positions_of(read_config(config.hf))
            where = f"max_position_embeddings in {config.hf}/config.json"
            check_positions(config.seq_len, positions, where)
            self.model_config = config_of(
                config.hf, max_seq_len=config.seq_len, remat=config.remat,
                attention=config.attention, scan_layers=config.scan_layers, **_lora(config),
            )  # fmt: skip
            if config.data:  # token ids must come from the checkpoint's own tokenizer
                data_vocab(config.data, self.model_config.vocab_size)
        else:
            preset = preset_config(config.preset)
            self.model_config = dataclasses.replace(
                preset,
                remat=config.remat,
                scan_layers=config.scan_layers,
                attention=config.attention,
                vocab_size=data_vocab(config.data) if config.data else preset.vocab_size,
                max_seq_len=max(preset.max_seq_len, config.seq_len),
                **_lora(config),
            )
        for split in self.checked_splits if config.data else ():
            self._tokens(split)  # sizes against meta.json now, not after the model is built
        self.plan = self._plan()

    def _plan(self) -> Plan:
        c = self.config
        if c.plan == "auto":  # one global batch, abstractly; parameters only (no activations)
            tokens = jax.ShapeDtypeStruct((c.batch_size, c.seq_len), jnp.int32)
            return infer_plan(lambda: Llama(self.model_config, rngs=nnx.Rngs(0)), tokens)
        return llama(
            self.model_config, sequence_parallel=c.sequence_parallel,
            loss_parallel=c.loss_parallel, fsdp=c.fsdp,
        )  # fmt: skip

    def model_factory(self, mesh: Mesh | None = None) -> Callable[[], Llama]:
        """The model's factory; given ``mesh``, first fit the model to it (kv heads
        replicated where the tensor axis is wider: :func:`jtp.plans.replicate_kv`, the plan
        following) and check that the plan applies there (heads, and the sequence under
        sequence parallelism, divisible by the tensor size)."""
        c = self.config
        if mesh is not None:
            fitted = replicate_kv(self.model_config, mesh)
            if fitted != self.model_config:
                self.model_config = fitted
                self.plan = self._plan()
            check_llama(fitted, mesh, seq_len=c.seq_len, sequence_parallel=c.sequence_parallel)
        mc = self.model_config
        return lambda: Llama(mc, rngs=nnx.Rngs(c.seed))

    def configure_model(self, mesh: Mesh) -> nnx.Module:
        c = self.config
        factory = self.model_factory(mesh)  # checks the plan applies on this mesh
        if c.hf:  # each device reads its slice of the checkpoint (under the ready plan)
            model = load_pretrained(
                c.hf, mesh, fsdp=c.fsdp, sequence_parallel=c.sequence_parallel,
                loss_parallel=c.loss_parallel, remat=c.remat, max_seq_len=c.seq_len,
                attention=c.attention, scan_layers=c.scan_layers, seed=c.seed, **_lora(c),
            )  # fmt: skip
            return model if c.plan == "ready" else parallelize(model, mesh, self.plan, fsdp=c.fsdp)
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
        return adamw(self.config, self)

    def _tokens(self, split: str) -> TokenDataset:
        c = self.config
        path = os.path.join(c.data, f"{split}.bin")
        return TokenDataset(path, c.seq_len, vocab_size=self.model_config.vocab_size)

    def train_dataloader(self) -> DataLoader:
        c = self.config
        if c.data:
            data = self._tokens("train")
        else:
            vocab = self.model_config.vocab_size
            data = RandomTokenDataset(vocab, c.seq_len, c.samples, seed=c.seed)
        return DataLoader(data, c.batch_size, mesh=self.mesh, shuffle=True, seed=c.seed)

    def val_dataloader(self) -> DataLoader:
        """``val.bin`` in order, every window once (the last batch completed by wrapping,
        counted once); without ``data``, the training set."""
        if not self.config.data:
            return self.train_dataloader()
        data = self._tokens("val")
        return DataLoader(data, self.config.batch_size, mesh=self.mesh, drop_last=False)


def trace_llama_step(
    config: Any,
    shape: tuple[int, int],
    devices: list[jax.Device],
    *,
    precision: str = "32-true",
    n_layers: int | None = None,
    accumulate: int = 1,
    grad_reduce: str | None = None,
    model_config: LlamaConfig | None = None,
) -> tuple[jax.stages.Traced, Mesh]:
    """The traced Llama train step for ``LlamaTaskConfig`` ``config`` on a (data, tensor)
    mesh over the first devices, optionally with ``n_layers`` blocks; and that mesh.

    One optimizer step over ``accumulate`` global batches of ``config.batch_size``
    sequences of ``config.seq_len + 1`` tokens. ``model_config`` replaces the preset's (a
    model that has no preset). :func:`abstract_llama_step` compiles it.
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
    traced = trace_abstract_step(
        task, strategy, batch, factory=task.model_factory(strategy.mesh), plan=task.plan,
        precision=precision, accumulate_grad_batches=accumulate, grad_reduce=grad_reduce,
    )  # fmt: skip
    return traced, strategy.mesh


def abstract_llama_step(
    config: Any, shape: tuple[int, int], devices: list[jax.Device], **options: Any
) -> tuple[jax.stages.Compiled, Mesh]:
    """The compiled :func:`trace_llama_step` (same arguments) and its mesh. Shared by
    ``python -m jtp.bench llama`` and ``multihost``."""
    traced, mesh = trace_llama_step(config, shape, devices, **options)
    return traced.lower().compile(), mesh
