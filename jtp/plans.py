"""``jtp.plans``: the ready-made plans, which live beside their models
(:mod:`jtp.models.plans`)."""

from jtp.models.plans import check_llama, feedforward, llama, replicate_kv

__all__ = ["check_llama", "feedforward", "llama", "replicate_kv"]
