"""Device selection of the programs (--devices)."""

import jax
import pytest

from jtp.cli.devices import select_devices


def test_select_devices():
    assert select_devices(4) == jax.devices()[:4]
    with pytest.raises(ValueError, match="--devices 0: must be >= 1"):
        select_devices(0)
    with pytest.raises(ValueError, match="--devices 16: only 8 cpu devices"):
        select_devices(16)
    with pytest.raises(ValueError, match="JAX_NUM_CPU_DEVICES=16"):
        select_devices(16)
