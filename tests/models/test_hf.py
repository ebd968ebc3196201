"""Hugging Face checkpoints in and out, checked against transformers without torch.

``tests/fixtures/hf/*`` were written by ``scripts/make_hf_fixtures.py`` (transformers 5.24,
torch 2.13 CPU): tiny random-weight Llama (llama3 RoPE scaling; hub config spelling),
tied Llama, Mistral (sliding window, sharded files), Qwen2 (q/k/v biases, tied) and Qwen3
(q/k norms, head_dim 8 != 32 / 16), Phi-3 (fused qkv_proj / gate_up_proj: its own tests
are test_hf_phi3.py), a Llama with 2 kv heads (replicated on tensor 8 and 4:
``kv_replicas``), Gemma 2 (GeGLU, (1 + w) and sandwich norms, a window of 8 on alternate
layers, soft-capped scores and logits) and Gemma 3 (q/k norms, sliding / global / sliding
layers with two RoPE bases, one linearly scaled), each with transformers' float32 logits on
4 x 16 fixed tokens.

Tolerances. float32 logits: max |jtp - transformers| / max |transformers| <= 1e-4 and mean
KL(transformers || jtp) <= 1e-6; seen <= 2.1e-6 and <= 4e-12 (both compute in float32; the
reduction order differs; the Gemmas <= 7.4e-7 and 1.7e-13). Anything structural is O(1):
without the RoPE permutation the error is 0.95-1.3 and the KL 0.5-6.7; without llama3's
blended band, 0.5 and 0.06; without one Gemma feature, 0.09-1.7 (test_each_gemma_...).

bfloat16 parameters and compute: bf16 keeps 8 bits of mantissa (relative rounding
2^-9 = 2e-3 per op) and the logits are a few dozen roundings deep; seen 1.7-2.6% of the
largest logit and KL 1.5e-4-1.1e-3 over the six fixtures (the Gemmas 0.3-1.2%, KL <=
7.8e-5). Bounds: 5% and 1e-2.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jtp
from jtp.models.hf import config as hf_config_module
from jtp.models.hf import files as hf_files
from jtp.models.hf.families import default_architecture, tensor_map
from jtp.models.hf.names import to_hf
from jtp.models.llama import Llama, LlamaConfig
from jtp.models.rope import LinearRopeScaling
from jtp.parallel.names import path_str

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
NAMES = ["llama3", "llama_tied", "mistral", "qwen2", "qwen3", "phi3", "llama_kv2"]
NAMES += ["gemma2", "gemma3"]
T = 16  # tokens per fixture sequence; mistral's sliding window (32) is longer
MESHES = {
    "1x1": ((1, 1), False, False, False),
    "1x8": ((1, 8), False, False, False),
    "2x4-fsdp": ((2, 4), True, False, False),
    "4x2-sp-lp": ((4, 2), False, True, True),
}


def fixture(name):
    return os.path.join(FIXTURES, name)


def reference(name):
    ref = np.load(os.path.join(fixture(name), "reference.npz"))
    return ref["tokens"], ref["logits"]


def mesh_of(shape):
    """(data, tensor) or (data, expert, tensor) over the first devices."""
    data, *expert, tensor = shape
    n = data * tensor * (expert[0] if expert else 1)
    return jtp.make_mesh(data, tensor, expert=expert[0] if expert else 1, devices=jax.devices()[:n])


def load(name, shape=(1, 1), fsdp=False, sp=False, lp=False, **kw):
    mesh = mesh_of(shape)
    model = jtp.hf.load_pretrained(
        fixture(name) if os.sep not in name else name,
        mesh,
        fsdp=fsdp,
        sequence_parallel=sp,
        loss_parallel=lp,
        max_seq_len=T,
        **kw,
    )
    return model, mesh


def logits_of(model, mesh, tokens, sp=False, lp=False):
    plan = jtp.plans.llama(model.config, sequence_parallel=sp, loss_parallel=lp, mesh=mesh)
    graphdef, state = nnx.split(model)
    with jtp.activation_rules(mesh, plan.activations):
        out = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jtp.shard_batch(tokens, mesh))
    return out


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def errors(logits, want):
    """(max |diff| / max |want|, mean over positions of KL(want || logits)), in float64."""
    got, want = np.asarray(logits, np.float64), np.asarray(want, np.float64)
    rel = np.abs(got - want).max() / np.abs(want).max()
    lp, lq = log_softmax(want), log_softmax(got)
    return rel, float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def params_of(model):
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("mesh_case", list(MESHES))
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, mesh_case):
    shape, fsdp, sp, lp = MESHES[mesh_case]
    model, mesh = load(name, shape, fsdp, sp, lp)
    tokens, want = reference(name)
    logits = logits_of(model, mesh, tokens, sp, lp)
    rel, kl = errors(logits, want)
    assert rel <= 1e-4 and kl <= 1e-6, (rel, kl)
    if lp:  # loss parallel: the logits stay split on the vocabulary
        assert logits.sharding.spec[-1] == "tensor"


def test_born_sharded_each_device_reads_its_slice(monkeypatch):
    """(1, 8): every kernel is read in 8 disjoint blocks (whole heads for the permuted
    q/k rows), every element of every tensor read exactly once (replicas share one read)."""
    reads = {}
    original = hf_files.CheckpointFiles.reader

    def recording(self, name):
        read = original(self, name)

        def wrapped(index):
            block = read(index)
            reads.setdefault(name, []).append(block.size)
            return block

        return wrapped

    monkeypatch.setattr(hf_files.CheckpointFiles, "reader", recording)
    model, mesh = load("qwen3", (1, 8))
    files = hf_files.CheckpointFiles(fixture("qwen3"))
    for name, shape in files.shape.items():
        assert sum(reads[name]) == np.prod(shape), name
        if name.endswith("proj.weight") or name == "lm_head.weight":
            assert len(reads[name]) == 8 and max(reads[name]) == np.prod(shape) // 8, name
    wq = model.layers.attention.wq.kernel.get_value()  # scanned: all layers stacked
    assert wq.sharding.shard_shape(wq.shape) == (2, 32, 128 // 8)


def test_unrolled_layers_load_and_save_the_same_tensors(tmp_path):
    """``scan_layers=False`` keeps one parameter per HF tensor (``layers.0...``); it computes
    transformers' logits too, and both forms export the same files, bit for bit."""
    scanned, mesh = load("llama3", (2, 4), fsdp=True)
    unrolled, _ = load("llama3", (2, 4), fsdp=True, scan_layers=False)
    assert "layers.1.attention.wq.kernel" in params_of(unrolled)
    tokens, want = reference("llama3")
    rel, kl = errors(logits_of(unrolled, mesh, tokens), want)
    assert rel <= 1e-4 and kl <= 1e-6, (rel, kl)
    for name, model in (("s", scanned), ("u", unrolled)):
        jtp.hf.save_pretrained(model, str(tmp_path / name), source=fixture("llama3"))
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "u")
    assert sorted(a) == sorted(b) == sorted(_tensors(fixture("llama3")))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_tied_table_is_one_array_split_on_vocab():
    model, mesh = load("qwen2", (2, 4), fsdp=True)
    assert model.output is None and model.config.tie_embeddings
    table = model.tok_embeddings.embedding.get_value()
    assert table.shape == (128, 64)
    assert table.sharding.spec == jax.sharding.PartitionSpec("tensor", "data")
    names = set(params_of(model))
    assert "tok_embeddings.embedding" in names and not [n for n in names if "output" in n]


def _tensors(path):
    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), framework="numpy") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("name", ["mistral", "llama_tied", "phi3", "llama_kv2", "gemma2", "gemma3"])
def test_export_then_reimport_is_bitwise(name, tmp_path):
    """A bf16 checkpoint loaded into float32 and saved back is the original, bit for bit
    (and so is its config.json); re-importing the export gives the same parameters."""
    model, _ = load(name, (2, 4), fsdp=True)
    out = str(tmp_path / "export")
    jtp.hf.save_pretrained(model, out, source=fixture(name), max_shard_bytes=40_000)
    ours, theirs = _tensors(out), _tensors(fixture(name))
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and np.array_equal(
            ours[k].view(np.uint16), v.view(np.uint16)
        ), k
    with open(os.path.join(out, "config.json")) as f, open(fixture(name) + "/config.json") as g:
        assert json.load(f) == json.load(g)
    assert os.path.exists(os.path.join(out, "generation_config.json"))
    assert not os.path.exists(os.path.join(out, "reference.npz"))  # only HF's side files
    with open(os.path.join(out, hf_files.INDEX)) as f:
        index = json.load(f)
    assert (
        sorted(index["weight_map"]) == sorted(theirs) and len(set(index["weight_map"].values())) > 1
    )
    again, _ = load(out, (1, 8))
    a, b = params_of(model), params_of(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_float32_export_without_source(tmp_path):
    """A model with no source file: a derived config.json (Qwen3 by its features), float32
    tensors in one file, and the same logits after re-import."""
    model, mesh = load("qwen3", (1, 8))
    out = str(tmp_path / "qwen3")
    jtp.hf.save_pretrained(model, out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 8
    expected = [".jtp-artifact.json", "config.json", "model.safetensors"]  # the marker: jtp's
    assert sorted(os.listdir(out)) == expected
    assert {v.dtype for v in _tensors(out).values()} == {np.dtype(np.float32)}
    again, _ = load(out, (2, 4), fsdp=True)
    assert again.config == model.config
    a, b = params_of(model), params_of(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


# What switching one feature off does to jtp's logits: each must move them by O(1) against
# transformers' (the fixture script checks that transformers' own move as much).
GEMMA_FEATURES = {
    "gemma2": {
        "sliding window": dict(sliding_window=None),
        "attention soft-cap": dict(attn_softcap=None),
        "final soft-cap": dict(final_softcap=None),
        "query_pre_attn_scalar": dict(query_pre_attn_scalar=None),
        "(1 + w) norms": dict(norm_offset=False),
        "embedding scale": dict(embed_scale=False),
        "GeGLU": dict(activation="silu"),
    },
    "gemma3": {
        "sliding window": dict(sliding_window=None),
        "local RoPE base": dict(local_rope_theta=None),
        "linear RoPE scaling": dict(rope_scaling=None),
        "query_pre_attn_scalar": dict(query_pre_attn_scalar=None),
        "(1 + w) norms": dict(norm_offset=False),
    },
}


@pytest.mark.parametrize("name", list(GEMMA_FEATURES))
def test_each_gemma_feature_matters(name):
    """The fixture's weights in a model with one Gemma feature switched off: transformers'
    logits are missed by at least 3% of the largest (seen 8.6-170%), where the model with
    all of them is within 1e-4 (test above). Where transformers can switch the same feature
    off, its own logits move by what jtp's do (the fixture script prints 0.655, 0.546,
    1.703, 0.086 for Gemma 2's window, soft-caps and scalar, 0.183, 0.239, 0.105, 0.091 for
    Gemma 3's window, RoPE base, scaling and scalar; jtp's are the same to 3 digits). The
    sandwich norms cannot be switched off this way (they are parameters): the bitwise
    export, which names all four norms, and the logits test hold them."""
    model, _ = load(name)
    tokens, want = reference(name)
    state = nnx.state(model)
    for feature, change in GEMMA_FEATURES[name].items():
        config = dataclasses.replace(model.config, **change)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda c=config: Llama(c, rngs=nnx.Rngs(0))))
        logits = jax.jit(lambda s, t, g=graphdef: nnx.merge(g, s)(t))(state, tokens)
        rel, _ = errors(logits, want)
        assert rel >= 0.03, (feature, rel)


def test_gemma_config_spellings(tmp_path):
    """Each Gemma fixture's config.json in the other spelling gives the same model: Gemma 2's
    hub file (rope_theta, no layer_types: alternating from a sliding layer) and Gemma 3's
    transformers-5 file (nested rope_parameters, layer_types) against Gemma 3's hub file
    (rope_theta + rope_scaling for global layers, rope_local_base_freq, a
    sliding_window_pattern; transformers' logits on it are the same: fixture script)."""
    g2 = jtp.hf.config_of(fixture("gemma2"), max_seq_len=T)
    got = (g2.sliding_window, g2.sliding_layers, g2.attn_softcap, g2.final_softcap)
    assert got == (8, (True, False), 3.0, 8.0)
    v5 = {
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
        "rope_theta": None,
        "rope_scaling": None,
        "layer_types": ["sliding_attention", "full_attention"],
    }
    assert jtp.hf.config_of(edited(tmp_path, "gemma2", v5), max_seq_len=T) == g2
    g3 = jtp.hf.config_of(fixture("gemma3"), max_seq_len=T)
    got = (g3.rope_theta, g3.rope_scaling, g3.local_rope_theta, g3.sliding_layers)
    assert got == (1e4, LinearRopeScaling(4.0), 10.0, (True, False))
    assert g3.qk_norm and g3.tie_embeddings and g3.attn_softcap is None
    hub = {
        "rope_parameters": None,
        "layer_types": None,
        "rope_theta": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "rope_local_base_freq": 10.0,
        "sliding_window_pattern": 2,
    }
    assert jtp.hf.config_of(edited(tmp_path, "gemma3", hub), max_seq_len=T) == g3


def test_a_training_checkpoint_record_gives_the_config_back():
    """What a training checkpoint records of the model (``dataclasses.asdict`` through JSON,
    read by jtp.eval / jtp.generate) is the config again: Gemma 3's linear RoPE scaling
    stays linear (Llama 3.1's stays llama3), the layer pattern a tuple."""
    from jtp.recipes.llama import model_config_of

    for name in ("gemma3", "llama3", "gemma2"):
        config = jtp.hf.config_of(fixture(name), max_seq_len=T)
        assert model_config_of(json.loads(json.dumps(dataclasses.asdict(config)))) == config


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_derived_config_describes_the_model(name):
    """Without a source, save_pretrained derives config.json from the model alone: for a
    windowed Mistral, Gemma 2 and Gemma 3 it names that architecture and reads back as the
    same config (what describes() checks, as save does); a model no architecture computes
    (a Llama with GeGLU) is refused by name."""
    config = jtp.hf.config_of(fixture(name), max_seq_len=T)
    arch = default_architecture(config)
    hf = hf_config_module.hf_config(config, arch, "float32")
    with open(os.path.join(fixture(name), "config.json")) as f:
        assert hf["model_type"] == json.load(f)["model_type"]
    hf_config_module.describes(hf, config)
    assert hf_config_module.llama_config(hf, max_seq_len=T) == config


def test_derived_qwen_config_says_which_layers_slide():
    """The window fields of a derived Qwen config.json, as transformers' own Qwen2Config
    writes them (the oracle tier, tests/oracle, runs them in transformers): without a
    window, use_sliding_window false and only "full_attention" layers (every layer
    "sliding_attention" with a null window made transformers 5 fail on the first forward);
    with one on the last layer, max_window_layers 1; head_dim left out where Qwen2Config
    has no such field and the default is right."""
    config = jtp.hf.config_of(fixture("qwen2"), max_seq_len=T)
    hf = hf_config_module.hf_config(config, "Qwen2ForCausalLM", "float32")
    assert hf["use_sliding_window"] is False and hf["sliding_window"] is None
    assert hf["layer_types"] == ["full_attention"] * 2 and "max_window_layers" not in hf
    assert "head_dim" not in hf
    windowed = dataclasses.replace(config, sliding_window=4, sliding_layers=(False, True))
    hf = hf_config_module.hf_config(windowed, "Qwen2ForCausalLM", "float32")
    assert (hf["use_sliding_window"], hf["sliding_window"], hf["max_window_layers"]) == (True, 4, 1)
    assert hf["layer_types"] == ["full_attention", "sliding_attention"]
    assert hf_config_module.llama_config(hf, max_seq_len=T) == windowed


def test_save_refuses_a_model_no_architecture_computes(tmp_path):
    config = LlamaConfig(n_layers=1, activation="gelu_tanh")
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))  # refused before a read
    with pytest.raises(ValueError, match=r"no supported HF architecture.*activation"):
        jtp.hf.save_pretrained(model, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_save_replaces_a_directory_whole(tmp_path, monkeypatch):
    """A failed save leaves the previous checkpoint as it was, and no temporary directory."""
    model, _ = load("qwen2")
    out = tmp_path / "ckpt"
    jtp.hf.save_pretrained(model, str(out), source=fixture("qwen2"))
    before = sorted(os.listdir(out))

    def broken(hf_name):
        raise OSError("disk full")

    def failing_write(file, entries, produce):
        return hf_files.write_safetensors(file, entries, broken)

    monkeypatch.setattr("jtp.models.hf.save.write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        jtp.hf.save_pretrained(model, str(out), source=fixture("qwen2"))
    assert sorted(os.listdir(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_load(name):
    model, mesh = load(name, (2, 4), fsdp=True, dtype=jnp.bfloat16)
    dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    tokens, want = reference(name)
    logits = logits_of(model, mesh, tokens)
    assert logits.dtype == jnp.bfloat16  # the modules compute in the parameters' dtype
    rel, kl = errors(logits, want)
    assert rel <= 5e-2 and kl <= 1e-2, (rel, kl)


# ---------------------------------------------------------------- refusals
def edited(tmp_path, name, config=None, tensors=None):
    """A copy of fixture ``name`` with config.json fields set (None: removed) and tensors
    added or, with value None, removed (single-file fixtures)."""
    path = tmp_path / name
    shutil.copytree(fixture(name), path)
    with open(path / "config.json") as f:
        c = json.load(f)
    for k, v in (config or {}).items():
        c.pop(k) if v is None else c.__setitem__(k, v)
    with open(path / "config.json", "w") as f:
        json.dump(c, f)
    if tensors:
        t = load_file(str(path / "model.safetensors"))
        for k, v in tensors.items():
            t.pop(k) if v is None else t.__setitem__(k, v)
        save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


REFUSALS = {
    "architecture": (
        "qwen3",
        {"architectures": ["GemmaForCausalLM"]},
        None,
        r"GemmaForCausalLM.*not supported.*LlamaForCausalLM, MistralForCausalLM, "
        r"Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM",
    ),
    "gemma3-multimodal": (
        "gemma3",
        {"architectures": ["Gemma3ForConditionalGeneration"]},
        None,
        r"Gemma3ForConditionalGeneration.*not supported.*multimodal.*Gemma3ForCausalLM",
    ),
    "gemma-bidirectional": (
        "gemma3",
        {"use_bidirectional_attention": True},
        None,
        r"use_bidirectional_attention=True is not supported",
    ),
    "gemma-activation": (
        "gemma2",
        {"hidden_activation": "gelu"},
        None,
        r"hidden_activation='gelu' is not supported.*gelu_pytorch_tanh",
    ),
    "layer-type": (
        "gemma3",
        {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
        None,
        r"layer_types=.*chunked_attention.*is not supported",
    ),
    "gemma3-flat-rope": (
        "gemma3",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
        None,
        r"Gemma 3's rope_parameters must be nested by layer type",
    ),
    "gemma3-scaled-local-rope": (
        "gemma3",
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e4},
                "sliding_attention": {"rope_type": "linear", "rope_theta": 10.0, "factor": 2.0},
            }
        },
        None,
        r"rope_parameters.sliding_attention has a rope_type other than 'default'",
    ),
    "rope-type-hub": (
        "llama3",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        None,
        r"rope_scaling.rope_type='yarn' is not supported",
    ),
    "rope-type-v5": (
        "qwen3",
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}},
        None,
        r"rope_parameters.rope_type='dynamic' is not supported",
    ),
    "attention-bias": (
        "llama3",
        {"attention_bias": True},
        None,
        r"attention_bias=True is not supported.*o_proj",
    ),
    "mlp-bias": ("llama3", {"mlp_bias": True}, None, r"mlp_bias=True is not supported"),
    "activation": ("qwen2", {"hidden_act": "gelu"}, None, r"hidden_act='gelu' is not supported"),
    "missing-field": ("qwen2", {"hidden_size": None}, None, r"field 'hidden_size' is missing"),
    "unexpected-bias": (
        "llama3",
        None,
        {"model.layers.1.self_attn.o_proj.bias": np.zeros(32, np.float32)},
        r"tensor 'model.layers.1.self_attn.o_proj.bias' has no place",
    ),
    "missing-tensor": (
        "qwen3",
        None,
        {"model.layers.1.self_attn.k_norm.weight": None},
        r"tensor 'model.layers.1.self_attn.k_norm.weight' is missing.*"
        r"layers.attention.k_norm.scale\[1\]",
    ),
    "wrong-shape": (
        "qwen2",
        {"intermediate_size": 96},
        None,
        r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(64, 64\), config.json "
        r"implies \(96, 64\)",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_field_or_tensor(case, tmp_path, monkeypatch):
    assert_refused_before_reading(tmp_path, monkeypatch, *REFUSALS[case])


def assert_refused_before_reading(tmp_path, monkeypatch, name, config, tensors, match):
    """Fixture ``name`` edited (:func:`edited`) is refused with a ``ValueError`` matching
    ``match`` before a single weight is read."""
    path = edited(tmp_path, name, config, tensors)

    def no_reads(self, tensor):
        raise AssertionError(f"read {tensor} before refusing")

    monkeypatch.setattr(hf_files.CheckpointFiles, "reader", no_reads)
    with pytest.raises(ValueError, match=match):
        jtp.hf.load_pretrained(path, mesh_of((1, 8)), max_seq_len=T)


def test_a_sliding_window_shorter_than_the_sequence(tmp_path):
    """Mistral with its window cut to 8 of the 16 tokens (transformers' reference was made
    with 32, which masks nothing here): a query at i sees keys i - 8 < j <= i, so the
    logits at positions 0-7 are still transformers' (within the fp32 bound) and at 8, the
    first query that loses a key, they move by O(1): the window is exactly transformers'
    (one longer would leave position 8 unchanged, one shorter would move position 7).
    Transformers' own windowed logits are matched by the Gemma fixtures. Qwen's window
    goes on the layers ``layer_types`` names (or those from ``max_window_layers``)."""
    tokens, want = reference("mistral")
    model, mesh = load(edited(tmp_path, "mistral", {"sliding_window": 8}))
    assert model.config.sliding_window == 8 and model.config.layer_sliding() == (True, True)
    got = np.asarray(logits_of(model, mesh, tokens), np.float64)
    top = np.abs(want).max()
    assert np.abs(got[:, :8] - want[:, :8]).max() <= 1e-4 * top
    assert np.abs(got[:, 8] - want[:, 8]).max() >= 0.05 * top
    assert jtp.hf.config_of(fixture("mistral")).max_seq_len == 512  # no refusal: 32 < 512
    qwen = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    config = jtp.hf.config_of(edited(tmp_path, "qwen2", qwen | {"layer_types": None}))
    assert (config.sliding_window, config.layer_sliding()) == (4, (False, True))
    types = ["sliding_attention", "full_attention"]
    config = jtp.hf.config_of(edited(tmp_path / "b", "qwen2", qwen | {"layer_types": types}))
    assert (config.sliding_window, config.sliding_layers) == (4, (True, False))
    config = jtp.hf.config_of(edited(tmp_path / "c", "qwen2", {"sliding_window": 4}))
    assert config.sliding_window is None  # use_sliding_window false: no window anywhere


def test_refuses_a_directory_without_safetensors(tmp_path):
    os.makedirs(tmp_path / "bin")
    shutil.copy(os.path.join(fixture("qwen2"), "config.json"), tmp_path / "bin")
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        jtp.hf.load_pretrained(str(tmp_path / "bin"), mesh_of((1, 1)))


def test_save_refuses_a_source_that_is_not_the_model(tmp_path):
    model, _ = load("qwen2")
    with pytest.raises(
        ValueError,
        match=r"does not describe this model: rope_theta.*qkv_bias: config.json gives False",
    ):
        jtp.hf.save_pretrained(model, str(tmp_path / "x"), source=fixture("llama_tied"))
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------- CLI
def test_cli_fine_tunes_and_exports(tmp_path):
    """``--hf``: the first loss is the checkpoint's own (not a random init's ~ln 128), and
    falls on the one batch trained three times; the ``--export-hf`` checkpoint holds exactly
    the trained parameters (``--export``'s), in HF's layout and the source's dtype."""
    from jtp.cli.train import main
    from jtp.models.llama import cross_entropy
    from jtp.recipes import LlamaTask, LlamaTaskConfig

    src, out, flat = fixture("qwen2"), str(tmp_path / "hf"), str(tmp_path / "flat.safetensors")
    metrics = main(
        [
            "--devices",
            "8",
            "--model",
            "llama",
            "--hf",
            src,
            "--data-parallel",
            "2",
            "--tensor-parallel",
            "4",
            "--fsdp",
            "--sequence-parallel",
            "--loss-parallel",
            "--seq-len",
            str(T),
            "--samples",
            "8",
            "--max-epochs",
            "3",
            "--lr",
            "1e-3",
            "--no-progress",
            "--root-dir",
            str(tmp_path),
            "--export",
            flat,
            "--export-hf",
            out,
        ]
    )
    losses = metrics["losses"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    model, mesh = load("qwen2", (2, 4), fsdp=True)
    task = LlamaTask(LlamaTaskConfig(hf=src, seq_len=T, samples=8))
    task.mesh = mesh
    first = np.asarray(next(iter(task.train_dataloader())))
    logits = logits_of(model, mesh, first[:, :-1])
    want = float(cross_entropy(logits, jnp.asarray(first[:, 1:])))
    # The same parameters and tokens through the train step and through a plain forward:
    # fp32 sums in another order, in a mean of positive cross-entropies (no cancellation).
    assert losses[0] == pytest.approx(want, rel=1e-5) and want > 1.5 * np.log(128)
    trained = load_file(flat)
    exported = _tensors(out)
    for t in tensor_map(model.config, "Qwen2ForCausalLM"):
        want = to_hf(t, t.take(trained[t.jtp])).astype(exported[t.hf].dtype)
        assert np.array_equal(exported[t.hf], want), t.hf
    assert exported["model.norm.weight"].dtype == jnp.bfloat16  # the source's dtype


def test_num_params_counts_what_the_model_holds():
    for name in NAMES:
        config = jtp.hf.config_of(fixture(name), max_seq_len=T)
        abstract = nnx.eval_shape(lambda c=config: jtp.models.llama.Llama(c, rngs=nnx.Rngs(0)))
        sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))]
        assert sum(sizes) == config.num_params(), name


# At these widths attention's backward (float32 score gradients times bf16 q / k, as in
# jax's own XLA attention) is 10% of Gemma 2's matmul FLOPs: the bf16 policy's warning.
@pytest.mark.filterwarnings("ignore:precision='bf16-mixed'")
@pytest.mark.parametrize(
    "name,precision,kernel", [("qwen2", "32-true", "xla"), ("gemma2", "bf16-mixed", "xla")]
)
def test_planner_plans_for_the_checkpoint_shapes(tmp_path, monkeypatch, name, precision, kernel):
    """``python -m jtp.capacity --hf DIR``: the checkpoint's shapes (here tied, with biases; or
    Gemma 2's), from config.json alone. One configuration, to keep it quick. (The preset
    name is not one of PRESETS then, so a measure() that ignored the checkpoint would
    fail.) Gemma 2 in bf16 compiles XLA's attention: a GPU's "auto" cannot take cuDNN's
    kernel (which it would for Qwen2 in bf16: blockwise stands for it) for soft-capped
    scores."""
    from jtp.capacity import planner
    from jtp.cli.capacity import main

    src = tmp_path / "config_only"
    os.makedirs(src)
    shutil.copy(os.path.join(fixture(name), "config.json"), src)
    asked = []

    def one_configuration(*args):
        asked.append(args)
        return [planner.Layout(1, 8, fsdp=False, sequence_parallel=True, remat=False)]

    monkeypatch.setattr(planner, "layouts", one_configuration)
    out = main(
        [
            "--hf",
            str(src),
            "--devices",
            "8",
            "--devices-per-host",
            "8",
            "--global-batch",
            "8",
            "--seq-len",
            str(T),
            "--precision",
            precision,
            "--json",
            str(tmp_path / "plan.json"),
        ]
    )
    assert out["request"]["attention_compiled"] == kernel
    # devices, per host, heads, kv heads, batch, seq, remat policies, experts, context sizes
    remats = ("none", "full", "dots", "minimal")
    # 0 experts: a dense checkpoint; context 1 only: 16 tokens are no long sequence
    assert asked == [(8, 8, 16, 8, 8, T, remats, 0, (1,))]
    config = jtp.hf.config_of(str(src))
    (row,) = out["rows"]
    assert row["floor_bytes"] == config.num_params() * 16 / 8 and config.tie_embeddings
    assert 0 < row["memory_bytes"] < 10e6  # compiled for the checkpoint's (tiny) shapes
