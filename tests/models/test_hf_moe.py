"""Mixture-of-experts Hugging Face checkpoints in and out: Mixtral, Qwen3-MoE, Qwen2-MoE
and OLMoE, checked against transformers without torch.

``tests/fixtures/hf/{mixtral,qwen3_moe,qwen2_moe,olmoe}`` were written by
``scripts/make_hf_fixtures.py`` (transformers 5.25, torch 2.13 CPU), bf16 weights in the
hub's one-tensor-per-expert layout: 8 experts, top 2, routers scaled so every layer uses all
8 experts in 16-25 distinct pairs over the 64 tokens, the k-th and (k+1)-th router
probabilities of every token at least 3.8e-5 apart (no near-tie float32 rounding could
flip), and shifting each router by one expert moves transformers' logits by 0.93-1.16 of
the largest (all asserted by the script). Mixtral (every layer sparse, "mixtral" gating);
Qwen3-MoE (per-head q/k norms, head_dim 8 at hidden 32, norm_topk_prob); Qwen2-MoE (q/k/v
biases, a sigmoid-gated shared expert, layers sparse / dense / sparse through
mlp_only_layers: built unrolled); OLMoE (q/k norms over the whole projection).

Tolerances, as tests/models/test_hf.py's: float32 logits, max |jtp - transformers| / max
|transformers| <= 1e-4 and mean KL(transformers || jtp) <= 1e-6 on (1, 1), (1, 8), (2, 4),
(2, 4) + FSDP and (4, 2) + sequence + loss parallel; seen <= 1.5e-6 and <= 1e-12 (both
compute in float32 and choose the same experts; the reduction order differs). A wrong
expert, router transpose, gating or norm width is O(1): the routing alone moves the logits
by ~1 of the largest. Greedy tokens: transformers' exactly, or a first difference at a
top-2 gap under TIE (the gaps of these fixtures are >= 8.8e-4, so none is a tie).
"""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file
from test_hf import T, errors, fixture, logits_of, mesh_of, params_of, reference

import jtp
from jtp.errors import InputError
from jtp.models.hf import files as hf_files
from jtp.models.hf.config import llama_config, read_config
from jtp.models.hf.families import default_architecture
from jtp.models.hf.load import config_of, load_weights
from jtp.models.llama import Llama
from jtp.models.plans import replicate_kv
from jtp.parallel.names import path_str

NAMES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
MESHES = {"1x1": ((1, 1), False), "1x8": ((1, 8), False), "2x4-fsdp": ((2, 4), True)}
MESHES["2x2x2-expert"] = ((2, 2, 2), False)  # data 2, expert 2, tensor 2: the exchange
SP_LP = "4x2-sp-lp"  # also sequence + loss parallel (the router sees the gathered tokens)
TIE = 1e-4  # logit units, as tests/generation/test_generate.py's


def scan(name):
    """Qwen2-MoE's fixture mixes dense and sparse layers: one scanned body cannot hold both."""
    return name != "qwen2_moe"


def load(name, shape=(1, 1), fsdp=False, **kw):
    mesh = mesh_of(shape)
    kw.setdefault("scan_layers", scan(name))
    path = fixture(name) if os.sep not in name else name
    return jtp.hf.load_pretrained(path, mesh, fsdp=fsdp, max_seq_len=T, **kw), mesh


@pytest.mark.parametrize("mesh_case", [*MESHES, SP_LP])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, mesh_case):
    sp = mesh_case == SP_LP
    shape, fsdp = ((4, 2), False) if sp else MESHES[mesh_case]
    model, mesh = load(name, shape, fsdp, sequence_parallel=sp, loss_parallel=sp)
    tokens, want = reference(name)
    rel, kl = errors(logits_of(model, mesh, tokens, sp, sp), want)
    assert rel <= 1e-4 and kl <= 1e-6, (rel, kl)


@pytest.mark.parametrize("name", NAMES)
def test_config_fields(name):
    """What each config.json gives jtp's decoder (transformers' reading of each field)."""
    c = llama_config(read_config(fixture(name)))
    assert (c.n_experts, c.experts_per_token) == (8, 2)
    want = {
        "mixtral": dict(gating="mixtral", moe_ffn_hidden=0, ffn_hidden=32, moe_layers=None),
        "qwen3_moe": dict(gating="softmax_topk", moe_ffn_hidden=16, norm_topk_prob=True),
        "qwen2_moe": dict(
            moe_ffn_hidden=16, shared_expert_hidden=32, qkv_bias=True, moe_layers=(True, False)
        ),
        "olmoe": dict(gating="softmax_topk", qk_norm=True, qk_norm_scope="all", ffn_hidden=32),
    }[name]
    assert {k: getattr(c, k) for k in want} == want
    assert c.router_aux_loss_coef == {"mixtral": 0.02, "olmoe": 0.01}.get(name, 0.001)
    assert c.layer_moe() == ((True, False, True) if name == "qwen2_moe" else (True, True))


def _split_experts(config, spec_e, spec_f):
    """The llama plan with the experts split by ``ParamSharding``: ``spec_e`` for w1 / w3
    ((E, D, F)), ``spec_f`` for w2 ((E, F, D))."""
    styles = {"w1": spec_e, "w3": spec_e, "w2": spec_f}
    return jtp.plans.llama(config) | {"layers.*.feed_forward.experts": jtp.ParamSharding(styles)}


@pytest.mark.parametrize(
    "name,split",
    [("mixtral", "experts"), ("mixtral", "hidden"), ("qwen2_moe", "experts")],
)
def test_each_device_reads_only_its_experts(name, split, monkeypatch):
    """Experts split over "tensor" (8 devices) along E (one expert each) or along F (when
    E < tensor, the other placement): every device's block holds the values of the
    unsplit load, and the reads from the file are exactly the blocks: along E each expert's
    tensor is read once, whole (by the one device holding it); along F each read is F / 8
    rows (or columns, of down_proj) of one expert's tensor. Scanned (Mixtral: (L, E, D, F))
    and unrolled (Qwen2-MoE: (E, D, F) per sparse layer)."""
    path = fixture(name)
    mesh = mesh_of((1, 8))
    config = replicate_kv(config_of(path, max_seq_len=T, scan_layers=scan(name)), mesh)
    if split == "experts":
        plan = _split_experts(config, P(jtp.TENSOR, None, None), P(jtp.TENSOR, None, None))
    else:
        plan = _split_experts(config, P(None, None, jtp.TENSOR), P(None, jtp.TENSOR, None))
    reads = []
    reader = hf_files.CheckpointFiles.reader

    def recording(self, name_):
        read = reader(self, name_)

        def block(index):
            out = read(index)
            if ".experts." in name_:
                reads.append((name_, out.shape))
            return out

        return block

    monkeypatch.setattr(hf_files.CheckpointFiles, "reader", recording)
    model = load_weights(path, mesh, config, plan)
    monkeypatch.undo()
    whole, _ = load(name)
    want, got = params_of(whole), params_of(model)
    experts = [n for n in got if ".experts." in n]
    assert len(experts) == (3 if scan(name) else 6)
    for n in experts:
        np.testing.assert_array_equal(got[n], want[n])
    names = [r[0] for r in reads]
    n_tensors = 3 * 8 * sum(config.layer_moe())  # gate, up, down of 8 experts per sparse layer
    f, d = config.moe_ffn_hidden or config.ffn_hidden, config.dim
    if split == "experts":
        assert sorted(names) == sorted(set(names)) and len(names) == n_tensors
        assert all(s in ((f, d), (d, f)) for _, s in reads)
    else:
        assert len(names) == 8 * n_tensors and len(set(names)) == n_tensors
        assert all(s in ((f // 8, d), (d, f // 8)) for _, s in reads)
    for n in experts:  # one expert (or F / 8 of each) per device
        x = model_value(model, n)
        shard = x.sharding.shard_shape(x.shape)
        axis = x.ndim - 3 if split == "experts" else x.ndim - (2 if n.endswith("w2") else 1)
        assert shard[axis] == x.shape[axis] // 8, (n, shard, x.shape)


def model_value(model, name):
    state = nnx.to_flat_state(nnx.state(model))
    return next(v.get_value() for p, v in state if path_str(p) == name)


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_writes_the_hub_layout(name, tmp_path):
    """Loaded on 2x4 with fsdp and written back with ``source=``: every tensor of the file,
    one per expert under the hub's names, bitwise the fixture's (bf16 -> float32 -> bf16 is
    exact), and the same config.json. Written without a source (config.json derived from the
    model: the family claim()s it): the same tensors, and a config.json that reads back as
    the same model, whose logits are transformers' (1e-4, as above)."""
    model, _ = load(name, (2, 4), fsdp=True)
    src = fixture(name)
    want = load_file(os.path.join(src, "model.safetensors"))
    out = str(tmp_path / "with_source")
    jtp.hf.save_pretrained(model, out, source=src)
    got = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    assert read_config(out) == read_config(src)
    assert default_architecture(model.config) == ARCHITECTURES[name]
    derived = str(tmp_path / "derived")
    jtp.hf.save_pretrained(model, derived, dtype="bfloat16")
    hf = read_config(derived)
    assert hf["architectures"] == [ARCHITECTURES[name]]
    got = load_file(os.path.join(derived, "model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    again, mesh = load(derived, (1, 8), scan_layers=scan(name))
    tokens, ref = reference(name)
    rel, kl = errors(logits_of(again, mesh, tokens), ref)
    assert rel <= 1e-4 and kl <= 1e-6, (rel, kl)


CASES = [(n, "1x8") for n in NAMES] + [("mixtral", "2x4-fsdp"), ("qwen2_moe", "2x4-fsdp")]


@pytest.mark.parametrize("name,mesh_case", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_greedy_equals_transformers(name, mesh_case):
    """All four prompts in one batch (left-padded, each with its own positions; the router
    sees the padding too, whose outputs no real token reads): transformers' greedy tokens
    (``generate.json``, from scripts/make_generate_fixtures.py), eos included."""
    with open(os.path.join(fixture(name), "generate.json")) as f:
        ref = json.load(f)
    shape, fsdp = MESHES[mesh_case]
    model = jtp.hf.load_pretrained(
        fixture(name), mesh_of(shape), fsdp=fsdp, max_seq_len=32, scan_layers=scan(name)
    )
    got = jtp.generate(model, ref["prompts"], max_new_tokens=ref["max_new_tokens"], eos_token_id=2)
    for ours, theirs, gaps in zip(got, ref["new_tokens"], ref["top2_gaps"], strict=True):
        pairs = enumerate(zip(ours, theirs, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), None)
        if first is None:
            assert ours == theirs
        else:
            assert gaps[first] < TIE, f"token {first}: {ours} vs {theirs} (gap {gaps[first]})"


REFUSED = {
    "mixtral": [({"router_jitter_noise": 0.1}, "router_jitter_noise")],
    "qwen2_moe": [
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"mlp_only_layers": [0, 1, 2]}, "leave no sparse layer"),
        ({"mlp_only_layers": "1"}, "mlp_only_layers"),
        ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
    ],
    "qwen3_moe": [({"decoder_sparse_step": 0}, "decoder_sparse_step")],
    "olmoe": [
        ({"clip_qkv": 8.0}, "clip_qkv"),
        ({"head_dim": 8}, "head_dim"),
        ({"sliding_window": 8}, "sliding_window"),
        ({"router_aux_loss_coef": -1}, "router_aux_loss_coef"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ],
}
REFUSALS = [(n, edit, why) for n, cases in REFUSED.items() for edit, why in cases]


@pytest.mark.parametrize("name,edit,why", REFUSALS, ids=[f"{n}-{w}" for n, _, w in REFUSALS])
def test_config_refusals(name, edit, why):
    """What jtp does not compute as transformers does is a one-line InputError naming the
    field, before a weight is read."""
    hf = read_config(fixture(name)) | edit
    with pytest.raises(InputError, match=why) as err:
        llama_config(hf)
    assert "\n" not in str(err.value)


def test_mixed_layers_refuse_a_scan(tmp_path):
    """Dense and sparse layers are not one scanned body: the error says to unroll."""
    with pytest.raises(ValueError, match="scan_layers=False"):
        load("qwen2_moe", scan_layers=True)


def test_num_experts_spellings(tmp_path):
    """transformers' configs alias num_experts and num_local_experts (attribute_map):
    Qwen3-MoE's hub files say num_experts, transformers 5.25 writes num_local_experts;
    Mixtral reads either; Qwen2-MoE's config class reads only num_experts."""
    hf = read_config(fixture("qwen3_moe"))
    hub = {k: v for k, v in hf.items() if k != "num_local_experts"} | {"num_experts": 4}
    assert llama_config(hub).n_experts == 4
    mixtral = {k: v for k, v in read_config(fixture("mixtral")).items() if k != "num_local_experts"}
    assert llama_config(mixtral | {"num_experts": 4}).n_experts == 4
    assert llama_config(mixtral).n_experts == 8  # transformers' default


def test_lora_on_experts_is_refused():
    """LoRA on the experts' gate / up / down: one line saying why, before any compile;
    LoRA on the attention projections of a MoE model loads (and computes the checkpoint's
    logits: B is zero)."""
    with pytest.raises(InputError, match="PEFT's layout") as err:
        load("mixtral", lora_rank=4, lora_targets="q,gate")
    assert "\n" not in str(err.value)
    model, mesh = load("olmoe", (1, 8), lora_rank=4, lora_targets="q,k,v,o")
    tokens, want = reference("olmoe")
    rel, _ = errors(logits_of(model, mesh, tokens), want)
    assert rel <= 1e-4


def test_olmoe_norms_span_the_projection():
    """OLMoE's q/k norm scales are one per feature of the whole projection: (H * E,) and
    (K * E,) per layer (16 x 4 and 8 x 4 here), Qwen3-MoE's one per feature of a head."""
    olmoe, qwen3 = params_of(load("olmoe")[0]), params_of(load("qwen3_moe")[0])
    assert olmoe["layers.attention.q_norm.scale"].shape == (2, 16 * 4)
    assert olmoe["layers.attention.k_norm.scale"].shape == (2, 8 * 4)
    assert qwen3["layers.attention.q_norm.scale"].shape == (2, 8)


def test_export_from_no_file_claims_each_family(tmp_path):
    """A MoE model that came from no file gets the family that computes it (claim()), or
    an error when none does (a softmax-top-k model without Qwen's or OLMoE's features)."""
    for name, arch in ARCHITECTURES.items():
        assert default_architecture(llama_config(read_config(fixture(name)))) == arch
    plain = dataclasses.replace(llama_config(read_config(fixture("qwen3_moe"))), qk_norm=False)
    with pytest.raises(ValueError, match="no supported HF architecture"):
        jtp.hf.save_pretrained(Llama(plain, rngs=nnx.Rngs(0)), str(tmp_path / "x"))
