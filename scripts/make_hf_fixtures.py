"""Write the tiny Hugging Face checkpoints and transformers' logits under tests/fixtures/hf/.

Run it with torch and transformers (never needed by the test suite, and not installable
next to jax here: jax needs Python >= 3.12, the local torch wheel is for 3.11):

    python3.11 -m venv /tmp/hf && /tmp/hf/bin/pip install torch==2.13.0 transformers
    /tmp/hf/bin/python scripts/make_hf_fixtures.py            # rewrites tests/fixtures/hf/
    /tmp/hf/bin/python scripts/make_hf_fixtures.py --check DIR --reference NPZ

Each fixture is one architecture with random weights made to matter: norm scales around 1
(not exactly 1), biases of size 0.5, projections scaled so attention is peaked and the
logits spread. Weights are rounded to the file's dtype (bf16: what the hub ships)
*before* the reference runs, and transformers computes the reference in float32 from the
saved directory itself (so it reads the very config.json and tensors jtp will). Every
fixture has heads divisible by 8 and a vocabulary of 128, so the (1,8), (2,4) and (4,2)
meshes apply; 4 sequences of 16 tokens, so data=4 and sequence parallelism over 2 apply.

``--check DIR --reference NPZ`` loads DIR (e.g. what ``python -m jtp.train --hf ...
--export-hf DIR`` wrote) with ``AutoModelForCausalLM`` and compares its float32 logits on
NPZ's tokens with NPZ's logits (``scripts/hf_logits.py`` writes jtp's): the round trip
transformers -> jtp -> transformers, described in docs/hf.md.
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
    vocab_size=128, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
    intermediate_size=64, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

FIXTURES = {
    # Llama 3.1-style: llama3 RoPE scaling with all three frequency bands hit (wavelengths
    # 6.3 kept, 63 blended, 628 and 6283 divided), an explicit head_dim, and the hub's
    # spelling of the RoPE fields (rope_theta / rope_scaling at top level).
    "llama3": dict(
        cls="LlamaConfig", dtype="bfloat16", hub_spelling=True,
        hidden_size=32, head_dim=8, rms_norm_eps=1e-5,
        rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=8.0, original_max_position_embeddings=256,
        ),
    ),
    # Llama 3.2-style: tied embeddings, llama3 scaling, transformers 5's rope_parameters.
    "llama_tied": dict(
        cls="LlamaConfig", dtype="bfloat16", hidden_size=64, tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=256,
        ),
    ),
    # Mistral v0.1-style: a 32-token sliding window (longer than the 16 tokens used), in
    # several safetensors files with an index.
    "mistral": dict(
        cls="MistralConfig", dtype="bfloat16", hidden_size=64, sliding_window=32,
        rope_parameters=dict(rope_type="default", rope_theta=1e6), max_shard_size="40KB",
    ),
    # Qwen2: q/k/v biases, tied embeddings (as Qwen2-0.5B).
    "qwen2": dict(
        cls="Qwen2Config", dtype="bfloat16", hidden_size=64, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
    # Qwen3: q/k RMSNorm, head_dim 8 while hidden / heads is 2.
    "qwen3": dict(
        cls="Qwen3Config", dtype="bfloat16", hidden_size=32, head_dim=8,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
}  # fmt: skip


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights whose mistakes show in the logits: no norm is 1, no bias 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise * (0.5 if model.config.tie_word_embeddings else 1.0))
            else:  # (out, in): unit-variance outputs, a little more for peaked attention
                p.copy_(noise * 1.5 / p.shape[1] ** 0.5)


def to_hub_spelling(config_path: str) -> None:
    """Rewrite transformers 5's rope_parameters as the hub's files spell it."""
    with open(config_path) as f:
        c = json.load(f)
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    c["torch_dtype"] = c.pop("dtype")
    with open(config_path, "w") as f:
        json.dump(c, f, indent=2)


def reference_logits(path: str, tokens: np.ndarray = TOKENS) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def make(name: str, spec: dict, seed: int) -> None:
    spec = dict(spec)
    cls = getattr(transformers, spec.pop("cls"))
    dtype, hub = spec.pop("dtype"), spec.pop("hub_spelling", False)
    shard = spec.pop("max_shard_size", "5GB")
    config = cls(**COMMON, **spec)
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
    args = p.parse_args()
    if args.check:
        check(args.check, args.reference or os.path.join(args.check, "reference.npz"))
        return
    torch.use_deterministic_algorithms(True)
    for seed, (name, spec) in enumerate(FIXTURES.items()):
        make(name, spec, seed)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
