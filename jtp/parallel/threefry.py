"""Workarounds for backend details of the pinned jax, each isolated and each optional.

``unrolled_threefry_on_cpu``: jax lowers the threefry hash on CPU as a rolled ``fori_loop``
whose carry holds two uint32 arrays the size of the requested random block. Inside
``sharded_init`` that doubles the per-device peak (every shard's random bits live in loop
temporaries). GPU and TPU use the unrolled lowering, which XLA fuses into the consumer, so
the temporaries vanish. The hash, and therefore every value, is the same either way; only
the lowering differs. We switch CPU to the unrolled form just while compiling the
initialiser. If jax's internals move, this degrades to a no-op (higher CPU init memory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def unrolled_threefry_on_cpu() -> Iterator[None]:
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32 as tf

        table = mlir._platform_specific_lowerings["cpu"]
        prim = tf.threefry2x32_p
        unrolled = mlir._lowerings[prim]  # the platform-independent (GPU/TPU) entry
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - jax moved things
        yield
        return
    previous = table.get(prim)
    table[prim] = unrolled
    try:
        yield
    finally:
        if previous is None:
            table.pop(prim, None)
        else:
            table[prim] = previous
