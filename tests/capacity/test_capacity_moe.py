"""The capacity planner on a mixture of experts: total and active parameters against the
model cards (Mixtral-8x7B: 46.7B, 12.9B active; Qwen3-30B-A3B: 30.5B, 3.3B active), the
experts' share of the state floor under the plans' placement, and a tiny MoE planned end to
end: the table says what the model is, and the compiled state per device is the experts
split over "tensor" (it would be E / (E / tensor) = tensor times larger replicated)."""

import json

import pytest

from jtp.capacity.measure import analytic_floor, expert_floor
from jtp.capacity.planner import Layout
from jtp.cli.capacity import main
from jtp.models.llama import PRESETS


@pytest.mark.parametrize(
    "name,total,active", [("mixtral-8x7b", 46.7e9, 12.9e9), ("qwen3-30b-a3b", 30.5e9, 3.3e9)]
)
def test_total_and_active_parameters_are_the_model_cards(name, total, active):
    config = PRESETS[name]
    assert abs(config.num_params() - total) < 0.05e9
    assert abs(config.num_active_params() - active) < 0.06e9
    # the experts are all but the attention, embeddings, norms and routers
    routers = config.n_layers * config.dim * config.n_experts
    rest = config.num_params() - config.num_expert_params() - routers
    assert rest == PRESETS[name].num_active_params() - routers - (
        config.num_expert_params() * config.experts_per_token // config.n_experts
    )


def test_the_experts_floor_is_split_tensor_ways_and_data_ways_with_fsdp():
    mixtral = PRESETS["mixtral-8x7b"]
    tp = Layout(8, 8, fsdp=False, sequence_parallel=False, remat="dots")
    fsdp = Layout(8, 8, fsdp=True, sequence_parallel=False, remat="dots")
    assert expert_floor(mixtral, 64, tp, "bf16-mixed") == mixtral.num_expert_params() * 16 / 8
    assert expert_floor(mixtral, 64, fsdp, "bf16-mixed") == mixtral.num_expert_params() / 4
    assert expert_floor(mixtral, 64, fsdp, "bf16-mixed") < analytic_floor(
        mixtral, 64, fsdp, "bf16-mixed"
    )
    assert expert_floor(PRESETS["llama3-8b"], 64, tp, "bf16-mixed") == 0


def test_planner_end_to_end_tiny_moe(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = [
        "--model", "tiny-moe", "--devices", "8", "--global-batch", "8", "--seq-len", "32",
        "--tensor", "8", "--remat", "none", "--precision", "32-true", "--json", str(out),
    ]  # fmt: skip
    main(argv)
    payload = json.loads(out.read_text())
    config = PRESETS["tiny-moe"]
    assert payload["moe"] == {
        "params": config.num_params(),
        "active_params": config.num_active_params(),
        "expert_params": config.num_expert_params(),
        "n_experts": 8,
        "experts_per_token": 2,
    }
    row = next(r for r in payload["rows"] if r["label"] == "1x8 -")
    assert row["expert_floor_bytes"] == config.num_expert_params() * 16 / 8
    # compiled: the state of experts split 8 ways, not of replicated ones
    replicated = config.num_expert_params() * 16
    assert row["floor_bytes"] <= row["memory_bytes"] < replicated
    assert "Mixture of experts:" in capsys.readouterr().out
