"""What ``python -m jtp.eval`` evaluates: a Llama-family model, from a Hugging Face directory
or a training checkpoint, on one split of a prepared token directory, as ``fit`` validates.

The loss is the mean over tokens. Of a split file of n ids and ``seq_len`` T, window i is
``ids[i*T : (i+1)*T + 1]`` (:class:`jtp.TokenDataset`): W = (n - 1) // T full windows, each
scored once on its T next-token labels, with no padding inside a window; the last
(n - 1) - W*T ids fill no window and are not scored. The windows are batched in order; a
last batch of r < B windows is completed with the first ones and the repeats are subtracted
exactly (:mod:`jtp.training.evaluate`), so the result is (sum of the W*T token losses) /
(W*T) whatever the batch size and the mesh.

Every refusal here (missing directory or split, another vocabulary, a window longer than the
model's positions, too few tokens) comes before a weight is read or a step compiled.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jtp.checkpoint.model import llama_record, restore_model
from jtp.data.loader import DataLoader
from jtp.data.tokens import read_meta
from jtp.errors import InputError
from jtp.models.attention import ATTENTION
from jtp.models.hf.config import max_positions_of, read_config
from jtp.models.llama import LlamaConfig
from jtp.parallel.abstract import abstract_sharded
from jtp.recipes.config import LlamaTaskConfig
from jtp.recipes.llama import LlamaTask, check_positions, from_record, model_config_of
from jtp.recipes.objective import lm_loss
from jtp.training.precision import PRECISIONS

SPLITS = ("val", "train")
HF_SEQ_LEN = 1024  # --hf's default window (GPT-2's context), or the model's positions if fewer
HF_BATCH = 8  # --hf's default global batch


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``python -m jtp.eval`` evaluates, and how (one flag per field).

    Attributes:
      hf: a Hugging Face checkpoint directory (what jtp.hf.load_pretrained reads).
      checkpoint: a training checkpoint directory (python -m jtp.train --checkpoint-dir).
      step: with ``checkpoint``, the step to evaluate; None: the newest.
      data: DIR written by python -m jtp.prepare with the model's tokenizer.
      split: the file of DIR scored: ``val`` (val.bin) or ``train`` (train.bin).
      seq_len: tokens per window (each window adds one for its last label); None: the
        training run's (``checkpoint``), or 1024 or the model's positions if fewer (``hf``).
      batch_size: windows per global batch; None: the training run's, or 8.
      precision: None: the precision the checkpoint was trained in, or 32-true for ``hf``.
      fsdp: 2D: also shard the parameters over the "data" axis.
      sequence_parallel: split the residual stream on the sequence over "tensor".
      loss_parallel: cross-entropy on vocabulary-sharded logits.
      attention: the attention kernel (as python -m jtp.train --attention).
    """

    hf: str | None = None
    checkpoint: str | None = None
    step: int | None = None
    data: str | None = None
    split: str = dataclasses.field(default="val", metadata={"choices": SPLITS})
    seq_len: int | None = None
    batch_size: int | None = None
    precision: str | None = dataclasses.field(
        default=None, metadata={"choices": (None, *PRECISIONS)}
    )
    fsdp: bool = False
    sequence_parallel: bool = False
    loss_parallel: bool = False
    attention: str = dataclasses.field(default="auto", metadata={"choices": ATTENTION})


class PerplexityTask(LlamaTask):
    """A :class:`LlamaTask` whose validation set is one split of ``config.data`` in order,
    its model loaded from ``config.hf`` or restored from a training ``checkpoint``."""

    checked_splits = ()  # its one split is checked below, after the split is known

    def __init__(
        self,
        config: LlamaTaskConfig,
        *,
        split: str = "val",
        model_config: LlamaConfig | None = None,
        checkpoint: str | None = None,
        step: int | None = None,
    ):
        super().__init__(config, model_config=model_config)
        self.split, self.checkpoint, self.step = split, checkpoint, step
        path = os.path.join(config.data, f"{split}.bin")
        if not os.path.isfile(path):
            raise InputError(
                f"--data {config.data}: no {split}.bin (python -m jtp.prepare writes "
                "train.bin and val.bin)"
            )
        self.windows = self._tokens(split)  # its length and ids checked now, not at compile

    def configure_model(self, mesh: Mesh) -> nnx.Module:
        if self.checkpoint is None:
            return super().configure_model(mesh)  # each device reads its slice of config.hf
        factory = self.model_factory(mesh)  # checks the plan applies on this mesh
        abstract = abstract_sharded(nnx.eval_shape(factory), mesh, self.plan, fsdp=self.config.fsdp)
        model, _, _ = restore_model(self.checkpoint, abstract, step=self.step)
        return model

    def validation_step(self, model: nnx.Module, batch: jax.Array) -> jax.Array:
        """The language-model loss alone: a MoE model's auxiliary losses are a training
        objective, not part of what perplexity measures."""
        return lm_loss(model, batch)

    def val_dataloader(self) -> DataLoader:
        """Every window once, in order; the last batch completed by wrapping (counted once);
        on a mesh with a context axis, each window in the balanced order (its loss, a mean
        over tokens, is the same)."""
        windows = self.pieces(self.windows)
        return DataLoader(windows, self.config.batch_size, mesh=self.mesh, drop_last=False)


def _parallel(e: EvalConfig) -> dict[str, Any]:
    names = ("fsdp", "sequence_parallel", "loss_parallel", "attention")
    return {n: getattr(e, n) for n in names}


def hf_task(e: EvalConfig) -> PerplexityTask:
    """The task of ``--hf DIR`` (its config checked, no weight read yet)."""
    positions = max_positions_of(read_config(e.hf))
    seq_len = e.seq_len or min(HF_SEQ_LEN, positions)
    check_positions(seq_len, positions, f"max_position_embeddings in {e.hf}/config.json")
    config = LlamaTaskConfig(
        hf=e.hf,
        data=e.data,
        seq_len=seq_len,
        batch_size=e.batch_size or HF_BATCH,
        **_parallel(e),
    )
    return PerplexityTask(config, split=e.split)


def checkpoint_task(e: EvalConfig) -> tuple[PerplexityTask, dict[str, Any]]:
    """The task of ``--checkpoint DIR`` and the metadata of the step it restores (read
    from the checkpoint's JSON record; no array read yet)."""
    module, meta, step = llama_record(e.checkpoint, e.step, "jtp.eval scores")
    trained = from_record(LlamaTaskConfig, module["config"])
    seq_len = e.seq_len or trained.seq_len
    model_config = dataclasses.replace(
        model_config_of(module["model_config"]), remat="none", attention=e.attention
    )
    check_positions(seq_len, model_config.max_seq_len, "the max_seq_len it was built with")
    config = dataclasses.replace(
        trained,
        hf=None,
        data=e.data,
        seq_len=seq_len,
        remat="none",
        batch_size=e.batch_size or trained.batch_size,
        **_parallel(e),
    )
    task = PerplexityTask(
        config, split=e.split, model_config=model_config, checkpoint=e.checkpoint, step=step
    )
    return task, meta


def build_task(e: EvalConfig) -> tuple[PerplexityTask, str, dict[str, Any]]:
    """The task, the precision to run it in, and what the model is (``{"hf": DIR}`` or
    ``{"checkpoint": DIR, "step": N}``)."""
    if (e.hf is None) == (e.checkpoint is None):
        raise InputError("give exactly one of --hf DIR or --checkpoint DIR")
    if e.data is None:
        raise InputError("--data DIR is required: a directory written by python -m jtp.prepare")
    read_meta(e.data)  # a missing or foreign directory: said first
    if e.hf is not None:
        return hf_task(e), e.precision or "32-true", {"hf": e.hf}
    task, meta = checkpoint_task(e)
    precision = e.precision or meta.get("precision", "32-true")
    return task, precision, {"checkpoint": e.checkpoint, "step": task.step}
