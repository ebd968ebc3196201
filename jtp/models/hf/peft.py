"""``save_peft``: a LoRA-adapted jtp Llama's adapters as a PEFT adapter directory.

PEFT loads ``adapter_model.safetensors`` + ``adapter_config.json`` onto the original HF
checkpoint (``PeftModel.from_pretrained(base, path)``) and computes ``W x + (alpha / r) B A
x`` on each target, as :class:`jtp.models.lora.LoRALinear` does. The tensor names, the
transposes and the RoPE permutation of ``B`` on q/k are :func:`~jtp.models.hf.names.
lora_tensor_map`'s. As :func:`~jtp.models.hf.save.save_pretrained`, one tensor at a time is
gathered to process 0, which writes into a temporary directory renamed onto ``path``: the
adapter there is complete or absent. A Phi-3 base is refused: its fused ``qkv_proj`` and
``gate_up_proj`` take one PEFT adapter each, jtp has one per projection
(:func:`jtp.models.hf.families.phi3.refuse_peft`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import nnx

from jtp.checkpoint.consolidated import gathered_on_process_0
from jtp.models.hf import families
from jtp.models.hf.files import staged_directory, write_safetensors
from jtp.models.hf.names import HF_MODULES, lora_tensor_map, to_hf
from jtp.models.llama import Llama
from jtp.parallel.names import path_str

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_config(model: Llama, base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` of ``model``'s adapters, as ``adapter_config.json`` holds it."""
    c = model.config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": c.lora_rank,
        "lora_alpha": c.lora_alpha,
        "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in c.lora_targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # the scale is alpha / r, not alpha / sqrt(r)
        "use_dora": False,
        "inference_mode": True,
    }


def save_peft(model: Llama, path: str, *, base_model_name_or_path: str | None = None) -> None:
    """Write ``model``'s LoRA adapters as a PEFT adapter directory at ``path`` (replaced).

    Call it on every process (each takes part in gathering). ``base_model_name_or_path``
    goes into ``adapter_config.json`` (PEFT loads the base from it when none is given);
    when it is a local HF directory (as ``python -m jtp.train --export-peft`` passes), a
    Phi-3 base there is refused before anything is written.
    """
    if not model.config.lora_rank:
        raise ValueError("save_peft: the model has no LoRA adapters (lora_rank is 0)")
    base = base_model_name_or_path
    if base is not None and os.path.isfile(os.path.join(base, "config.json")):
        with open(os.path.join(base, "config.json")) as f:
            families.refuse_peft(json.load(f), f"save_peft onto {base}")
    params = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    maps = lora_tensor_map(model.config)
    by_hf = {t.hf: t for t in maps}
    dtype = np.dtype(str(next(iter(params.values())).dtype))  # the adapters' own dtype

    def produce(hf_name: str) -> np.ndarray:
        t = by_hf[hf_name]
        return to_hf(t, gathered_on_process_0(params[t.jtp], t.layer)).astype(dtype)

    entries = [(t.hf, dtype, t.hf_shape(tuple(params[t.jtp].shape))) for t in maps]
    inputs = [("base_model_name_or_path", base if base and os.path.isdir(base) else None)]
    with staged_directory(path, "jtp.hf.save_peft", "peft-adapter", inputs) as tmp:
        if tmp is not None:
            write_safetensors(os.path.join(tmp, ADAPTER_FILE), entries, produce)
            with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
                json.dump(adapter_config(model, base_model_name_or_path), f, indent=2)
        else:  # take part in the same gathers, in the same order
            for t in maps:
                gathered_on_process_0(params[t.jtp], t.layer)
