"""A tiny Llama that learns Python: the standard library's own *.py files, byte-level.

    python examples/04_llama_text.py                # 100 steps on 8 CPU devices (2 x 4)
    python examples/04_llama_text.py --steps 300    # the benchmark's run: val <= 2 nats/byte
    python examples/04_llama_text.py --files 'notes/*.txt' --steps 500

From a folder of text files to a trained, validated model in two steps: ``python -m
jtp.prepare`` writes the token files (train.bin, val.bin, meta.json), then a TrainModule
reads them with ``jtp.TokenDataset`` and ``fit`` validates every ``--val-every`` steps.
AdamW with linear warmup + cosine decay, its hyperparameters kept in the optimizer state
(``optax.inject_hyperparams``) so the trainer logs the learning rate each step. The same
run through the CLI: docs/data.md.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import sysconfig
import tempfile

parser = argparse.ArgumentParser()
stdlib_py = os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
parser.add_argument("--files", default=stdlib_py, help="glob of the text files to learn")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--val-every", type=int, default=50)
parser.add_argument("--seq-len", type=int, default=128)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")  # before jax starts

import dataclasses  # noqa: E402

import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jtp  # noqa: E402
from jtp.models.llama import PRESETS, Llama, cross_entropy  # noqa: E402

# 1. Text files -> DIR/train.bin, DIR/val.bin (the last 2% of every file), DIR/meta.json.
data = os.path.join(tempfile.mkdtemp(), "data")
files = sorted(glob.glob(args.files))
prepare = [sys.executable, "-m", "jtp.prepare", *files, "--out", data, "--bytes"]
subprocess.run([*prepare, "--val-fraction", "0.02", "--no-progress"], check=True)
meta = json.load(open(os.path.join(data, "meta.json")))


# 2. Train on them, validating as we go.
class LitText(jtp.TrainModule):
    def __init__(self):
        self.config = dataclasses.replace(
            PRESETS["tiny"], vocab_size=meta["vocab_size"], max_seq_len=args.seq_len
        )
        self.plan = jtp.plans.llama()

    def configure_model(self, mesh):
        factory = lambda: Llama(self.config, rngs=nnx.Rngs(0))  # noqa: E731
        return jtp.sharded_init(factory, mesh, self.plan)

    def activation_rules(self):
        return self.plan.activations

    def training_step(self, model, batch):
        inputs_bt, labels_bt = batch[:, :-1], batch[:, 1:]  # windows of seq_len + 1 bytes
        return cross_entropy(model(inputs_bt), labels_bt)  # nats per byte

    validation_step = training_step

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches  # max_steps here
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, 3e-3, warmup_steps=total // 10, decay_steps=total, end_value=3e-4
        )
        return optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=0.1)

    def _tokens(self, split):
        path = os.path.join(data, f"{split}.bin")
        return jtp.TokenDataset(path, args.seq_len, vocab_size=self.config.vocab_size)

    def train_dataloader(self):
        return jtp.DataLoader(self._tokens("train"), args.batch_size, mesh=self.mesh, shuffle=True)

    def val_dataloader(self):  # every validation window once, in order
        return jtp.DataLoader(self._tokens("val"), args.batch_size, mesh=self.mesh, drop_last=False)


strategy = jtp.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=4)
trainer = jtp.Trainer(
    strategy, max_steps=args.steps, val_check_interval=args.val_every, report_memory=False
)
trainer.fit(LitText())
val = ", ".join(f"step {v['step']}: {v['val_loss']:.3f}" for v in trainer.val_history)
print(f"{len(files)} files, {meta['train_tokens']:,} training bytes")
print(f"first loss {trainer.losses[0]:.3f}, final loss {trainer.losses[-1]:.3f} nats/byte")
print(f"validation (nats/byte): {val}")
