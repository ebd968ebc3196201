"""``load_pretrained``: an HF checkpoint straight into a sharded jtp Llama.

No process ever holds the whole model: the model's shapes come from ``nnx.eval_shape``, the
plan gives every parameter its sharding, and ``jax.make_array_from_callback`` asks for the
block each local device keeps, which is read from the safetensors file (transposed and
RoPE-permuted on the way, :mod:`jtp.models.hf.names`). Parameters are loaded one at a time,
so the host holds at most one parameter's worth of blocks beyond what the devices keep (of a
scanned model's stacked parameter, its layers' HF tensors, read one by one and stacked).
Everything that could make the result differ from transformers' is refused first, before a
weight is read (:mod:`jtp.models.hf.config`, :func:`check_tensors`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jtp.models.hf import families
from jtp.models.hf.config import architecture, llama_config, read_config
from jtp.models.hf.files import CheckpointFiles
from jtp.models.hf.names import (
    IGNORED_SUFFIXES,
    TensorMap,
    lora_tensor_map,
    read_jtp_slice,
)
from jtp.models.hf.peft import ADAPTER_CONFIG, ADAPTER_FILE
from jtp.models.llama import Llama, LlamaConfig
from jtp.models.lora import TARGETS, parse_targets
from jtp.models.plans import check_llama, llama, replicate_kv
from jtp.parallel.names import path_str
from jtp.parallel.plan import Plan, plan_shardings


def check_tensors(files: CheckpointFiles, maps: list[TensorMap], shapes: dict[str, Any]) -> None:
    """Every expected tensor present, of the shape ``config.json`` implies, floating point;
    and no tensor jtp's Llama would drop (a bias where it has none, say). ``ValueError``
    naming the tensor otherwise."""
    expected = {t.hf for t in maps}
    for t in maps:
        if t.hf not in files.shape:
            raise ValueError(
                f"{files.path}: tensor {t.hf!r} is missing (it would be jtp's {t.label})"
            )
        want = t.hf_shape(shapes[t.jtp])
        if files.shape[t.hf] != want:
            raise ValueError(
                f"{files.path}: tensor {t.hf!r} has shape {files.shape[t.hf]}, config.json "
                f"implies {want}"
            )
        if files.dtype[t.hf] not in ("F64", "F32", "F16", "BF16"):
            raise ValueError(f"{files.path}: tensor {t.hf!r} is {files.dtype[t.hf]}, not float")
    tied_head = {"lm_head.weight"} if "output.kernel" not in shapes else set()
    extra = sorted(
        n
        for n in files.shape
        if n not in expected and n not in tied_head and not n.endswith(IGNORED_SUFFIXES)
    )
    if extra:
        raise ValueError(
            f"{files.path}: tensor {extra[0]!r} has no place in jtp's Llama for this "
            f"config.json (a bias or layer the model does not have?); {len(extra)} such: "
            f"{extra[:6]}"
        )


def _load_param(maps: list[TensorMap], files: CheckpointFiles, abstract: Any) -> jax.Array:
    """One parameter, created shard by shard on the devices of its sharding, from its HF
    tensor (or, stacked, its layers' and experts' tensors: a device reads only the layers
    and experts its block holds, whatever axis the sharding splits)."""
    shape = tuple(abstract.shape)
    lead = maps[0].stacked_axes  # leading axes (layer, expert) that index HF tensors
    by_slice = {tuple(i for i in (t.layer, t.expert) if i is not None): t for t in maps}
    blocks: dict[tuple, np.ndarray] = {}  # replicas of a block are read once

    def block(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
        if key not in blocks:
            # No copy here: a transposed view is made contiguous by the transfer itself.
            ranges = [range(*k) for k in key[:lead]]  # the layers / experts of the block
            value = [
                read_jtp_slice(by_slice[at], index, shape, files.reader(by_slice[at].hf))
                for at in itertools.product(*ranges)
            ]
            if lead:  # (layers, experts, *the block of one tensor)
                value = np.stack(value).reshape(*map(len, ranges), *value[0].shape)
            else:
                value = value[0]
            blocks[key] = value.astype(abstract.dtype, copy=False)
        return blocks[key]

    return jax.make_array_from_callback(shape, abstract.sharding, block)


def load_pretrained(
    path: str,
    mesh: Mesh,
    *,
    fsdp: bool = False,
    sequence_parallel: bool = False,
    loss_parallel: bool = False,
    dtype: Any = None,
    remat: str | bool = "none",
    max_seq_len: int | None = None,
    attention: str = "auto",
    scan_layers: bool = True,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_targets: str | tuple[str, ...] = tuple(TARGETS),
    seed: int = 0,
    adapter: str | None = None,
) -> Llama:
    """Load a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma 2 / Gemma 3 /
    Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoint onto ``mesh``.

    The model is jtp's :class:`~jtp.models.llama.Llama` under :func:`jtp.plans.llama`, born
    sharded: each device reads only its slice of each tensor. Its logits match transformers'
    (``tests/models/test_hf.py``). Whatever jtp would compute differently is a
    ``ValueError`` before any weight is read.

    Args:
      path: a local HF model directory: ``config.json`` plus ``model.safetensors`` or
        shards listed in ``model.safetensors.index.json``.
      mesh: a ``("data", "tensor")`` mesh from :func:`jtp.make_mesh`.
      fsdp: also split each parameter on ``"data"`` (2D parallelism).
      sequence_parallel, loss_parallel: the activation layout the model will run with.
        Parameters are laid out the same way for every choice, so here they only check the
        mesh now rather than at the first step; run the model under
        ``jtp.activation_rules(mesh, jtp.plans.llama(model.config, sequence_parallel=...,
        loss_parallel=...).activations)`` (the trainer does this for ``LlamaTask``).
      dtype: parameter dtype; ``None`` keeps jtp's float32 (exact for fp16/bf16 files; the
        trainer's ``precision`` then decides compute). ``jnp.bfloat16`` halves the memory.
      remat: the remat policy (:mod:`jtp.models.stack`): "none", "full", "dots",
        "minimal"; True / False mean "full" / "none".
      max_seq_len: the longest sequence the model will see (default the checkpoint's
        ``max_position_embeddings``).
      attention: the attention kernel (:mod:`jtp.models.attention`): ``"auto"`` takes
        cuDNN's fused attention on a GPU with bf16/fp16 inputs, XLA's path otherwise.
      scan_layers: the blocks stacked on a layer axis, run by one scan (HF's per-layer
        tensors are stacked on the way in); False: unrolled, one parameter per tensor (a
        MoE checkpoint with dense and sparse layers needs it).
      lora_rank: > 0 adds LoRA adapters of this rank (:mod:`jtp.models.lora`) to the
        ``lora_targets`` linears (PEFT's names: "q", "k", "v", "o", "gate", "up", "down",
        or "q,v"; of a MoE model the attention's only), scaled by ``lora_alpha /
        lora_rank``; ``A`` is drawn from ``seed``, ``B`` is zero, so the model computes the
        checkpoint's logits until it is trained. The trainer then trains only the adapters
        (:meth:`jtp.TrainModule.trainable`).
      adapter: a PEFT LoRA adapter directory (``adapter_model.safetensors`` +
        ``adapter_config.json``, e.g. :func:`jtp.hf.save_peft`'s) to load onto the
        checkpoint; its ``r``, ``lora_alpha`` and ``target_modules`` replace the three
        ``lora_*`` arguments. Refused for Phi-3 (:func:`jtp.models.hf.families.phi3.refuse_peft`).

    Returns:
      The model; ``model.config`` is its :class:`~jtp.models.llama.LlamaConfig`.
    """
    hf = read_config(path)
    if adapter is not None:
        families.refuse_peft(hf, f"load_pretrained(adapter={adapter!r})")
        lora_rank, lora_alpha, lora_targets = read_adapter_config(adapter)
    config = config_of(
        path,
        max_seq_len=max_seq_len,
        remat=remat,
        attention=attention,
        scan_layers=scan_layers,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
    )
    if dtype is not None:  # the modules then compute in it too (flax derives their dtype)
        config = dataclasses.replace(config, param_dtype=jnp.dtype(dtype).name)
    config = replicate_kv(config, mesh)  # a tensor axis wider than the kv heads
    check_llama(config, mesh, seq_len=config.max_seq_len, sequence_parallel=sequence_parallel)
    plan = llama(
        config, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel, mesh=mesh
    )
    return load_weights(path, mesh, config, plan, fsdp=fsdp, seed=seed, adapter=adapter)


def load_weights(
    path: str,
    mesh: Mesh,
    config: LlamaConfig,
    plan: Plan,
    *,
    fsdp: bool = False,
    seed: int = 0,
    adapter: str | None = None,
) -> Llama:
    """The checkpoint at ``path`` as a model of ``config`` laid out by ``plan``: each
    device reads its slice of each tensor. ``config`` and ``plan`` are already worked out
    (:func:`load_pretrained` does it from its arguments, a recipe once for its whole run:
    :func:`jtp.recipes.llama.resolve`); ``config`` must describe the checkpoint (the name
    map and the shapes are checked against its files before a weight is read). ``seed``
    draws fresh LoRA ``A`` matrices unless ``adapter`` gives them."""
    hf = read_config(path)
    files = CheckpointFiles(path)
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    flat = dict((path_str(p), v) for p, v in nnx.to_flat_state(state))
    adapters = {n for n, v in flat.items() if isinstance(v, nnx.LoRAParam)}  # not in the file
    maps = families.tensor_map(config, architecture(hf))  # Phi-3: parts of fused tensors
    by_jtp: dict[str, list[TensorMap]] = {}  # in layer order when stacked
    for t in maps:
        by_jtp.setdefault(t.jtp, []).append(t)
    if set(by_jtp) != set(flat) - adapters:  # the name map and the model must agree exactly
        raise AssertionError(f"name map vs model: {sorted(set(by_jtp) ^ (set(flat) - adapters))}")
    check_tensors(files, maps, {n: v.get_value().shape for n, v in flat.items()})
    shardings = plan_shardings(abstract, mesh, plan, fsdp=fsdp)
    fresh = _fresh_adapters(config, seed, shardings) if adapters and not adapter else {}
    if adapter is not None:  # read by block like the base, from PEFT's names
        adapter_files = CheckpointFiles(adapter, ADAPTER_FILE)
        lora_maps = lora_tensor_map(config)
        check_tensors(adapter_files, lora_maps, {n: v.get_value().shape for n, v in flat.items()})
        for t in lora_maps:
            by_jtp.setdefault(t.jtp, []).append(t)
    updates = []
    for p, sharding in nnx.to_flat_state(shardings):
        name = path_str(p)
        var = flat[name]
        x = var.get_value()
        spec = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.get_value())
        if name in fresh:
            value = fresh[name]
        else:
            value = _load_param(by_jtp[name], adapter_files if name in adapters else files, spec)
        updates.append((p, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(updates))


def read_adapter_config(adapter: str) -> tuple[int, float, tuple[str, ...]]:
    """``(r, lora_alpha, targets)`` of a PEFT adapter directory; a ``ValueError`` for what
    jtp's :class:`~jtp.models.lora.LoRALinear` would compute differently."""
    with open(os.path.join(adapter, ADAPTER_CONFIG)) as f:
        c = json.load(f)
    unsupported = {
        "peft_type": c.get("peft_type") != "LORA",
        "use_rslora": c.get("use_rslora"),
        "use_dora": c.get("use_dora"),
        "fan_in_fan_out": c.get("fan_in_fan_out"),
        "rank_pattern": c.get("rank_pattern"),
        "alpha_pattern": c.get("alpha_pattern"),
        "bias": c.get("bias", "none") != "none",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{adapter}: {ADAPTER_CONFIG} sets {bad}: jtp loads plain LoRA only")
    return int(c["r"]), float(c["lora_alpha"]), parse_targets(c["target_modules"])


def _fresh_adapters(config: LlamaConfig, seed: int, shardings: Any) -> dict[str, jax.Array]:
    """The LoRA factors of ``Llama(config, rngs=nnx.Rngs(seed))``, born in their shardings.

    One jitted init of the whole model whose only outputs are the adapters: XLA drops the
    base weights' initialisers as dead code, so nothing base-sized is ever allocated.
    """
    out = nnx.split_state(shardings, nnx.LoRAParam, ...)[0]

    def init() -> nnx.State:
        return nnx.state(Llama(config, rngs=nnx.Rngs(seed)), nnx.LoRAParam)

    state = jax.jit(init, out_shardings=out)()
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def config_of(
    path: str,
    *,
    max_seq_len: int | None = None,
    remat: str | bool = "none",
    attention: str = "auto",
    context_attention: str = "all-gather",
    scan_layers: bool = True,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_targets: str | tuple[str, ...] = tuple(TARGETS),
) -> LlamaConfig:
    """The :class:`LlamaConfig` of an HF directory (or config.json), run with ``remat``, the
    ``attention`` kernel (and ``context_attention``, the strategy across a context axis),
    ``scan_layers`` and LoRA adapters of ``lora_rank`` (0: none): shapes for planning, the
    config :func:`load_pretrained` builds."""
    config = llama_config(read_config(path), max_seq_len=max_seq_len, remat=remat)
    return dataclasses.replace(
        config,
        attention=attention,
        context_attention=context_attention,
        scan_layers=scan_layers,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=parse_targets(lora_targets),
    )
