"""LoRA on jtp's Llama: the layout of the adapters, sharded == unsharded, collectives, and
the PEFT round trip against tests/fixtures/lora (scripts/make_lora_fixtures.py: PEFT 0.21.2,
transformers 5.24, torch 2.13 CPU; rank 4, alpha 8, all seven targets, random A and B).

Tolerances. Logits against PEFT's float32 logits: max |jtp - PEFT| / max |PEFT| <= 1e-4,
the bound tests/models/test_hf.py holds the base model to (both float32, the reduction
order differs); seen <= 9e-7 on every mesh. The adapters move those logits by 22-46% of
the largest one (record.json), so a wrong transpose or a missing RoPE permutation of B is
O(1e-1), a thousand times the bound. Sharded against unsharded (logits, gradients): 1e-5
of the largest value: the same float32 program partitioned, only the order of the
all-reduce's sums differs (seen <= 1e-6).
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jtp
from jtp.models.llama import cross_entropy
from jtp.models.lora import adapted, parse_targets
from jtp.parallel.names import path_str

HERE = os.path.dirname(__file__)
HF = os.path.join(HERE, "..", "fixtures", "hf")
LORA = os.path.join(HERE, "..", "fixtures", "lora")
NAMES = ["llama3", "qwen3"]
MESHES = {"1x1": ((1, 1), False), "1x8": ((1, 8), False), "2x4-fsdp": ((2, 4), True)}


def mesh_of(shape):
    return jtp.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])


def load(name, shape=(1, 1), fsdp=False, **kw):
    mesh = mesh_of(shape)
    kw.setdefault("adapter", os.path.join(LORA, name))
    model = jtp.hf.load_pretrained(os.path.join(HF, name), mesh, fsdp=fsdp, max_seq_len=16, **kw)
    return model, mesh


def reference(name):
    ref = np.load(os.path.join(LORA, name, "reference.npz"))
    return ref["tokens"], ref["logits"]


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


def logits_of(model, mesh, tokens):
    plan = jtp.plans.llama(model.config)
    graphdef, state = nnx.split(model)
    with jtp.activation_rules(mesh, plan.activations):
        return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jtp.shard_batch(tokens, mesh))


def adapter_grads(model, mesh, tokens):
    """Loss and gradients of the next-token loss with respect to the adapters only."""
    plan = jtp.plans.llama(model.config)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora, rest, t):
        return cross_entropy(nnx.merge(graphdef, lora, rest)(t[:, :-1]), t[:, 1:])

    with jtp.activation_rules(mesh, plan.activations):
        fn = jax.jit(jax.value_and_grad(loss))
        value, grads = fn(lora, rest, jtp.shard_batch(tokens, mesh))
    return value, {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("mesh_case", list(MESHES))
@pytest.mark.parametrize("name", NAMES)
def test_adapter_logits_match_peft(name, mesh_case):
    """PEFT's adapter loaded onto the checkpoint by jtp gives PEFT's logits, on every mesh."""
    shape, fsdp = MESHES[mesh_case]
    model, mesh = load(name, shape, fsdp)
    tokens, want = reference(name)
    assert rel(logits_of(model, mesh, tokens), want) <= 1e-4


def test_fixture_record_says_exports_agreed():
    """What the fixture script measured: the merged export equals PEFT, and the adapter
    changes the logits enough for the parity test to mean something."""
    for name in NAMES:
        with open(os.path.join(LORA, name, "record.json")) as f:
            r = json.load(f)
        assert r["merged_vs_peft"] <= 1e-4 and r["jtp_vs_peft"] <= 1e-4, r
        assert r["adapter_vs_base"] >= 0.1, r


@pytest.mark.parametrize("name", NAMES)
def test_export_peft_round_trips_the_committed_adapter(name, tmp_path):
    """Loaded on 2x4 with fsdp and written back: PEFT's names, (r, in) / (out, r) shapes
    and the values bit for bit (transposes and permutations are exact); the config PEFT
    reads."""
    model, _ = load(name, (2, 4), True)
    out = tmp_path / "adapter"
    jtp.hf.save_peft(model, str(out), base_model_name_or_path=name)
    want = load_file(os.path.join(LORA, name, "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    c, e = model.config, model.config.head_dim
    q_a = got["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    q_b = got["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    down_b = got["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert q_a.shape == (4, c.dim) and q_b.shape == (c.n_heads * e, 4)
    assert down_b.shape == (c.dim, 4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8.0, "none")
    assert config["fan_in_fan_out"] is False and config["base_model_name_or_path"] == name
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # nothing left behind


@pytest.mark.parametrize("name", NAMES)
def test_merged_export_gives_the_adapter_logits(name, tmp_path):
    """save_pretrained of a LoRA model writes W + (alpha / r) A B (q/k permuted back): an
    HF checkpoint without adapters whose logits are PEFT's."""
    model, mesh = load(name, (2, 4), True)
    jtp.hf.save_pretrained(
        model, str(tmp_path / "merged"), source=os.path.join(HF, name), dtype="float32"
    )
    merged = jtp.hf.load_pretrained(str(tmp_path / "merged"), mesh, max_seq_len=16)
    assert merged.config.lora_rank == 0 and not adapted(merged)
    tokens, want = reference(name)
    assert rel(logits_of(merged, mesh, tokens), want) <= 1e-4


@pytest.mark.parametrize("mesh_case", ["1x8", "2x4-fsdp"])
def test_sharded_equals_unsharded_logits_and_adapter_grads(mesh_case):
    shape, fsdp = MESHES[mesh_case]
    tokens = reference("llama3")[0]
    ref_model, ref_mesh = load("llama3")
    model, mesh = load("llama3", shape, fsdp)
    assert rel(logits_of(model, mesh, tokens), logits_of(ref_model, ref_mesh, tokens)) <= 1e-5
    loss, grads = adapter_grads(model, mesh, tokens)
    ref_loss, ref_grads = adapter_grads(ref_model, ref_mesh, tokens)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert sorted(grads) == sorted(ref_grads) and len(grads) == 14  # 7 targets x (A, B)
    for k in grads:
        assert rel(grads[k], ref_grads[k]) <= 1e-5, k


def test_adapter_layouts_in_the_scanned_model():
    """Column (q, gate): A replicated, B split on out like the kernel; row (o, down): A
    split on in like the kernel, B replicated; the layer axis stays whole; fsdp puts
    "data" on the largest other dimension that divides."""
    model, _ = load("llama3", (2, 4), False)
    L, D, r = 2, 32, 4  # layers, width, rank
    att, ffn = model.layers.attention, model.layers.feed_forward

    def shard(v):
        x = v.get_value()
        return x.sharding.shard_shape(x.shape)

    assert shard(att.wq.lora.lora_a) == (L, D, r)  # column: A whole
    assert shard(att.wq.lora.lora_b) == (L, r, 128 // 4)  # B like the kernel's columns
    assert shard(att.wq.kernel) == (L, D, 128 // 4)
    assert shard(att.wo.lora.lora_a) == (L, 128 // 4, r)  # row: A like the kernel's rows
    assert shard(att.wo.lora.lora_b) == (L, r, D)  # B whole
    assert shard(ffn.w1.lora.lora_b) == (L, r, 64 // 4) and shard(ffn.w2.lora.lora_a) == (
        L,
        64 // 4,
        r,
    )
    fsdp_model, _ = load("llama3", (2, 4), True)
    assert shard(fsdp_model.layers.attention.wq.lora.lora_a) == (L, D // 2, r)
    assert shard(fsdp_model.layers.attention.wo.lora.lora_b) == (L, r, D // 2)


def _all_reduces(model, mesh, tokens):
    plan = jtp.plans.llama(model.config)
    graphdef, state = nnx.split(model)
    with jtp.activation_rules(mesh, plan.activations):
        fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        compiled = fn.lower(state, jtp.shard_batch(tokens, mesh)).compile()
    return [c for c in jtp.collectives(compiled, mesh) if c.kind == "all-reduce"]


def test_adapters_add_no_collective_to_the_forward():
    """1x8: the adapted forward has exactly the plain one's all-reduces: one per column ->
    row pair per layer (attention, MLP: the scan body's two) and the embedding's. In each
    pair's op the row layer's rank-r partial sums ``x @ A`` (B * T, r: the linears see one
    token axis, jtp.models.feedforward.per_token) travel with the base's as one combined
    (tuple) all-reduce: r / D more bytes (1/8 here; 16 / 4096 at Llama-3-8B's width with
    r = 16), no extra op, no extra latency."""
    tokens = reference("llama3")[0]
    b, t = tokens.shape
    plain, mesh = load("llama3", (1, 8), adapter=None)
    lora, _ = load("llama3", (1, 8))
    want = sorted(_all_reduces(plain, mesh, tokens), key=lambda c: (c.trips, c.op_bytes))
    got = sorted(_all_reduces(lora, mesh, tokens), key=lambda c: (c.trips, c.op_bytes))
    assert len(got) == len(want) == 3
    assert [c.trips for c in got] == [1, 2, 2]  # the embedding; two per layer (scan body)
    assert got[0].op_bytes == want[0].op_bytes  # the embedding's, untouched
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.shapes == (*w.shapes, (b * t, 4))
        assert g.op_bytes == w.op_bytes + b * t * 4 * 4  # + (B * T, r) float32


def test_fresh_adapters_compute_the_base_model():
    """B starts at zero: a freshly adapted checkpoint gives the checkpoint's logits exactly."""
    tokens = reference("llama3")[0]
    plain, mesh = load("llama3", (1, 8), adapter=None)
    fresh, _ = load(
        "llama3", (1, 8), adapter=None, lora_rank=8, lora_alpha=16.0, lora_targets="q,v"
    )
    assert [p for p, _ in adapted(fresh)] == ["layers.attention.wq", "layers.attention.wv"]
    np.testing.assert_array_equal(logits_of(fresh, mesh, tokens), logits_of(plain, mesh, tokens))


def test_targets_are_checked():
    assert parse_targets("up_proj, q") == ("q", "up")
    with pytest.raises(ValueError, match="choose from q,k,v,o,gate,up,down"):
        parse_targets("q,qkv")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        jtp.hf.save_peft(load("llama3", adapter=None)[0], "/nonexistent/never-written")


def test_generation_with_adapters_equals_the_merged_model():
    """jtp.generate runs an adapted model (2x4 fsdp) as it runs its merge: greedy tokens
    equal token for token, and differ from the base's (the adapter is not a no-op)."""
    mesh = mesh_of((2, 4))
    path = os.path.join(HF, "llama3")
    model = jtp.hf.load_pretrained(
        path, mesh, fsdp=True, max_seq_len=32, adapter=os.path.join(LORA, "llama3")
    )
    prompts = [[1, 17, 99, 5], [1, 64]]
    adapted_tokens = jtp.generate(model, prompts, max_new_tokens=6)
    assert adapted_tokens == jtp.generate(jtp.hf.merge_lora(model), prompts, max_new_tokens=6)
    base = jtp.hf.load_pretrained(path, mesh, fsdp=True, max_seq_len=32)
    assert adapted_tokens != jtp.generate(base, prompts, max_new_tokens=6)
