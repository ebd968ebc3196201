"""Device selection of the programs (--devices)."""

import jax
import pytest

from jtp.mesh import select_devices


def test_select_devices():
    assert select_devices(4) == jax.devices()[:4]
    with pytest.raises(ValueError, match="--devices 0: must be >= 1"):
        select_devices(0)
    with pytest.raises(ValueError, match="--devices 16: only 8 cpu devices"):
        select_devices(16)
    with pytest.raises(ValueError, match="JAX_NUM_CPU_DEVICES=16"):
        select_devices(16)


def test_cli_rejects_bad_sizes_and_presets(capsys):
    from jtp.cli.train import build_parser
    from jtp.recipes.llama import preset_config

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tensor-parallel", "four"])
    assert "'four' is not 'auto' or a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data-parallel", "0"])
    assert build_parser().parse_args(["--tensor-parallel", "4"]).tensor_parallel == 4
    with pytest.raises(ValueError, match=r"unknown Llama preset 'llama9'; choose one of \["):
        preset_config("llama9")
