"""Phi-3 (``Phi3ForCausalLM``): fused ``qkv_proj`` / ``gate_up_proj`` split on load, each
device reading only its rows, fused again on save; and what jtp refuses of Phi-3.

``tests/fixtures/hf/phi3`` (scripts/make_hf_fixtures.py --only phi3: transformers 5.24,
torch 2.13 CPU) is a bf16 Phi-3 of hidden 64, 16 heads / 8 kv heads of 4, a 32-token
sliding window; its logits against transformers, on the four meshes and in bf16, are
tests/models/test_hf.py's (``NAMES``), with its tolerances (float32 within 1e-4 of the
largest logit, KL <= 1e-6; seen <= 1.5e-6 and 7.4e-13). A part read from the wrong rows is
O(1): gate/up swapped 0.96 (KL 0.89), k/v swapped 1.26 (KL 2.0), no RoPE permutation of
the q/k rows 1.21 (KL 1.2), mutations made by hand.
"""

import json
import os

import numpy as np
import pytest
from test_hf import (
    T,
    _tensors,
    assert_refused_before_reading,
    edited,
    fixture,
    load,
    params_of,
)

import jtp
from jtp.models.hf import files as hf_files
from jtp.models.hf.families.phi3 import FUSED, tensor_map

D, H, K, E, F = 64, 16, 8, 4, 64  # the fixture: hidden, heads, kv heads, head_dim, ffn
PART_ROWS = {"q_proj": H * E, "k_proj": K * E, "v_proj": K * E, "gate_proj": F, "up_proj": F}


def test_each_device_reads_its_rows_of_the_fused_tensors(monkeypatch):
    """(1, 8): every tensor is read once, element by element, in disjoint blocks; a fused
    tensor in 8 blocks per part, device d reading rows ``[offset + d r/8, offset + (d+1)
    r/8)`` of a part of r rows: whole heads of q, k and v (2, 1 and 1 of 4 rows), matching
    gate and up columns."""
    reads = {}
    original = hf_files.CheckpointFiles.reader

    def recording(self, name):
        read = original(self, name)

        def wrapped(index):
            reads.setdefault(name, []).append(index)
            return read(index)

        return wrapped

    monkeypatch.setattr(hf_files.CheckpointFiles, "reader", recording)
    model, _ = load("phi3", (1, 8))
    files = hf_files.CheckpointFiles(fixture("phi3"))
    for name, shape in files.shape.items():
        count = np.zeros(shape, np.int32)
        for index in reads[name]:
            count[index] += 1
        assert (count == 1).all(), name  # each element read once: disjoint, complete
    for layer in (0, 1):
        for fused, parts in FUSED.items():
            want, offset = set(), 0
            for part in parts:
                r = PART_ROWS[part.split(".")[1]]
                want |= {(offset + d * r // 8, offset + (d + 1) * r // 8) for d in range(8)}
                offset += r
            got = reads[f"model.layers.{layer}.{fused}"]
            assert {(i[0].start, i[0].stop) for i in got} == want and len(got) == len(want)
            assert all((i[1].start, i[1].stop) == (0, D) for i in got)  # whole rows
    wk = model.layers.attention.wk.kernel.get_value()  # (L, D, K*E), stacked layers
    assert wk.sharding.shard_shape(wk.shape) == (2, D, K * E // 8)


def test_fused_map_and_save_without_source(tmp_path):
    """The map: q, k, v at rows 0, H*E, H*E + K*E of qkv_proj; gate, up at 0, F of
    gate_up_proj. Saved without ``source=`` the model is a MistralForCausalLM (its window on
    every layer; nothing in its config says Phi-3) with the parts as separate tensors, the
    same values."""
    model, _ = load("phi3", (2, 4), fsdp=True)
    maps = {t.jtp: t for t in tensor_map(model.config, "Phi3ForCausalLM") if t.layer == 1}
    place = {
        n.split(".")[-2]: (maps[n].hf.removeprefix("model.layers.1."), maps[n].row_offset)
        for n in maps
        if maps[n].hf_rows is not None
    }
    assert place == {
        "wq": ("self_attn.qkv_proj.weight", 0),
        "wk": ("self_attn.qkv_proj.weight", H * E),
        "wv": ("self_attn.qkv_proj.weight", H * E + K * E),
        "w1": ("mlp.gate_up_proj.weight", 0),
        "w3": ("mlp.gate_up_proj.weight", F),
    }
    out = str(tmp_path / "llama")
    jtp.hf.save_pretrained(model, out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["MistralForCausalLM"]
    ours, theirs = _tensors(out), _tensors(fixture("phi3"))
    qkv = theirs["model.layers.1.self_attn.qkv_proj.weight"]
    q, k, v = np.split(qkv, [H * E, H * E + K * E])
    for part, rows in (("q", q), ("k", k), ("v", v)):
        np.testing.assert_array_equal(ours[f"model.layers.1.self_attn.{part}_proj.weight"], rows)
    again, _ = load(out, (1, 8))
    a, b = params_of(model), params_of(again)
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_phi3_defaults_and_what_it_accepts(tmp_path):
    """Absent fields take Phi-3's defaults (rms_norm_eps 1e-5, not Llama's 1e-6);
    ``embd_pdrop`` is accepted because transformers' Phi-3 never applies it. A window
    shorter than the sequence is computed, on every layer (no use_sliding_window flag)."""
    path = edited(tmp_path, "phi3", {"rms_norm_eps": None, "embd_pdrop": 0.1, "sliding_window": 8})
    config = jtp.hf.config_of(path, max_seq_len=T)
    assert config.norm_eps == 1e-5
    assert config.sliding_window == 8 and config.layer_sliding() == (True, True)


REFUSALS = {
    "longrope": (
        {
            "rope_parameters": None,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0, 1.0],
                "long_factor": [4.0, 4.0],
            },
        },
        None,
        r"rope_scaling.rope_type='longrope' is not supported: it is Phi-3's LongRoPE",
    ),
    "su": (  # Phi-3-mini-128k's first configs
        {
            "rope_parameters": None,
            "rope_scaling": {"type": "su", "short_factor": [1.0, 1.0], "long_factor": [4.0, 4.0]},
        },
        None,
        r"rope_scaling.rope_type='su' is not supported: it is Phi-3's LongRoPE",
    ),
    "rope-type": (
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
        None,
        r"rope_parameters.rope_type='llama3' is not supported for Phi3ForCausalLM",
    ),
    "partial-rotary": (  # Phi-4-mini rotates 3/4 of each head
        {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.75,
            }
        },
        None,
        r"partial_rotary_factor=0.75 is not supported",
    ),
    "resid-pdrop": ({"resid_pdrop": 0.1}, None, r"resid_pdrop=0.1 is not supported"),
    "attention-dropout": (
        {"attention_dropout": 0.1},
        None,
        r"attention_dropout=0.1 is not supported",
    ),
    "unfused-checkpoint": (
        None,
        {
            "model.layers.0.self_attn.qkv_proj.weight": None,
            "model.layers.0.self_attn.q_proj.weight": np.zeros((64, 64), np.float32),
        },
        r"tensor 'model.layers.0.self_attn.qkv_proj.weight' is missing",
    ),
    "fused-shape": (
        {"num_key_value_heads": 16},
        None,
        r"tensor 'model.layers.0.self_attn.qkv_proj.weight' has shape \(128, 64\), "
        r"config.json implies \(192, 64\)",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_field_or_tensor(case, tmp_path, monkeypatch):
    assert_refused_before_reading(tmp_path, monkeypatch, "phi3", *REFUSALS[case])


def test_peft_adapters_are_refused(tmp_path):
    """A PEFT adapter on Phi-3 is one (A, B) pair on the fused module: neither loaded onto
    nor written from jtp's per-projection adapters (the merged export is the way out);
    refused before anything is read, written, or trained."""
    from jtp.cli.train import main

    why = r"Phi3ForCausalLM fuses q/k/v into qkv_proj.*do not map onto each other"
    with pytest.raises(ValueError, match="load_pretrained.*" + why):
        load("phi3", adapter=str(tmp_path / "never-read"))
    model, _ = load("phi3", lora_rank=2, lora_targets="q,v")
    with pytest.raises(ValueError, match="save_peft onto .*" + why):
        jtp.hf.save_peft(model, str(tmp_path / "adapter"), base_model_name_or_path=fixture("phi3"))
    with pytest.raises(ValueError, match="--export-peft: " + why):
        main(
            [
                "--devices",
                "8",
                "--model",
                "llama",
                "--hf",
                fixture("phi3"),
                "--lora-rank",
                "2",
                "--seq-len",
                str(T),
                "--export-peft",
                str(tmp_path / "adapter"),
            ]
        )
    assert sorted(os.listdir(tmp_path)) == []


def test_save_checks_a_phi3_source(tmp_path):
    """``source=`` a Phi-3 directory for a model it does not describe is refused."""
    model, _ = load("mistral")
    with pytest.raises(ValueError, match=r"does not describe this model: rope_theta.*norm_eps"):
        jtp.hf.save_pretrained(model, str(tmp_path / "x"), source=fixture("phi3"))


def test_planner_plans_a_phi3_checkpoint(tmp_path, monkeypatch):
    """``python -m jtp.capacity --hf tests/fixtures/hf/phi3``: its shapes (16 heads, 8 kv
    heads, untied, a 32-token window) from config.json, one configuration compiled, to keep
    it quick."""
    from jtp.capacity import planner
    from jtp.cli.capacity import main

    def one_configuration(*args):
        return [planner.Layout(2, 4, fsdp=True, sequence_parallel=False, remat=False)]

    monkeypatch.setattr(planner, "layouts", one_configuration)
    out = main(
        [
            "--hf",
            fixture("phi3"),
            "--devices",
            "8",
            "--devices-per-host",
            "8",
            "--global-batch",
            "8",
            "--seq-len",
            str(T),
            "--precision",
            "32-true",
            "--json",
            str(tmp_path / "plan.json"),
        ]
    )
    config = jtp.hf.config_of(fixture("phi3"), max_seq_len=T)
    (row,) = out["rows"]
    assert row["floor_bytes"] == config.num_params() * 16 / 8 and not config.tie_embeddings
    assert 0 < row["memory_bytes"] < 10e6
