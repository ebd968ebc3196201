"""The Llama task (``jtp train --model llama``): next-token loss on random tokens or on a
prepared token directory, with a preset's shapes, a Hugging Face checkpoint's (fine-tuning,
LoRA), or shapes recorded in a training checkpoint.

What the task runs is worked out in one place, :func:`resolve`, from the task's config, the
model's shapes (:func:`model_shapes`, read once) and, once the trainer has one, the mesh:
the model config (kv heads replicated where the tensor axis is wider) and its plan (the
ready one, or inferred). Everything downstream (the model factory, the HF reader, the
capacity planner's compile, the benchmarks) takes that result.
"""

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

from jtp.data.datasets import RandomTokenDataset
from jtp.data.loader import DataLoader
from jtp.data.tokens import TokenDataset, read_meta
from jtp.errors import InputError
from jtp.mesh import TENSOR, ModelParallelStrategy, context_size
from jtp.models.hf import config_of, load_weights
from jtp.models.hf.config import max_positions_of, read_config
from jtp.models.llama import PRESETS, Llama, LlamaConfig
from jtp.models.lora import parse_targets
from jtp.models.plans import check_llama, llama, replicate_kv
from jtp.models.rope import rope_scaling_of
from jtp.parallel.context import NextTokenPieces
from jtp.parallel.infer import infer_plan
from jtp.parallel.parallelize import sharded_init
from jtp.parallel.plan import Plan
from jtp.recipes.config import LlamaTaskConfig
from jtp.recipes.objective import next_token_loss
from jtp.training.compile import trace_abstract_step
from jtp.training.module import StepOutput, TrainModule
from jtp.training.optimizers import adamw


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


def preset_config(name: str) -> LlamaConfig:
    """The :class:`LlamaConfig` of a preset name; an unknown name lists the presets."""
    if name not in PRESETS:
        raise InputError(f"unknown Llama preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def check_positions(seq_len: int, positions: int, where: str) -> None:
    """``--seq-len`` within the positions the model was built for (``where`` says which)."""
    if seq_len > positions:
        raise InputError(
            f"--seq-len {seq_len} is longer than the model allows: {positions} positions "
            f"({where}); pass --seq-len {positions} or less"
        )


def _lora(config: LlamaTaskConfig) -> dict[str, Any]:
    """The LoRA fields of a task config as LlamaConfig takes them."""
    return {
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_targets": parse_targets(config.lora_targets),
    }


def _moe(config: LlamaTaskConfig, shapes: LlamaConfig) -> LlamaConfig:
    """``shapes`` with the task's mixture-of-experts options (capacity factor, loss
    coefficients) where it sets them; refused for a dense model."""
    given = {
        name: getattr(config, name)
        for name in ("capacity_factor", "router_aux_loss_coef", "router_z_loss_coef")
        if getattr(config, name) is not None
    }
    if given and not shapes.n_experts:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InputError(f"{flags}: the model has no experts (a mixture-of-experts option)")
    return dataclasses.replace(shapes, **given) if given else shapes


def model_shapes(config: LlamaTaskConfig) -> LlamaConfig:
    """The model a task config names, before any mesh: ``config.hf``'s config.json (its
    positions checked against ``seq_len``) or ``config.preset``'s, with the task's remat
    policy, attention kernel, layer scan, LoRA and mixture-of-experts options; the
    vocabulary of ``config.data`` for a preset, or checked against it for a checkpoint."""
    run = {
        "remat": config.remat,
        "attention": config.attention,
        "context_attention": config.context_attention,
        "scan_layers": config.scan_layers,
    }
    if config.hf:  # positions used: seq_len (sliding windows)
        positions = max_positions_of(read_config(config.hf))
        where = f"max_position_embeddings in {config.hf}/config.json"
        check_positions(config.seq_len, positions, where)
        shapes = config_of(config.hf, max_seq_len=config.seq_len, **run, **_lora(config))
        if config.data:  # token ids must come from the checkpoint's own tokenizer
            data_vocab(config.data, shapes.vocab_size)
        return _moe(config, shapes)
    preset = preset_config(config.preset)
    shapes = dataclasses.replace(
        preset,
        vocab_size=data_vocab(config.data) if config.data else preset.vocab_size,
        max_seq_len=max(preset.max_seq_len, config.seq_len),
        **run,
        **_lora(config),
    )
    return _moe(config, shapes)


def check_context(seq_len: int, mesh: Mesh, *, sequence_parallel: bool = False) -> None:
    """``seq_len`` fits the context axis of ``mesh`` (none: nothing to check): each sequence
    is cut into 2C chunks, two per device (the balanced order,
    :func:`jtp.parallel.context.balanced_order`), and under sequence parallelism a device's
    piece of T / C tokens is split again over "tensor"."""
    pieces = context_size(mesh)
    if pieces == 1:
        return
    chunks = 2 * pieces
    if seq_len % chunks:
        raise InputError(
            f"--context-parallel {pieces} cuts each sequence into {chunks} chunks (two per "
            f"device, balanced for the causal mask): --seq-len {seq_len} is not divisible by "
            f"{chunks}; pick a multiple of {chunks}"
        )
    t = int(mesh.shape[TENSOR])
    if sequence_parallel and (seq_len // pieces) % t:
        raise InputError(
            f"--sequence-parallel with --context-parallel {pieces}: a device's piece of "
            f"--seq-len {seq_len} / {pieces} = {seq_len // pieces} tokens is not divisible by "
            f"the tensor axis ({t}); pick a --seq-len that is a multiple of {pieces * t} and "
            f"of {chunks}"
        )


@dataclasses.dataclass(frozen=True)
class LlamaSetup:
    """What a Llama task runs: the model's config and the plan that lays it out."""

    model: LlamaConfig
    plan: Plan


def resolve(config: LlamaTaskConfig, shapes: LlamaConfig, mesh: Mesh | None = None) -> LlamaSetup:
    """The one place a task's model config and plan are worked out.

    ``shapes``: :func:`model_shapes`'s result (or a recorded model config). Given ``mesh``,
    kv heads are replicated where its tensor axis is wider (:func:`jtp.plans.replicate_kv`)
    and the plan is checked to apply there (heads, and the sequence under sequence
    parallelism, divisible by the tensor size; the sequence by the context axis' chunks,
    :func:`check_context`). The plan is the model's ready one
    (:func:`jtp.plans.llama` with the task's sequence/loss parallelism and fsdp), or with
    ``plan="auto"`` read off the forward of one global batch (shapes only).
    """
    model = shapes
    if mesh is not None:
        model = replicate_kv(shapes, mesh)
        check_llama(model, mesh, seq_len=config.seq_len, sequence_parallel=config.sequence_parallel)
        check_context(config.seq_len, mesh, sequence_parallel=config.sequence_parallel)
    if config.plan == "auto":  # parameters only (no activation rules: config.py refuses them)
        tokens = jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32)
        tensor = None if mesh is None else int(mesh.shape[TENSOR])  # experts' split
        plan = infer_plan(lambda: Llama(model, rngs=nnx.Rngs(0)), tokens, tensor=tensor)
    else:
        plan = llama(
            model,
            sequence_parallel=config.sequence_parallel,
            loss_parallel=config.loss_parallel,
            fsdp=config.fsdp,
            mesh=mesh,
        )
    return LlamaSetup(model, plan)


class LlamaTask(TrainModule):
    """Lightning's tensor-parallel Llama example: next-token loss on random tokens, or on
    the token files of ``config.data`` (the vocabulary then comes from its ``meta.json``).
    The model's shapes are ``config.hf``'s, or ``config.preset``'s, or ``model_config``
    (recorded elsewhere: a training checkpoint's metadata, or cut to fewer layers)."""

    checked_splits: tuple[str, ...] = ("train",)  # token files checked on construction

    def __init__(
        self, config: LlamaTaskConfig | None = None, *, model_config: LlamaConfig | None = None
    ):
        config = self.config = config or LlamaTaskConfig()
        if model_config is not None and config.data:  # ids from the model's own tokenizer
            data_vocab(config.data, model_config.vocab_size)
        self.shapes = model_config if model_config is not None else model_shapes(config)
        for split in self.checked_splits if config.data else ():
            self._tokens(split)  # sizes against meta.json now, not after the model is built
        self.setup = resolve(config, self.shapes)  # refined for the mesh by model_factory

    @property
    def model_config(self) -> LlamaConfig:
        return self.setup.model

    @property
    def plan(self) -> Plan:
        return self.setup.plan

    def model_factory(self, mesh: Mesh | None = None) -> Callable[[], Llama]:
        """The model's factory; given ``mesh``, the task is first resolved for it
        (:func:`resolve`: kv replicas, the plan checked there)."""
        if mesh is not None:
            self.setup = resolve(self.config, self.shapes, mesh)
        mc, seed = self.setup.model, self.config.seed
        return lambda: Llama(mc, rngs=nnx.Rngs(seed))

    def configure_model(self, mesh: Mesh) -> nnx.Module:
        c = self.config
        factory = self.model_factory(mesh)
        if c.hf:  # each device reads its slice of the checkpoint, under the plan
            return load_weights(c.hf, mesh, self.model_config, self.plan, fsdp=c.fsdp, seed=c.seed)
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

    def training_step(self, model: nnx.Module, batch: jax.Array) -> StepOutput:
        """Next-token cross-entropy; with experts also the router's auxiliary losses, and
        routing metrics (:mod:`jtp.recipes.objective`)."""
        return next_token_loss(model, batch)

    validation_step = training_step

    def configure_optimizers(self) -> optax.GradientTransformation:
        return adamw(self.config, self)

    def _tokens(self, split: str) -> TokenDataset:
        c = self.config
        path = os.path.join(c.data, f"{split}.bin")
        return TokenDataset(path, c.seq_len, vocab_size=self.shapes.vocab_size)

    def pieces(self, dataset: Any) -> Any:
        """``dataset`` (samples of T + 1 token ids) as the mesh's batches take it: on a mesh
        with a context axis, each sample as ``{"inputs", "labels", "positions"}`` in the
        balanced order (:class:`jtp.parallel.context.NextTokenPieces`), which the loader
        splits over "context" and :func:`next_token_loss` takes; elsewhere unchanged."""
        pieces = context_size(self.mesh)
        if pieces == 1:
            return dataset
        check_context(self.config.seq_len, self.mesh)  # before a sample is read
        return NextTokenPieces(dataset, pieces)

    def train_dataloader(self) -> DataLoader:
        c = self.config
        if c.data:
            data = self._tokens("train")
        else:
            vocab = self.model_config.vocab_size
            data = RandomTokenDataset(vocab, c.seq_len, c.samples, seed=c.seed)
        data = self.pieces(data)
        return DataLoader(data, c.batch_size, mesh=self.mesh, shuffle=True, seed=c.seed)

    def val_dataloader(self) -> DataLoader:
        """``val.bin`` in order, every window once (the last batch completed by wrapping,
        counted once); without ``data``, the training set."""
        if not self.config.data:
            return self.train_dataloader()
        data = self.pieces(self._tokens("val"))
        return DataLoader(data, self.config.batch_size, mesh=self.mesh, drop_last=False)


def from_record[T](cls: type[T], record: dict[str, Any]) -> T:
    """``cls`` from a recorded ``asdict`` (:meth:`LlamaTask.checkpoint_metadata`), fields
    that no longer exist dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in names})


def model_config_of(record: dict[str, Any]) -> LlamaConfig:
    """The :class:`LlamaConfig` a checkpoint's metadata recorded (``dataclasses.asdict``)."""
    scaling = rope_scaling_of(record.get("rope_scaling"))  # its fields say which kind
    return from_record(LlamaConfig, {**record, "rope_scaling": scaling})


def trace_llama_step(
    config: LlamaTaskConfig,
    shape: tuple[int, int],
    devices: list[jax.Device],
    *,
    precision: str = "32-true",
    n_layers: int | None = None,
    accumulate: int = 1,
    grad_reduce: str | None = None,
    model_config: LlamaConfig | None = None,
    expert: int = 1,
    context: int = 1,
) -> tuple[jax.stages.Traced, Mesh]:
    """The traced Llama train step for ``config`` on a (data, tensor) mesh over the first
    devices (``("data", "expert", "tensor")`` with ``expert`` > 1; ``config.batch_size``
    then counts the rows of all data x expert ranks; a "context" axis before "tensor" with
    ``context`` > 1), optionally with ``n_layers`` blocks; and that mesh.

    One optimizer step over ``accumulate`` global batches of ``config.batch_size``
    sequences of ``config.seq_len + 1`` tokens (on a context axis, as the loader gives
    them there: ``{"inputs", "labels", "positions"}`` of ``config.seq_len`` each).
    ``model_config`` replaces the shapes ``config`` names (a model that has no preset).
    :func:`abstract_llama_step` compiles it.
    """
    shapes = model_config if model_config is not None else model_shapes(config)
    if n_layers is not None:
        shapes = dataclasses.replace(shapes, n_layers=n_layers)
    task = LlamaTask(config, model_config=shapes)
    strategy = ModelParallelStrategy(
        *shape,
        fsdp=config.fsdp,
        expert_parallel_size=expert,
        context_parallel_size=context,
        devices=devices[: shape[0] * shape[1] * expert * context],
    )
    rows = config.batch_size
    if context > 1:  # the pieces of jtp.parallel.context.NextTokenPieces, stacked
        pieces = jax.ShapeDtypeStruct((rows, config.seq_len), jnp.int32)
        batch: Any = dict.fromkeys(("inputs", "labels", "positions"), pieces)
    else:
        batch = jax.ShapeDtypeStruct((rows, config.seq_len + 1), jnp.int32)
    factory = task.model_factory(strategy.mesh)  # resolved for this mesh: plan below follows
    traced = trace_abstract_step(
        task,
        strategy,
        batch,
        factory=factory,
        plan=task.plan,
        precision=precision,
        accumulate_grad_batches=accumulate,
        grad_reduce=grad_reduce,
    )
    return traced, strategy.mesh


def abstract_llama_step(
    config: LlamaTaskConfig, shape: tuple[int, int], devices: list[jax.Device], **options: Any
) -> tuple[jax.stages.Compiled, Mesh]:
    """The compiled :func:`trace_llama_step` (same arguments) and its mesh. Shared by
    ``jtp bench llama`` and ``multihost``."""
    traced, mesh = trace_llama_step(config, shape, devices, **options)
    return traced.lower().compile(), mesh
