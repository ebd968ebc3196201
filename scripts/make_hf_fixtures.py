"""Write the tiny Hugging Face checkpoints and transformers' logits under tests/fixtures/hf/.

Run it with torch and transformers (never needed by the test suite, and not installable
next to jax here: jax needs Python >= 3.12, the local torch wheel is for 3.11):

    python3.11 -m venv /tmp/hf && /tmp/hf/bin/pip install torch==2.13.0 transformers
    /tmp/hf/bin/python scripts/make_hf_fixtures.py            # rewrites tests/fixtures/hf/
    /tmp/hf/bin/python scripts/make_hf_fixtures.py --check DIR --reference NPZ
    /tmp/hf/bin/python scripts/make_hf_fixtures.py --eval-only  # tests/fixtures/eval/ only
    /tmp/hf/bin/python scripts/make_hf_fixtures.py --only phi3  # that fixture alone

Each fixture is one architecture with random weights made to matter: norm scales around 1
(not exactly 1; Gemma's, which scale by 1 + w, around 0), biases of size 0.5, projections
scaled so attention is peaked and the logits spread. Each Gemma feature is made to bite:
the script checks that transformers' logits move clearly (:data:`MATTERS`) when it is
switched off (a sliding window of 8 in 16 tokens, soft-caps below the scores and logits
seen, two RoPE bases, a query_pre_attn_scalar other than head_dim), and that Gemma 3's
hub spelling of the config gives transformers the same logits. Weights are rounded to the
file's dtype (bf16: what the hub ships) *before* the reference runs, and transformers
computes the reference in float32 from the saved directory itself (so it reads the very
config.json and tensors jtp will). Every fixture has heads divisible by 8 and a vocabulary
of 128, so the (1,8), (2,4) and (4,2) meshes apply; 4 sequences of 16 tokens, so data=4 and
sequence parallelism over 2 apply.

``--check DIR --reference NPZ`` loads DIR (e.g. what ``python -m jtp.train --hf ...
--export-hf DIR`` wrote) with ``AutoModelForCausalLM`` and compares its float32 logits on
NPZ's tokens with NPZ's logits (``scripts/hf_logits.py`` writes jtp's): the round trip
transformers -> jtp -> transformers, described in docs/hf.md.

For ``python -m jtp.eval`` it also writes, beside them, ``tests/fixtures/eval/<name>/``
for :data:`EVAL_FIXTURES`: a prepared token directory in ``python -m jtp.prepare``'s
layout (``train.bin``, ``val.bin`` as uint8 ids, ``meta.json``) and ``reference.json``,
transformers' mean next-token loss over exactly the windows jtp.eval scores (window ``i``
of length T is ``tokens[i*T : (i+1)*T + 1]``, every full window once, the tail that fills
no window unscored), in float32 with the sum over tokens taken in float64. ``--eval-only``
writes just those, reading the committed checkpoints (their weights and reference.npz
stay as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf")
TOKENS = np.random.default_rng(0).integers(0, 128, (4, 16)).astype(np.int32)
COMMON = dict(
    vocab_size=128,
    num_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=8,
    intermediate_size=64,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

FIXTURES = {
    # Llama 3.1-style: llama3 RoPE scaling with all three frequency bands hit (wavelengths
    # 6.3 kept, 63 blended, 628 and 6283 divided), an explicit head_dim, and the hub's
    # spelling of the RoPE fields (rope_theta / rope_scaling at top level).
    "llama3": dict(
        cls="LlamaConfig",
        dtype="bfloat16",
        hub_spelling=True,
        hidden_size=32,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=8.0,
            original_max_position_embeddings=256,
        ),
    ),
    # Llama 3.2-style: tied embeddings, llama3 scaling, transformers 5's rope_parameters.
    "llama_tied": dict(
        cls="LlamaConfig",
        dtype="bfloat16",
        hidden_size=64,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
    ),
    # Mistral v0.1-style: a 32-token sliding window (longer than the 16 tokens used), in
    # several safetensors files with an index.
    "mistral": dict(
        cls="MistralConfig",
        dtype="bfloat16",
        hidden_size=64,
        sliding_window=32,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
        max_shard_size="40KB",
    ),
    # Qwen2: q/k/v biases, tied embeddings (as Qwen2-0.5B).
    "qwen2": dict(
        cls="Qwen2Config",
        dtype="bfloat16",
        hidden_size=64,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
    # Qwen3: q/k RMSNorm, head_dim 8 while hidden / heads is 2.
    "qwen3": dict(
        cls="Qwen3Config",
        dtype="bfloat16",
        hidden_size=32,
        head_dim=8,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
    # Phi-3 (mini-4k style): fused qkv_proj and gate_up_proj, rms_norm_eps 1e-5, no head_dim
    # field, a 32-token sliding window on every layer (longer than the 16 tokens used).
    # pad_token_id: Phi3Config's default (32000) is outside this vocabulary.
    "phi3": dict(
        cls="Phi3Config",
        dtype="bfloat16",
        hidden_size=64,
        sliding_window=32,
        pad_token_id=None,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    # Fewer kv heads (2) than the tensor axis is wide (8, 4): kv heads replicated.
    "llama_kv2": dict(
        cls="LlamaConfig",
        dtype="bfloat16",
        hidden_size=64,
        num_key_value_heads=2,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0),
    ),
    # Gemma 2: GeGLU, (1 + w) norms, four per block, sqrt(D) embedding scale, tied; layers
    # sliding (window 8 < 16 tokens) and global alternating; scores and logits soft-capped
    # where they are; query_pre_attn_scalar 4 (not head_dim 8). The hub's spelling.
    "gemma2": dict(
        cls="Gemma2Config",
        dtype="bfloat16",
        hub_spelling=True,
        hidden_size=32,
        head_dim=8,
        sliding_window=8,
        query_pre_attn_scalar=4,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=8.0,
        rope_parameters=dict(rope_type="default", rope_theta=1e4),
    ),
    # Gemma 3 (text): Gemma 2's block with (1 + w) q/k norms, no soft-caps; layers sliding,
    # global, sliding (window 8), each kind with its RoPE: base 10 on sliding layers, 1e4 and
    # linear scaling by 4 on the global one; query_pre_attn_scalar 2. transformers 5's
    # spelling (nested rope_parameters, layer_types); the hub's is checked to give the same
    # logits.
    "gemma3": dict(
        cls="Gemma3TextConfig",
        dtype="bfloat16",
        hidden_size=64,
        head_dim=8,
        num_hidden_layers=3,
        sliding_window=8,
        query_pre_attn_scalar=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": dict(rope_type="default", rope_theta=10.0),
            "full_attention": dict(rope_type="linear", rope_theta=1e4, factor=4.0),
        },
    ),
    # Mixtral: Mistral's attention, 8 experts of width 32 (intermediate_size), top 2, the
    # hub's per-expert block_sparse_moe tensors (transformers 5 writes them so).
    "mixtral": dict(
        cls="MixtralConfig",
        dtype="bfloat16",
        hidden_size=64,
        intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
    # Qwen3-MoE: per-head q/k norms, head_dim 8 at hidden 32, 8 experts of width 16, top 2,
    # renormalised (norm_topk_prob, as Qwen3-30B-A3B).
    "qwen3_moe": dict(
        cls="Qwen3MoeConfig",
        dtype="bfloat16",
        hidden_size=32,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
    # Qwen2-MoE: q/k/v biases, a sigmoid-gated shared expert (width 32), 8 experts of
    # width 16, top 2 not renormalised; 3 layers, the middle one dense (mlp_only_layers).
    "qwen2_moe": dict(
        cls="Qwen2MoeConfig",
        dtype="bfloat16",
        hidden_size=64,
        num_hidden_layers=3,
        mlp_only_layers=[1],
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
    # OLMoE: q/k RMSNorm over the whole projection (64 and 32 features), 8 experts of
    # width 32, top 2, not renormalised. pad_token_id: OlmoeConfig's 1 is bos here.
    "olmoe": dict(
        cls="OlmoeConfig",
        dtype="bfloat16",
        hidden_size=64,
        intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        pad_token_id=None,
        rope_parameters=dict(rope_type="default", rope_theta=1e4),
    ),
    # Mistral with a window of 5, shorter than the 16 tokens (the "mistral" fixture's 32
    # masks nothing): what context parallelism's pieces are checked against (a window that
    # reaches into other devices' pieces; 5 is no multiple of a balanced chunk of 2, 4 or 8).
    "mistral_window": dict(
        cls="MistralConfig",
        dtype="bfloat16",
        hidden_size=64,
        sliding_window=5,
        rope_parameters=dict(rope_type="default", rope_theta=1e4),
    ),
}
MOE_FIXTURES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe")
# Config changes that switch one feature off, each of which must move transformers' logits
# by at least MIN_EFFECT of the largest (the tests check jtp's logits move with them).
MATTERS = {
    "gemma2": {
        "sliding window": dict(sliding_window=4096),
        "attention soft-cap": dict(attn_logit_softcapping=None),
        "final soft-cap": dict(final_logit_softcapping=None),
        "query_pre_attn_scalar": dict(query_pre_attn_scalar=8),
    },
    "gemma3": {
        "sliding window": dict(sliding_window=4096),
        "local RoPE base": dict(
            rope_parameters={
                "sliding_attention": dict(rope_type="linear", rope_theta=1e4, factor=4.0),
                "full_attention": dict(rope_type="linear", rope_theta=1e4, factor=4.0),
            }
        ),
        "linear RoPE scaling": dict(
            rope_parameters={
                "sliding_attention": dict(rope_type="default", rope_theta=10.0),
                "full_attention": dict(rope_type="default", rope_theta=1e4),
            }
        ),
        "query_pre_attn_scalar": dict(query_pre_attn_scalar=8),
    },
    "mistral_window": {"sliding window": dict(sliding_window=4096)},
}
MIN_EFFECT = 0.05


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights whose mistakes show in the logits: no norm is 1, no bias 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):  # Gemma's norms scale by 1 + w
                p.copy_(0.3 * noise + (0.0 if _gemma(model.config) else 1.0))
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise * (0.5 if model.config.tie_word_embeddings else 1.0))
            else:  # (out, in): unit-variance outputs, a little more for peaked attention
                p.copy_(noise * 1.5 / p.shape[1] ** 0.5)


def _gemma(config: transformers.PretrainedConfig) -> bool:
    return config.model_type.startswith("gemma")


def to_hub_spelling(config_path: str) -> None:
    """Rewrite transformers 5's rope_parameters as the hub's files spell it (and Gemma 2's
    layer types as its default)."""
    with open(config_path) as f:
        c = json.load(f)
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    c["torch_dtype"] = c.pop("dtype")
    if c["model_type"] == "gemma2":  # as google/gemma-2-*: no layer_types, both activations
        c.pop("layer_types")  # the default alternates from a sliding layer 0, as here
        c["hidden_act"] = c["hidden_activation"]
    with open(config_path, "w") as f:
        json.dump(c, f, indent=2)


def reference_logits(path: str, tokens: np.ndarray = TOKENS, **overrides) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **overrides
    )
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


EVAL_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "eval")
EVAL_FIXTURES = ("llama3", "qwen2")  # RoPE scaling + hub spelling; biases + tied embeddings
# Token counts leave a tail that fills no window and, at batch 4, a last batch of one
# window: val holds 5 windows of 16 (+7 tokens), 10 of 8; train 3 of 16 (+4).
EVAL_TOKENS = {"train": 3 * 16 + 1 + 4, "val": 5 * 16 + 1 + 7}
EVAL_CASES = (("val", 16), ("val", 8), ("train", 16))  # (split, seq_len) with a reference


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Every full window of ``seq_len + 1`` ids, overlapping by one (jtp.TokenDataset's)."""
    n = (tokens.size - 1) // seq_len
    return np.stack([tokens[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)])


def window_losses(path: str, windows_wt: np.ndarray) -> np.ndarray:
    """Each window's summed next-token loss (float64 sums of float32 per-token losses), and
    a check that transformers' own ``labels=`` loss agrees with the explicit one."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    ids = torch.from_numpy(windows_wt.astype(np.int64))  # (W, T + 1)
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits.float()  # (W, T, V)
        logp = torch.log_softmax(logits, dim=-1)
        token_losses = -logp.gather(-1, ids[:, 1:, None])[..., 0]  # (W, T)
        for w in range(ids.shape[0]):  # HF shifts labels itself: window w's mean loss
            own = model(ids[w : w + 1], labels=ids[w : w + 1]).loss.item()
            assert abs(own - token_losses[w].mean().item()) < 1e-5, (w, own)
    return token_losses.double().sum(dim=1).numpy()


def make_eval(name: str, seed: int) -> None:
    """``tests/fixtures/eval/<name>``: token files and transformers' losses on them."""
    rng = np.random.default_rng(1000 + seed)
    path = os.path.join(EVAL_OUT, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    split_tokens = {s: rng.integers(0, 128, n).astype(np.uint8) for s, n in EVAL_TOKENS.items()}
    for split, ids in split_tokens.items():
        ids.tofile(os.path.join(path, f"{split}.bin"))
    meta = {
        "format": "jtp-tokens/1",
        "vocab_size": 128,
        "dtype": "uint8",
        "tokenizer": "random ids (scripts/make_hf_fixtures.py)",
        "val_fraction": 0.5,
        "train_tokens": EVAL_TOKENS["train"],
        "val_tokens": EVAL_TOKENS["val"],
        "max_token_id": int(max(ids.max() for ids in split_tokens.values())),
        "documents": 1,
    }
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    cases = []
    for split, seq_len in EVAL_CASES:
        wins = windows(split_tokens[split], seq_len)
        sums = window_losses(os.path.join(OUT, name), wins)
        tokens = wins.shape[0] * seq_len
        loss = float(sums.sum() / tokens)
        cases.append(
            {
                "split": split,
                "seq_len": seq_len,
                "windows": wins.shape[0],
                "tokens": tokens,
                "loss": loss,
                "perplexity": float(np.exp(loss)),
                "window_losses": [float(s / seq_len) for s in sums],
            }
        )
    reference = {
        "checkpoint": f"tests/fixtures/hf/{name}",
        "how": "transformers AutoModelForCausalLM, float32, eager attention; mean over tokens",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cases": cases,
    }
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
    losses = ", ".join(f"{c['split']}@{c['seq_len']} {c['loss']:.4f}" for c in cases)
    print(f"eval/{name}: {losses}")


def make(name: str, spec: dict, seed: int) -> None:
    spec = dict(spec)
    cls = getattr(transformers, spec.pop("cls"))
    dtype, hub = spec.pop("dtype"), spec.pop("hub_spelling", False)
    shard = spec.pop("max_shard_size", "5GB")
    config = cls(**(COMMON | spec))  # a spec may override COMMON (kv heads)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    path = os.path.join(OUT, name)
    shutil.rmtree(path, ignore_errors=True)
    model.to(getattr(torch, dtype)).save_pretrained(path, max_shard_size=shard)
    if hub:
        to_hub_spelling(os.path.join(path, "config.json"))
    logits = reference_logits(path)  # from the saved files: bf16 weights, fp32 compute
    np.savez(os.path.join(path, "reference.npz"), tokens=TOKENS, logits=logits)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{name}: {size / 1024:.0f} KB, |logits| max {np.abs(logits).max():.2f}")
    for feature, off in MATTERS.get(name, {}).items():
        moved = np.abs(reference_logits(path, **off) - logits).max() / np.abs(logits).max()
        print(f"  without the {feature}: logits move by {moved:.3f} of the largest")
        assert moved >= MIN_EFFECT, (name, feature, moved)
    if name == "gemma3":
        check_gemma3_hub_spelling(path, logits)
    if name in MOE_FIXTURES:
        check_routing(path, logits)


def check_routing(path: str, logits: np.ndarray) -> None:
    """The routing matters and is not fragile: in every sparse layer most experts are
    chosen and tokens choose different sets; the k-th and (k+1)-th router probabilities of
    every token are apart (no near-tie that float32 rounding could flip between libraries);
    and shifting each router's rows by one expert (every token to other experts) moves the
    logits by at least MIN_EFFECT of the largest."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    tokens = torch.from_numpy(TOKENS).long()
    with torch.no_grad():
        out = model(tokens, output_router_logits=True)
    k = model.config.num_experts_per_tok
    for layer, router_logits in enumerate(out.router_logits):
        probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
        top = torch.topk(probs, k + 1, dim=-1)
        experts = top.indices[:, :k]
        chosen = len(set(experts.flatten().tolist()))
        sets = len({tuple(sorted(r)) for r in experts.tolist()})
        gap = float((top.values[:, k - 1] - top.values[:, k]).min())
        print(f"  router {layer}: {chosen} experts chosen, {sets} distinct sets, min gap {gap:.1e}")
        assert chosen >= probs.shape[-1] - 1 and sets >= 10, (path, layer, chosen, sets)
        assert gap > 1e-5, (path, layer, gap)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.copy_(torch.roll(p, 1, dims=0))
        moved = model(tokens).logits.float().numpy()
    effect = np.abs(moved - logits).max() / np.abs(logits).max()
    print(f"  routing shifted by one expert: logits move by {effect:.3f} of the largest")
    assert effect >= MIN_EFFECT, (path, effect)


def check_gemma3_hub_spelling(path: str, logits: np.ndarray) -> None:
    """The hub's Gemma 3 config.json (rope_theta + rope_scaling for the global layers,
    rope_local_base_freq for the sliding ones, sliding_window_pattern instead of
    layer_types) gives transformers the same model: the same logits, exactly."""
    tmp = path + ".hub"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp)
    try:
        with open(os.path.join(tmp, "config.json")) as f:
            c = json.load(f)
        rope = c.pop("rope_parameters")
        full, local = rope["full_attention"], rope["sliding_attention"]
        c.pop("layer_types")
        c.update(
            rope_theta=full.pop("rope_theta"),
            rope_scaling=full,
            rope_local_base_freq=local["rope_theta"],
            sliding_window_pattern=2,
            torch_dtype=c.pop("dtype"),
        )
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
        assert np.array_equal(reference_logits(tmp), logits)
        print("  the hub's spelling of its config.json: the same logits")
    finally:
        shutil.rmtree(tmp)


def check(path: str, reference: str) -> float:
    """max |transformers - reference| / max |reference| on the reference's tokens."""
    ref = np.load(reference)
    want = ref["logits"]
    logits = reference_logits(path, ref["tokens"])
    err = float(np.abs(logits - want).max() / np.abs(want).max())
    print(f"{path}: transformers vs {reference}: max |diff| / max |logit| = {err:.2e}")
    return err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", default=None, help="compare this directory's logits instead")
    p.add_argument("--reference", default=None, help="with --check: tokens and logits (.npz)")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="write only tests/fixtures/eval/ (from the committed checkpoints)",
    )
    p.add_argument("--only", default=None, help="comma-separated fixture names to (re)write")
    args = p.parse_args()
    only = set(args.only.split(",")) if args.only else set(FIXTURES)
    if args.check:
        check(args.check, args.reference or os.path.join(args.check, "reference.npz"))
        return
    torch.use_deterministic_algorithms(True)
    for seed, (name, spec) in enumerate(FIXTURES.items()):  # seeds fixed by position: append
        if name not in only:
            continue
        if not args.eval_only:
            make(name, spec, seed)
        if name in EVAL_FIXTURES:
            make_eval(name, seed)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
