"""Device selection for the programs: on CPU, force host devices before jax starts."""

from __future__ import annotations

import jax


def select_devices(n: int) -> list[jax.Device]:
    """The first ``n`` devices; on CPU, first force ``n`` host devices if jax has not
    started its backend yet (the only moment that is possible)."""
    if n < 1:
        raise ValueError(f"--devices {n}: must be >= 1")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # backend already up (e.g. under pytest): use what exists
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(
            f"--devices {n}: only {len(devices)} {devices[0].platform} devices; pass at most "
            f"{len(devices)} (on CPU, force more before jax starts: JAX_NUM_CPU_DEVICES={n})"
        )
    return devices[:n]
