"""The oracle tier: transformers and PEFT run what jtp writes (``make test-oracle``).

The main suite reads jtp's exports back with jtp, which cannot see a config.json that jtp
reads one way and transformers another. Here transformers itself is the judge. The
oracle interpreter (``JTP_ORACLE_PYTHON``: ``.venv-oracle``, CPU torch + transformers + peft;
tests/conftest.py leaves this directory out when it is unset) runs
``tests/oracle/oracle_worker.py`` twice for the whole module:

1. ``build``: one source checkpoint per case of :data:`CASES`, made by transformers from a
   tiny config (every supported architecture; with and without sliding windows where the
   family has them, the window shorter than the sequence; tied and untied embeddings; the
   MoE families with shared experts and dense layers among the sparse ones);
2. here, under jtp: each source loaded sharded on a (1, 2) mesh, jtp's logits, and two
   exports: ``save_pretrained(source=...)`` (the source's config.json written back) and
   ``save_pretrained()`` (config.json derived from the model alone); for :data:`LORA`
   cases a model with random rank-4 adapters, its logits, ``save_peft`` and the merged
   ``save_pretrained``;
3. ``run``: transformers loads every source and export (PEFT every adapter onto its
   source) and writes its float32 logits and ``AutoConfig(...).to_dict()``; of each MoE
   source also its training ``loss`` and ``aux_loss`` with ``output_router_logits=True``,
   which jtp's loss with the router term must equal (:func:`jtp_loss`).

The cases of :data:`CONTEXT` (windows shorter than the sequence, Gemma's soft-caps and
interleaved layers with two RoPE bases) are also loaded onto a mesh with a "context" axis
and run with the sequence split into balanced pieces (:func:`jtp_logits_in_pieces`): the
same transformers logits of the source are the reference, at the same tolerance.

Tolerance: max |transformers - jtp| / max |jtp| <= 1e-5. Both sides compute in float32
(unit roundoff 6e-8) on models two or three layers deep with reductions of at most 64
terms; only the order of the sums differs (and, for a merged export, W + s A B summed
before the matmul rather than after), so each logit carries a few hundred roundings of
relative size 6e-8 that mostly cancel: seen <= 2.8e-6 here (Phi-3 with a window; PEFT
<= 1.5e-6, merged LoRA <= 1.9e-6, context pieces <= 5.3e-7; the main suite's fixtures
<= 2.1e-6). A structural mistake (a mask, a RoPE, a norm, an adapter's transpose) moves
the logits by O(1e-1) of the largest (the adapters themselves move them by 15-84%, >= 5%
checked), four orders above the bound.
"""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import pieces_logits

import jtp
from jtp.models.decoder import cross_entropy
from jtp.models.hf.config import ARCHITECTURES
from jtp.models.lora import adapted
from jtp.models.moe import load_balancing_loss

WORKER = os.path.join(os.path.dirname(__file__), "oracle_worker.py")
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 16)).astype(np.int32)
RTOL = 1e-5  # of the largest logit: see the module docstring
WINDOW = 4  # shorter than the 16 tokens: the window changes the logits
COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
# name -> (transformers config class, its arguments beyond COMMON)
CASES = {
    "llama": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE)),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "mistral_no_window": ("MistralConfig", dict(sliding_window=None)),
    # transformers' default Qwen2: use_sliding_window=False (the window field is then null)
    "qwen2": ("Qwen2Config", dict()),
    "qwen2_window": (
        "Qwen2Config",
        dict(
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            num_hidden_layers=3,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    "qwen3_window": (
        "Qwen3Config",
        dict(
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            num_hidden_layers=3,
        ),
    ),
    "phi3": ("Phi3Config", dict(pad_token_id=None)),
    "phi3_window": ("Phi3Config", dict(pad_token_id=None, sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", dict(head_dim=8, sliding_window=WINDOW)),
    "gemma2_untied": (
        "Gemma2Config",
        dict(
            head_dim=8,
            sliding_window=WINDOW,
            tie_word_embeddings=False,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=8.0,
            query_pre_attn_scalar=4,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            head_dim=8,
            num_hidden_layers=3,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": dict(rope_type="default", rope_theta=10.0),
                "full_attention": dict(rope_type="linear", rope_theta=1e4, factor=4.0),
            },
        ),
    ),
    # no layer slides: layer_types all global (the window field keeps its default, which
    # Gemma's attention reads though no layer uses it)
    "gemma3_no_window": (
        "Gemma3TextConfig",
        dict(
            head_dim=8,
            layer_types=["full_attention", "full_attention"],
        ),
    ),
    # Mixture of experts: 4 experts, top 2; Mixtral with a window on every layer.
    "mixtral": (
        "MixtralConfig",
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    ),
    # Qwen2-MoE: shared expert, q/k/v biases, layers sparse / dense / sparse (unrolled)
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_hidden_layers=3,
            mlp_only_layers=[1],
            router_aux_loss_coef=0.05,
        ),
    ),
    # Qwen3-MoE: renormalised top 2, a window on every layer
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            norm_topk_prob=True,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=WINDOW,
        ),
    ),
    # decoder_sparse_step 2: layer 0 dense, layer 1 sparse (unrolled)
    "qwen3_moe_step": (
        "Qwen3MoeConfig",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2),
    ),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
}
# Cases of dense and sparse layers: built unrolled (one scanned body holds one kind).
UNROLLED = ("qwen2_moe", "qwen3_moe_step")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_step", "olmoe")
# Cases also run with context parallelism, on CONTEXT_MESH (XLA's kernel; the main suite's
# tests/models/test_hf_context.py covers the blockwise one and the other layouts).
CONTEXT = ("gemma2_untied", "gemma3")  # windows and soft-caps; Mistral: test_hf_context.py
CONTEXT_MESH = dict(context=4, tensor=2)
# Cases also run with LoRA adapters: their targets (jtp's short names). Phi-3 is refused by
# save_peft (its fused projections take one PEFT adapter each, jtp has one per projection).
LORA = {
    "llama": "q,k,v,o,gate,up,down",
    "qwen2_window": "q,k,v,o,gate,up,down",
    "qwen3": "q,v",
    "mistral": "q,k,v,o,gate,up,down",
    "gemma2": "q,k,v,o,gate,up,down",
    "gemma3": "o,gate,down",
    "qwen3_moe": "q,k,v,o",  # LoRA on a MoE model's experts is refused (test_hf_moe.py)
}
RANK, ALPHA, FACTOR_STD = 4, 8.0, 0.1
# to_dict() fields an export may legitimately differ from its source in:
#   _name_or_path: the directory each was loaded from;
#   transformers_version: transformers stamps its own on save; jtp writes the source's back
#     (source=) or none (derived), while the source carries the version that built it.
CONFIG_EXCLUDED = ("_name_or_path", "transformers_version")


# Cases save_pretrained derives another architecture for when no source is given (the
# model alone names neither): Phi-3's fused tensors are written as Llama's separate ones, a
# windowed model as Mistral, one without a window as Llama. The same logits (checked), but
# another config class, so no field-by-field comparison with the source.
DERIVED_AS = {"phi3": "llama", "phi3_window": "mistral", "mistral_no_window": "llama"}


def run_worker(python, mode, spec, path):
    with open(path, "w") as f:
        json.dump(spec, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "JAX", "XLA"))}
    done = subprocess.run(
        [python, WORKER, mode, path], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"oracle worker {mode} failed:\n{done.stderr[-4000:]}"


def jtp_logits(model, mesh):
    plan = jtp.plans.llama(model.config)
    graphdef, state = nnx.split(model)
    with jtp.activation_rules(mesh, plan.activations):
        out = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jtp.shard_batch(TOKENS, mesh))
    return np.asarray(out, np.float32)


def jtp_logits_in_pieces(source):
    """jtp's logits of ``source`` loaded onto :data:`CONTEXT_MESH`, the tokens in the
    balanced order of its context size with their positions, put back in order."""
    mesh = jtp.make_mesh(**CONTEXT_MESH, devices=jax.devices()[:8])
    return pieces_logits(jtp.hf.load_pretrained(source, mesh), mesh, TOKENS)[0]


def jtp_loss(model, mesh):
    """The training loss of a MoE model with its auxiliary term, as transformers computes
    ``loss`` with ``labels=tokens`` and ``output_router_logits=True``: the mean next-token
    cross-entropy (labels shifted left by one, the last position scoring nothing) plus
    ``router_aux_loss_coef`` times the load-balancing loss over every position's routing
    in every sparse layer (the layers' router logits concatenated). Returns ``(loss,
    load-balancing loss)``."""
    plan = jtp.plans.llama(model.config)
    graphdef, state = nnx.split(model)

    def loss(s, tokens):
        logits, stats = nnx.merge(graphdef, s)(tokens, router_stats=True)
        aux = load_balancing_loss(stats)
        ce = cross_entropy(logits[:, :-1], tokens[:, 1:])
        return ce + model.config.router_aux_loss_coef * aux, aux

    with jtp.activation_rules(mesh, plan.activations):
        total, aux = jax.jit(loss)(state, jtp.shard_batch(TOKENS, mesh))
    return float(total), float(aux)


def randomize_adapters(model, seed):
    """A and B drawn at random (a fresh B is zero: its export would test nothing), in each
    factor's own sharding."""
    key = jax.random.key(seed)
    for _, layer in adapted(model):  # graph order: the same values on every run
        for factor in (layer.lora.lora_a, layer.lora.lora_b):
            key, sub = jax.random.split(key)
            old = factor.get_value()
            new = FACTOR_STD * jax.random.normal(sub, old.shape, jnp.float32)
            factor.set_value(jax.device_put(new, old.sharding))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Every case built, loaded, exported and run: ``{"jtp": {id: logits}, "hf": {id:
    (logits or None, parsed config or None, error or None)}, "dirs": {id: path}}``."""
    python = os.environ.get("JTP_ORACLE_PYTHON")
    if not python:  # only when this directory is named on the command line
        pytest.fail("JTP_ORACLE_PYTHON is not set: run `make test-oracle`, which creates it")
    root = tmp_path_factory.mktemp("oracle")
    src = root / "src"
    cases = {
        name: {"cls": cls, "config": COMMON | kw, "seed": i}
        for i, (name, (cls, kw)) in enumerate(CASES.items())
    }
    run_worker(python, "build", {"out": str(src), "cases": cases}, root / "build.json")

    mesh = jtp.make_mesh(1, 2, devices=jax.devices()[:2])
    ours, dirs, jobs = {}, {}, []

    def job(id_, model, adapter=None, loss=False):
        dirs[id_] = model
        jobs.append({"id": id_, "model": model, "adapter": adapter, "loss": loss})

    for name in CASES:
        source = str(src / name)
        job(f"{name}.source", source, loss=name in MOE)
        scan = {"scan_layers": name not in UNROLLED}
        model = jtp.hf.load_pretrained(source, mesh, **scan)
        ours[name] = jtp_logits(model, mesh)
        if name in MOE:
            ours[f"{name}.loss"] = jtp_loss(model, mesh)
        if name in CONTEXT:
            ours[f"{name}.context"] = jtp_logits_in_pieces(source)
        jtp.hf.save_pretrained(model, str(root / name / "export"), source=source)
        job(f"{name}.export", str(root / name / "export"))
        jtp.hf.save_pretrained(model, str(root / name / "derived"))
        job(f"{name}.derived", str(root / name / "derived"))
        if name in LORA:
            lora = jtp.hf.load_pretrained(
                source, mesh, lora_rank=RANK, lora_alpha=ALPHA, lora_targets=LORA[name], **scan
            )
            randomize_adapters(lora, seed=len(ours))
            ours[f"{name}.lora"] = jtp_logits(lora, mesh)
            jtp.hf.save_peft(lora, str(root / name / "adapter"), base_model_name_or_path=source)
            job(f"{name}.peft", source, adapter=str(root / name / "adapter"))
            jtp.hf.save_pretrained(lora, str(root / name / "merged"), source=source)
            job(f"{name}.merged", str(root / name / "merged"))

    np.save(root / "tokens.npy", TOKENS)
    out = root / "hf"
    out.mkdir()
    spec = {"tokens": str(root / "tokens.npy"), "out": str(out), "jobs": jobs}
    run_worker(python, "run", spec, root / "run.json")
    with open(out / "results.json") as f:
        results = json.load(f)
    hf, losses = {}, {}
    for j in jobs:
        loss = out / (j["id"] + ".loss.json")
        if loss.exists():
            losses[j["id"]] = json.loads(loss.read_text())
        logits = out / (j["id"] + ".npy")
        config = out / (j["id"] + ".json")
        hf[j["id"]] = (
            np.load(logits) if logits.exists() else None,
            json.loads(config.read_text()) if config.exists() else None,
            results[j["id"]]["error"],
        )
    return {
        "jtp": ours,
        "hf": hf,
        "losses": losses,
        "dirs": dirs,
        "versions": results["_versions"],
    }


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def hf_logits(oracle, id_):
    logits, _, error = oracle["hf"][id_]
    assert error is None, f"transformers on {oracle['dirs'][id_]}: {error}"
    return logits


def config_diff(ours, theirs):
    keys = (set(ours) | set(theirs)) - set(CONFIG_EXCLUDED)
    return {k: (ours.get(k), theirs.get(k)) for k in sorted(keys) if ours.get(k) != theirs.get(k)}


@pytest.mark.parametrize("name", list(CASES))
def test_jtp_computes_the_source(oracle, name):
    """The premise: jtp's model of each source gives transformers' logits on the source."""
    assert rel(oracle["jtp"][name], hf_logits(oracle, f"{name}.source")) <= RTOL


@pytest.mark.parametrize("name", CONTEXT)
def test_context_pieces_compute_the_source(oracle, name):
    """The source's logits with the sequence split over "context" in balanced pieces
    (:data:`CONTEXT_MESH`): transformers' on the source, as on one device. A window,
    soft-cap or RoPE base applied by index rather than position would be O(1e-1)."""
    assert rel(oracle["jtp"][f"{name}.context"], hf_logits(oracle, f"{name}.source")) <= RTOL


@pytest.mark.parametrize("kind", ["export", "derived"])
@pytest.mark.parametrize("name", list(CASES))
def test_transformers_runs_the_export(oracle, name, kind):
    """transformers loads every export (with the source's config.json, and derived from the
    model alone) and computes jtp's logits."""
    assert rel(hf_logits(oracle, f"{name}.{kind}"), oracle["jtp"][name]) <= RTOL


@pytest.mark.parametrize("kind", ["export", "derived"])
@pytest.mark.parametrize("name", list(CASES))
def test_parsed_config_equals_the_sources(oracle, name, kind):
    """transformers' parsed config of an export is its parsed config of the source, field by
    field (:data:`CONFIG_EXCLUDED` aside). A derived export (no source given) is held to
    the same where its architecture is the source's (else :data:`DERIVED_AS`)."""
    if kind == "derived" and name in DERIVED_AS:
        _, config, error = oracle["hf"][f"{name}.{kind}"]
        assert error is None and config["model_type"] == DERIVED_AS[name]
        return
    _, source, _ = oracle["hf"][f"{name}.source"]
    _, export, error = oracle["hf"][f"{name}.{kind}"]
    assert export is not None, error
    assert config_diff(export, source) == {}


@pytest.mark.parametrize("name", list(LORA))
def test_peft_loads_the_adapter(oracle, name):
    """PEFT puts jtp's adapter onto the source and computes jtp's LoRA logits; the adapters
    move the logits by at least 5% of the largest, so the comparison means something."""
    want = oracle["jtp"][f"{name}.lora"]
    assert rel(oracle["jtp"][name], want) >= 0.05
    assert rel(hf_logits(oracle, f"{name}.peft"), want) <= RTOL


@pytest.mark.parametrize("name", list(LORA))
def test_transformers_runs_the_merged_lora_export(oracle, name):
    want = oracle["jtp"][f"{name}.lora"]
    assert rel(hf_logits(oracle, f"{name}.merged"), want) <= RTOL


def test_qwen2_without_a_window_exports_no_sliding_layer(oracle):
    """The defect a user found: transformers' default Qwen2 (use_sliding_window=False)
    saved without a source came out with every layer "sliding_attention" and no
    use_sliding_window; transformers 5 then built a sliding cache with a null window and
    failed on the first forward. Now the export runs and says what the source said."""
    _, config, error = oracle["hf"]["qwen2.derived"]
    assert error is None
    assert config["layer_types"] == ["full_attention"] * 2
    assert config["use_sliding_window"] is False and config["sliding_window"] is None
    with open(os.path.join(oracle["dirs"]["qwen2.derived"], "config.json")) as f:
        written = json.load(f)
    assert written["use_sliding_window"] is False
    assert set(written["layer_types"]) == {"full_attention"}


@pytest.mark.parametrize("name", MOE)
def test_training_loss_with_the_router_term(oracle, name):
    """jtp's training loss of a MoE model, cross-entropy + router_aux_loss_coef x
    load_balancing_loss(stats) (:func:`jtp_loss`), is transformers' ``loss`` with
    ``output_router_logits=True``, and its load-balancing term transformers' ``aux_loss``.
    Both float32 means over 32 tokens (30 scored); relative 1e-5 as the logits. The term
    is >= 1 (E * sum f_e P_e, 1 at perfect balance), checked alone, and its coefficient
    (0.001 to 0.05) moves the loss by >= 2e-4 relative: a missed term is 20x the bound."""
    total, aux = oracle["jtp"][f"{name}.loss"]
    theirs = oracle["losses"].get(f"{name}.source")
    assert theirs is not None, oracle["hf"][f"{name}.source"][2]
    assert abs(aux - theirs["aux_loss"]) <= RTOL * abs(theirs["aux_loss"]), (aux, theirs)
    assert abs(total - theirs["loss"]) <= RTOL * abs(theirs["loss"]), (total, theirs)


def test_every_supported_architecture_is_a_case():
    covered = {CASES[n][0].removesuffix("Config").removesuffix("Text") for n in CASES}
    assert covered == {a.removesuffix("ForCausalLM") for a in ARCHITECTURES}
