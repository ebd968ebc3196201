"""``jtp.hf``: Hugging Face checkpoints in and out (:mod:`jtp.models.hf`).

model = jtp.hf.load_pretrained("Llama-3.1-8B", mesh, fsdp=True)   # born sharded
jtp.hf.save_pretrained(model, "out", source="Llama-3.1-8B")        # transformers loads it
model = jtp.hf.load_pretrained("Llama-3.1-8B", mesh, lora_rank=16, lora_alpha=32)  # LoRA
jtp.hf.save_peft(model, "adapter", base_model_name_or_path="Llama-3.1-8B")  # PEFT loads it
jtp.hf.save_pretrained(model, "merged", source="Llama-3.1-8B")     # W + (alpha / r) A B
"""

from jtp.models.hf import (
    SUPPORTED_ARCHITECTURES,
    config_of,
    load_pretrained,
    load_weights,
    save_peft,
    save_pretrained,
)
from jtp.models.lora import merge_lora

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "config_of",
    "load_pretrained",
    "load_weights",
    "merge_lora",
    "save_peft",
    "save_pretrained",
]
