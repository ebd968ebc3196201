"""Example models: plain single-device Flax NNX code, sharded from outside by a plan.

:class:`Decoder` (also ``Llama``) is the decoder of Llama, Mistral, Qwen2/3, Phi-3 and
Gemma 2/3, with an optional key/value cache (:mod:`jtp.models.cache`), and with
mixture-of-experts feed-forwards (:class:`MoEFeedForward`) of Mixtral, Qwen2/3-MoE and OLMoE.
"""

from jtp.models.cache import KVCache, init_cache
from jtp.models.decoder import Decoder
from jtp.models.decoder_config import DecoderConfig
from jtp.models.feedforward import FeedForward
from jtp.models.llama import Llama, LlamaConfig
from jtp.models.moe import MoEFeedForward, RouterStats

__all__ = [
    "Decoder",
    "DecoderConfig",
    "FeedForward",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "MoEFeedForward",
    "RouterStats",
    "init_cache",
]
