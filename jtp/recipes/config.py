"""The configs of the ready-made tasks (:mod:`jtp.recipes`): what ``jtp train`` sets, one
flag per field (:mod:`jtp.cli.flags`), each field's entry under Attributes its help."""

from __future__ import annotations

import dataclasses

from jtp.errors import check_fields
from jtp.models.attention import ATTENTION
from jtp.models.llama import PRESETS
from jtp.models.lora import TARGETS
from jtp.models.stack import REMAT_POLICIES, remat_name
from jtp.parallel.context import STRATEGIES as CONTEXT_STRATEGIES
from jtp.training.optimizers import LR_SCHEDULES

PLANS = ("ready", "auto")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What both tasks take.

    Attributes:
      samples: length of the random dataset (without --data).
      batch_size: global batch size (all data-parallel ranks together).
      lr: AdamW peak learning rate (3e-3, as in the Lightning docs).
      lr_schedule: ``constant`` (after the warmup) or ``cosine`` decay to lr / 10 over the
        run's optimizer steps.
      warmup_steps: linear learning-rate warmup from 0 over this many optimizer steps.
      weight_decay: AdamW's decoupled weight decay (optax's default).
      seed: parameter init and data order (and the Trainer's global RNGs).
      fsdp: 2D: also shard the parameters over the "data" axis.
      plan: how the model is split over "tensor": ``ready`` (the model's hand-written plan,
        jtp.plans) or ``auto`` (jtp.infer_plan traces the forward and pairs its layers; it
        places parameters only, so not with --sequence-parallel or --loss-parallel, whose
        activation rules belong to the ready plan).
    """

    samples: int = dataclasses.field(default=64, metadata={"min": 1})
    batch_size: int = dataclasses.field(default=8, metadata={"min": 1})
    lr: float = dataclasses.field(default=3e-3, metadata={"above": 0})
    lr_schedule: str = dataclasses.field(default="constant", metadata={"choices": LR_SCHEDULES})
    warmup_steps: int = dataclasses.field(default=0, metadata={"min": 0})
    weight_decay: float = dataclasses.field(default=1e-4, metadata={"min": 0})
    seed: int = 0
    fsdp: bool = False
    plan: str = dataclasses.field(default="ready", metadata={"choices": PLANS})

    def __post_init__(self) -> None:
        check_fields(self)  # ranges and finite numbers, before anything is built


@dataclasses.dataclass(frozen=True)
class FeedForwardConfig(TaskConfig):
    """The Lightning docs' FeedForward example (``--model feedforward``).

    Attributes:
      dim: FeedForward input/output features (8192: the Lightning docs' example size).
      hidden_dim: FeedForward hidden features.
    """

    dim: int = dataclasses.field(default=8192, metadata={"min": 1})
    hidden_dim: int = dataclasses.field(default=8192, metadata={"min": 1})


@dataclasses.dataclass(frozen=True)
class LlamaTaskConfig(TaskConfig):
    """Next-token prediction with a Llama (``--model llama``).

    Attributes:
      preset: the model's shape: a key of jtp.models.llama.PRESETS (the tiny ones train on
        CPU; the others are real models' shapes, for planning or GPUs).
      seq_len: tokens per sample fed to the model (the dataset adds one for the labels).
      data: DIR written by python -m jtp.prepare: train on DIR/train.bin, validate on
        DIR/val.bin, the vocabulary from DIR/meta.json (instead of random tokens).
      sequence_parallel: split the residual stream on the sequence over "tensor".
      loss_parallel: cross-entropy on vocabulary-sharded logits.
      remat: activation checkpointing, what each block keeps for the backward pass:
        ``none``; ``full`` (only its input: the block is recomputed; the flag alone means
        this); ``dots`` (also the projections' outputs: norms, RoPE, SwiGLU and attention
        scores are recomputed); ``minimal`` (also the attention output). True / False, from
        older configs, mean full / none.
      scan_layers: stack the blocks' parameters on a layer axis and run them with one
        ``jax.lax.scan`` (compiled once whatever the depth); ``--no-scan-layers``: unrolled.
      hf: fine-tune this Hugging Face checkpoint directory (instead of ``preset``).
      attention: the attention kernel: ``auto`` (cuDNN's fused attention on a GPU with
        bf16/fp16 inputs, XLA's elsewhere), ``xla``, ``cudnn`` (an error where it cannot
        run), or ``blockwise`` (jtp's flash-style attention in JAX: O(T) memory anywhere).
      context_attention: how attention crosses the pieces of a context axis
        (``--context-parallel``): ``all-gather`` of the keys and values, or ``ring``
        (blocks passed around the context group; docs/context.md says which to take).
      lora_rank: > 0: LoRA fine-tuning: adapters of this rank on the ``lora_targets``
        linears, the base frozen (no gradients, no optimizer state); 0: train everything.
      lora_alpha: LoRA's alpha: the adapters add ``(lora_alpha / lora_rank) B A x``, as PEFT.
      lora_targets: the adapted linears, PEFT's names comma-separated: q,k,v,o (attention),
        gate,up,down (MLP).
      capacity_factor: a mixture-of-experts model only: each expert takes at most
        ``ceil(factor * tokens * k / experts)`` (token, expert) pairs of a forward and drops
        the rest (counted in the metrics); default: dropless.
      router_aux_loss_coef: a mixture-of-experts model only: weight of the load-balancing
        loss added to the training loss; none: the model's (its preset or config.json).
      router_z_loss_coef: a mixture-of-experts model only: weight of the router z-loss (0:
        off); none: the model's.
    """

    preset: str = dataclasses.field(default="tiny", metadata={"choices": tuple(PRESETS)})
    seq_len: int = dataclasses.field(default=32, metadata={"min": 1})
    data: str | None = None
    sequence_parallel: bool = False
    loss_parallel: bool = False
    remat: str = dataclasses.field(
        default="none", metadata={"choices": REMAT_POLICIES, "bare": "full", "negated": "none"}
    )
    scan_layers: bool = True
    hf: str | None = None
    attention: str = dataclasses.field(default="auto", metadata={"choices": ATTENTION})
    context_attention: str = dataclasses.field(
        default="all-gather", metadata={"choices": CONTEXT_STRATEGIES}
    )
    lora_rank: int = dataclasses.field(default=0, metadata={"min": 0})
    lora_alpha: float = dataclasses.field(default=16.0, metadata={"above": 0})
    lora_targets: str = ",".join(TARGETS)
    capacity_factor: float | None = dataclasses.field(default=None, metadata={"above": 0})
    router_aux_loss_coef: float | None = dataclasses.field(default=None, metadata={"min": 0})
    router_z_loss_coef: float | None = dataclasses.field(default=None, metadata={"min": 0})

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "remat", remat_name(self.remat))  # True -> "full", ...
        if self.plan == "auto" and (self.sequence_parallel or self.loss_parallel):
            raise ValueError(
                "--plan auto infers where parameters go, not the activation rules "
                "--sequence-parallel and --loss-parallel need: drop them, or use --plan ready"
            )
