"""Check jtp's LoRA exports against PEFT and transformers; write tests/fixtures/lora/.

Run it with torch, transformers and peft (never test dependencies; see make_hf_fixtures.py):

    /tmp/hf/bin/pip install peft
    /tmp/hf/bin/python scripts/make_lora_fixtures.py [--jtp-python .venv/bin/python]

For each fixture checkpoint it first runs itself under jtp's Python (``--jtp`` mode, where
jax lives): the checkpoint is loaded with rank-4 adapters (alpha 8, all seven targets),
``A`` and ``B`` are set to fixed random values (a fresh ``B`` is zero: its export would
test nothing), and jtp writes the adapter (``jtp.hf.save_peft``, committed), the merged
model in float32 (``jtp.hf.save_pretrained``, to a scratch directory) and its own logits on
fixed tokens. Back here, PEFT loads the adapter onto the original checkpoint and
transformers loads the merged export; the three logits are compared, and PEFT's are written
as ``reference.npz`` beside the adapter, with the errors seen in ``record.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
HF = os.path.join(ROOT, "tests", "fixtures", "hf")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")
NAMES = ["llama3", "qwen3"]  # RoPE-scaled untied Llama; Qwen3: q/k norms, head_dim != D / H
TOKENS = [[1, 17, 99, 5, 64, 3, 120, 77, 45, 8, 90, 11], [1, 64, 2, 33, 7, 7, 100, 12, 5, 9, 81, 4]]
RANK, ALPHA, FACTOR_STD = 4, 8.0, 0.05  # delta ~ base weights (std 0.02): visible, not wild


def jtp_side(fixture: str, adapter: str, scratch: str) -> None:
    """Under jtp's Python: the adapter, the merged float32 export and jtp's logits."""
    import jax
    import jax.numpy as jnp

    import jtp
    from jtp.models.lora import adapted

    mesh = jtp.make_mesh(1, 1, devices=jax.devices()[:1])
    model = jtp.hf.load_pretrained(fixture, mesh, lora_rank=RANK, lora_alpha=ALPHA, max_seq_len=16)
    key = jax.random.key(0)
    for _, layer in adapted(model):  # graph order: the same values on every run
        for factor in (layer.lora.lora_a, layer.lora.lora_b):
            key, sub = jax.random.split(key)
            shape = factor.get_value().shape
            factor.set_value(FACTOR_STD * jax.random.normal(sub, shape, jnp.float32))
    jtp.hf.save_peft(model, adapter, base_model_name_or_path=os.path.basename(fixture))
    jtp.hf.save_pretrained(model, os.path.join(scratch, "merged"), source=fixture, dtype="float32")
    logits = model(jnp.asarray(TOKENS, jnp.int32))
    np.save(os.path.join(scratch, "jtp_logits.npy"), np.asarray(logits, np.float32))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the measure tests/models/test_hf.py bounds."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def torch_side(name: str, jtp_python: str) -> dict:
    import peft
    import torch
    import transformers

    fixture, adapter = os.path.join(HF, name), os.path.join(OUT, name)
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
        cmd = [jtp_python, os.path.abspath(__file__), "--jtp", fixture, adapter, scratch]
        subprocess.run(cmd, check=True, env=env)
        jtp_logits = np.load(os.path.join(scratch, "jtp_logits.npy"))
        ids = torch.tensor(TOKENS)

        def logits_of(model) -> np.ndarray:
            model.eval()
            with torch.no_grad():
                return model(ids).logits.float().numpy()

        load = transformers.AutoModelForCausalLM.from_pretrained
        base = logits_of(load(fixture, dtype=torch.float32))
        with_peft = logits_of(
            peft.PeftModel.from_pretrained(load(fixture, dtype=torch.float32), adapter)
        )
        merged = logits_of(load(os.path.join(scratch, "merged"), dtype=torch.float32))
    record = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "r": RANK,
        "lora_alpha": ALPHA,
        "adapter_vs_base": rel(with_peft, base),  # how much the adapter moves the logits
        "merged_vs_peft": rel(merged, with_peft),
        "jtp_vs_peft": rel(jtp_logits, with_peft),
    }
    np.savez(os.path.join(adapter, "reference.npz"), tokens=np.asarray(TOKENS), logits=with_peft)
    with open(os.path.join(adapter, "record.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--jtp", nargs=3, metavar=("FIXTURE", "ADAPTER", "SCRATCH"), help=argparse.SUPPRESS
    )
    p.add_argument("--jtp-python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    args = p.parse_args()
    if args.jtp:
        jtp_side(*args.jtp)
        return
    for name in NAMES:
        record = torch_side(name, args.jtp_python)
        print(name, json.dumps(record))
        if max(record["merged_vs_peft"], record["jtp_vs_peft"]) > 1e-4:
            sys.exit(f"{name}: jtp's export disagrees with PEFT: {record}")


if __name__ == "__main__":
    main()
