"""Deterministic synthetic datasets: sample i is a pure function of (seed, i).

What the Lightning docs' examples train on, made safe for tensor parallelism: every process
computes the same sample i without sharing any RNG state.
"""

from __future__ import annotations

import numpy as np


class _SeededDataset:
    """Sample i is a pure function of ``(seed, i)``, so every process agrees on it without
    sharing any RNG state (this is the point: Lightning's docs example silently feeds two
    TP ranks different random batches)."""

    length: int
    seed: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self._sample(np.random.default_rng([self.seed, index]))

    def _sample(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class RandomDataset(_SeededDataset):
    """``length`` float32 vectors of ``size``, as Lightning's demo, but deterministic."""

    def __init__(self, size: int, length: int, *, seed: int = 0):
        self.size, self.length, self.seed = size, length, seed

    def _sample(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(self.size, dtype=np.float32)


class RandomTokenDataset(_SeededDataset):
    """``length`` random token sequences of ``seq_len + 1`` ids in ``[0, vocab_size)``
    (inputs are ``[:-1]``, labels ``[1:]``), as Lightning's tensor-parallel Llama example."""

    def __init__(self, vocab_size: int, seq_len: int, length: int, *, seed: int = 0):
        self.vocab_size, self.seq_len, self.length, self.seed = vocab_size, seq_len, length, seed

    def _sample(self, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int32)
