"""Host memory while ``jtp.hf.load_pretrained`` loads a few-hundred-MB checkpoint.

    .venv/bin/python scripts/hf_load_memory.py            # writes /tmp/jtp_hf_mem, measures
    .venv/bin/python scripts/hf_load_memory.py --mesh 2x4 --fsdp

Writes a random float32 Llama checkpoint (vocab 8192, width 1024, 6 blocks, 444 MB in two
safetensors files; the largest tensors, the embedding and lm_head, are 33.5 MB each), then
loads it in a fresh process on 8 forced CPU devices and reads the process's peak resident
set (``VmHWM``, reset just before loading). On CPU the devices' buffers are host memory
too, so the figure that says whether the loader ever holds the whole model is

    transient = peak - baseline - (bytes the devices hold at the end)

which the script reports in units of the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def write(path: str) -> None:
    """The checkpoint, streamed one tensor at a time (this process never holds it whole)."""
    from jtp.models.hf.config import llama_config
    from jtp.models.hf.files import INDEX, write_safetensors
    from jtp.models.hf.names import tensor_map

    config = llama_config(CONFIG)
    d, e, f, v = config.dim, config.head_dim, config.ffn_hidden, config.vocab_size
    shapes = {
        "embed_tokens": (v, d),
        "q_proj": (16 * e, d),
        "k_proj": (8 * e, d),
        "v_proj": (8 * e, d),
        "o_proj": (d, 16 * e),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
        "lm_head": (v, d),
    }
    entries = []
    for t in tensor_map(config):
        key = t.hf.split(".")[-2]
        entries.append((t.hf, np.dtype(np.float32), shapes.get(key, (d,))))
    rng = np.random.default_rng(0)
    os.makedirs(path, exist_ok=True)
    half = len(entries) // 2
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shape_of = {n: s for n, _, s in entries}

    def random(name: str) -> np.ndarray:
        return rng.standard_normal(shape_of[name], np.float32) * np.float32(0.02)

    for file, part in zip(files, (entries[:half], entries[half:]), strict=True):
        write_safetensors(os.path.join(path, file), part, random)
    weight_map = {n: files[0] for n, _, _ in entries[:half]}
    weight_map |= {n: files[1] for n, _, _ in entries[half:]}
    with open(os.path.join(path, INDEX), "w") as f_:
        json.dump({"metadata": {}, "weight_map": weight_map}, f_)
    with open(os.path.join(path, "config.json"), "w") as f_:
        json.dump(CONFIG, f_)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(path: str, mesh_shape: tuple[int, int], fsdp: bool) -> dict:
    """Run in a fresh process (so the baseline holds nothing of the checkpoint)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax

    import jtp
    from jtp.models.hf.files import CheckpointFiles

    mesh = jtp.make_mesh(*mesh_shape, devices=jax.devices()[: mesh_shape[0] * mesh_shape[1]])
    jax.device_put(np.zeros(8), jax.devices()[0]).block_until_ready()  # start the runtime
    files = CheckpointFiles(path)
    largest = max(int(np.prod(s)) * 4 for s in files.shape.values())
    total = sum(int(np.prod(s)) * 4 for s in files.shape.values())
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    model = jtp.hf.load_pretrained(path, mesh, fsdp=fsdp)
    jax.block_until_ready(jax.tree.leaves(model))
    peak = _status("VmHWM")
    held = sum(
        s.data.nbytes for x in jax.tree.leaves(model) for s in x.addressable_shards
    )  # on every device, replicas included
    transient = peak - baseline - held
    return {
        "mesh": list(mesh_shape),
        "fsdp": fsdp,
        "checkpoint_bytes": total,
        "largest_tensor_bytes": largest,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "device_bytes_at_end": held,
        "peak_minus_baseline": peak - baseline,
        "transient_bytes": transient,
        "transient_in_largest_tensors": transient / largest,
        "peak_minus_baseline_in_checkpoints": (peak - baseline) / total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/jtp_hf_mem", help="where the checkpoint is written")
    p.add_argument("--mesh", default="1x8", help="data x tensor")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = tuple(int(n) for n in args.mesh.split("x"))
    if args.child:
        print(json.dumps(measure(args.dir, shape, args.fsdp)))
        return
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        write(args.dir)
    cmd = [sys.executable, __file__, "--child", "--dir", args.dir, "--mesh", args.mesh]
    out = subprocess.run(cmd + (["--fsdp"] if args.fsdp else []), capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mb = 1e6
    print(
        f"mesh {args.mesh}{' fsdp' if args.fsdp else ''}: checkpoint "
        f"{r['checkpoint_bytes'] / mb:.0f} MB, largest tensor {r['largest_tensor_bytes'] / mb:.1f}"
        f" MB; peak RSS - baseline {r['peak_minus_baseline'] / mb:.0f} MB, of which the devices "
        f"hold {r['device_bytes_at_end'] / mb:.0f} MB at the end; transient "
        f"{r['transient_bytes'] / mb:.1f} MB = {r['transient_in_largest_tensors']:.2f} x the "
        "largest tensor"
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
