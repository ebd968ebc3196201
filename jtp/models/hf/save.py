"""``save_pretrained``: a (sharded) jtp Llama as an HF checkpoint transformers loads.

One parameter (one layer of a stacked parameter) at a time is gathered to process 0's host
(the others hold none), put in HF's layout (transposed, RoPE-permuted back,
:mod:`jtp.models.hf.names`), cast, and appended to its safetensors shard, so the writer
holds one whole tensor at a time (a Phi-3 fused tensor is its parts, gathered in turn and
stacked: :mod:`jtp.models.hf.families.phi3`; an MoE layer's experts, one parameter gathered
once and written as the hub's one tensor per expert). Every process takes part in each
gather; process 0 writes, into a temporary directory renamed onto ``path`` at the end: the
checkpoint there is complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jtp.checkpoint.consolidated import gathered_on_process_0
from jtp.models.hf import families
from jtp.models.hf.config import architecture, describes, hf_config, read_config
from jtp.models.hf.files import INDEX, SINGLE, staged_directory, write_safetensors
from jtp.models.hf.names import TensorMap, to_hf
from jtp.models.llama import Llama
from jtp.models.lora import merge_lora
from jtp.parallel.names import path_str

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
# Files of a source directory carried over: the tokenizer and the generation defaults.
_SIDE_FILES = (
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each under ``limit`` bytes (a tensor larger than
    the limit gets a file of its own, as transformers does)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if groups[-1] and total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _dtype_name(config: Mapping[str, Any]) -> str | None:
    return config.get("dtype") or config.get("torch_dtype")


def save_pretrained(
    model: Llama,
    path: str,
    *,
    source: str | Mapping[str, Any] | None = None,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write ``model`` as a Hugging Face checkpoint: ``config.json`` and safetensors.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` then computes the logits jtp
    does. Call it on every process (each takes part in gathering the parameters).

    Args:
      model: a jtp Llama, sharded or not (e.g. :func:`load_pretrained`'s, fine-tuned). With
        LoRA adapters, the merged model (:func:`jtp.models.lora.merge_lora`) is written.
      path: the output directory; replaced if it exists.
      source: the HF directory (or its parsed config.json) the model came from. Its
        config.json is written back with only the dtype changed, after checking that it
        describes this model; a directory's tokenizer and generation files are copied.
        Without it, a config for ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
        ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` / ``Gemma2ForCausalLM`` /
        ``Gemma3ForCausalLM`` / ``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM`` /
        ``Qwen3MoeForCausalLM`` / ``OlmoeForCausalLM`` (by the model's features) is derived
        from ``model.config``, and a model none of them computes is a ``ValueError``
        (nothing there says Phi-3: a Phi-3 source's fused tensors come back only with
        ``source=``; without, they are written as Llama's separate projections).
      dtype: dtype of the saved tensors; default the source's ``dtype`` / ``torch_dtype``,
        else the parameters' own. A bf16 checkpoint loaded into float32 and saved back
        without training is bitwise the original.
      max_shard_bytes: split into ``model-0000k-of-0000n.safetensors`` files of at most this
        many bytes, listed in ``model.safetensors.index.json``.
    """
    if model.config.lora_rank:  # the merged model: W + (alpha / r) A B in each kernel
        model = merge_lora(model)
    config = model.config
    src_dir = source if isinstance(source, str) and os.path.isdir(source) else None
    hf = dict(read_config(source) if isinstance(source, str) else source or {})
    if hf:
        describes(hf, config)
    name = np.dtype(dtype).name if dtype is not None else _dtype_name(hf)
    params = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    name = name or str(next(iter(params.values())).dtype)
    out_dtype = np.dtype(name)  # "bfloat16" resolves through ml_dtypes (imported by jax)
    if not hf:
        arch = families.default_architecture(config)
        hf = hf_config(config, arch, name)
        try:  # what transformers would read back must be this model
            describes(hf, config)
        except ValueError as e:
            raise ValueError(
                f"save_pretrained: no supported HF architecture computes this model ({arch}, "
                f"the closest, differs: {str(e).split(': ', 1)[-1]}); pass source= if it "
                "came from a checkpoint"
            ) from None
    hf["torch_dtype" if "torch_dtype" in hf else "dtype"] = name

    tensors: dict[str, list[TensorMap]] = {}  # HF name -> its parts (fused: several), in order
    for t in families.tensor_map(config, architecture(hf)):
        tensors.setdefault(t.hf, []).append(t)
    names = list(tensors)
    shapes = [p[0].hf_shape(tuple(params[p[0].jtp].shape)) for p in tensors.values()]
    sizes = [int(np.prod(s, dtype=np.int64)) * out_dtype.itemsize for s in shapes]
    groups = _shards(sizes, max_shard_bytes)
    files = (
        [SINGLE]
        if len(groups) == 1
        else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    )

    gather = _Gather(params)

    def produce(hf_name: str) -> np.ndarray:
        parts = [to_hf(t, gather(t)).astype(out_dtype) for t in tensors[hf_name]]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)  # fused: HF's row order

    inputs = [("source", src_dir)]
    with staged_directory(path, "jtp.hf.save_pretrained", "hf-checkpoint", inputs) as tmp:
        for file, group in zip(files, groups, strict=True):
            entries = [(names[i], out_dtype, shapes[i]) for i in group]
            if tmp is not None:
                write_safetensors(os.path.join(tmp, file), entries, produce)
            else:  # take part in the same gathers, in the same order
                for hf_name, _, _ in entries:
                    for t in tensors[hf_name]:
                        gather(t)
        if tmp is not None:
            _finish(tmp, hf, src_dir, files, groups, names, sizes)


class _Gather:
    """Each tensor's slice of its parameter on process 0 (None elsewhere), gathered one
    parameter (one layer of a stacked one) at a time. An MoE layer's per-expert tensors
    come in a row from one gather: the last gathered is kept while its experts are
    written (every process calls in the same order, so all make the same gathers)."""

    def __init__(self, params: dict[str, Any]):
        self.params, self.key, self.value = params, None, None

    def __call__(self, t: TensorMap) -> np.ndarray | None:
        if (t.jtp, t.layer) != self.key:
            self.key, self.value = None, None  # the previous one dropped before the next
            self.value = gathered_on_process_0(self.params[t.jtp], t.layer)
            self.key = (t.jtp, t.layer)
        if self.value is None or t.expert is None:
            return self.value
        return self.value[t.expert]


def _finish(tmp, hf, src_dir, files, groups, names, sizes) -> None:
    """config.json, the index, the source's side files."""
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if len(files) > 1:
        weight_map = {names[i]: file for file, g in zip(files, groups, strict=True) for i in g}
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump(index, f, indent=2)
    if src_dir is not None:
        for entry in sorted(os.listdir(src_dir)):
            src = os.path.join(src_dir, entry)
            keep = entry.startswith("tokenizer") or entry in _SIDE_FILES
            if keep and os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, entry))
