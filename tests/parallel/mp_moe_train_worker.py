"""Worker for test_moe_expert_parallel: ``python -m jtp.train`` with a test-only MoE preset.

    python mp_moe_train_worker.py [python -m jtp.train flags]

"test-moe" is test_moe_expert_parallel's CONFIG (2 layers, 8 experts, top-2): a program
started as its own process cannot be handed a preset any other way.
"""

import dataclasses
import sys

from jtp.cli.train import _run_and_exit
from jtp.models.llama import PRESETS

PRESETS["test-moe"] = dataclasses.replace(
    PRESETS["tiny"], n_layers=2, n_experts=8, experts_per_token=2, moe_ffn_hidden=64
)
_run_and_exit(sys.argv[1:])
