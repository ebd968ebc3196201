"""Hugging Face checkpoints in and out of jtp's Llama.

- :mod:`~jtp.models.hf.config`: ``config.json`` <-> :class:`~jtp.models.llama.LlamaConfig`,
  and the refusals (what jtp would compute differently); its RoPE fields
  (:mod:`~jtp.models.hf.rope_config`) and which layers slide
  (:mod:`~jtp.models.hf.layer_types`)
- :mod:`~jtp.models.hf.families`: one module per family (Llama, Mistral, Qwen, Gemma,
  Phi-3, Mixtral, Qwen-MoE, OLMoE) with its architectures, the config fields it reads and
  writes, its tensor names and its refusals; the generic modules here consult it instead
  of naming a family
- :mod:`~jtp.models.hf.names`: the tensor name map, transposes, the RoPE permutation and
  the stacking of per-layer (and per-expert) tensors
- :mod:`~jtp.models.hf.files`: safetensors reading by block, streamed writing
- :mod:`~jtp.models.hf.load`: :func:`load_pretrained`, born sharded (:func:`load_weights`
  under a config and plan worked out elsewhere)
- :mod:`~jtp.models.hf.save`: :func:`save_pretrained`, one tensor at a time
- :mod:`~jtp.models.hf.peft`: :func:`save_peft`, LoRA adapters as PEFT loads them
"""

from jtp.models.hf.config import SUPPORTED_ARCHITECTURES
from jtp.models.hf.load import config_of, load_pretrained, load_weights
from jtp.models.hf.peft import save_peft
from jtp.models.hf.save import save_pretrained

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "config_of",
    "load_pretrained",
    "load_weights",
    "save_peft",
    "save_pretrained",
]
