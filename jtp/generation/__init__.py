"""Generation from a trained or loaded model: :func:`generate` (a sharded KV cache,
compiled once per bucket) and its sampling."""

from jtp.generation.generate import generate

__all__ = ["generate"]
