"""``jtp.hf``: Hugging Face checkpoints in and out (:mod:`jtp.models.hf`).

model = jtp.hf.load_pretrained("Llama-3.1-8B", mesh, fsdp=True)   # born sharded
jtp.hf.save_pretrained(model, "out", source="Llama-3.1-8B")        # transformers loads it
"""

from jtp.models.hf import SUPPORTED_ARCHITECTURES, config_of, load_pretrained, save_pretrained

__all__ = ["SUPPORTED_ARCHITECTURES", "config_of", "load_pretrained", "save_pretrained"]
