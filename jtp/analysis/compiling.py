"""Compiling afresh: what a program loaded from jax's persistent compilation cache cannot
give, a compile's own time (``python -m jtp.bench compile``) and XLA's dumps (jax leaves
dump options out of an entry's key, so a warm cache loads the program and XLA writes
nothing: :func:`jtp.analysis.dtypes.partitioned_hlo`). The programs keep a cache by default
(:mod:`jtp.training.compilation_cache`) and the test suite shares one per run, so a warm
cache is the usual case, not the exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def afresh() -> Iterator[None]:
    """jax's persistent compilation cache off for the compiles inside, back as it was after.
    jax decides once per process whether the cache is used: ``reset_cache`` makes it decide
    again, on entry and on exit. (A ``Lowered`` keeps the program it compiled: lower anew.)"""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()
