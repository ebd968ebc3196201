"""jtp's logits for an HF checkpoint directory, to compare with transformers' on the same tokens.

The round trip "transformers -> jtp (fine-tune) -> transformers" needs both libraries, which
live in different Pythons here (jax >= 3.12, the local torch wheel 3.11), so it runs in two
steps (docs/hf.md):

    .venv/bin/python -m jtp.train --devices 8 --model llama --hf tests/fixtures/hf/qwen2 \\
        --tensor-parallel 4 --fsdp --seq-len 16 --max-steps 3 --export-hf /tmp/ft
    .venv/bin/python scripts/hf_logits.py /tmp/ft /tmp/ft_jtp.npz
    /tmp/hf/bin/python scripts/make_hf_fixtures.py --check /tmp/ft --reference /tmp/ft_jtp.npz

The tokens are the fixtures' (``tests/fixtures/hf/llama3/reference.npz``); the model runs
unsharded in float32 on one CPU device.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

TOKENS = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf", "llama3")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="an HF checkpoint directory")
    p.add_argument("out", help="write tokens and logits here (.npz)")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    import jtp
    from jtp.models.hf.config import llama_config, read_config

    tokens = np.load(os.path.join(TOKENS, "reference.npz"))["tokens"]
    mesh = jtp.make_mesh(1, 1, devices=jax.devices()[:1])
    # scanned unless the checkpoint mixes dense and sparse (MoE) layers, which llama_config
    # then builds unrolled
    scan = llama_config(read_config(args.path)).scan_layers
    model = jtp.hf.load_pretrained(args.path, mesh, max_seq_len=tokens.shape[1], scan_layers=scan)
    logits = np.asarray(jax.jit(lambda t: model(t))(tokens), np.float32)
    np.savez(args.out, tokens=tokens, logits=logits)
    print(f"{args.path}: logits {logits.shape}, max |logit| {np.abs(logits).max():.3f}")


if __name__ == "__main__":
    main()
