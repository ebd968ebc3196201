"""Lightning's examples/pytorch/tensor_parallel (Llama 3, FSDP x TP), ported to jtp.

    python examples/02_llama_2d.py                    # tiny, data 2 x tensor 2, 4 CPU devices
    python examples/02_llama_2d.py --sequence-parallel --loss-parallel --precision bf16-mixed

Lightning's example builds the model on the meta device, applies the TP plan with
parallelize_module, then fully_shard per block, and trains with ModelParallelStrategy(
data_parallel_size=2, tensor_parallel_size=2). Here the plan is jtp.plans.llama(), fsdp=True
adds the data-axis split, and parameters are created directly in their shards.
"""

import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("--sequence-parallel", action="store_true")
parser.add_argument("--loss-parallel", action="store_true")
parser.add_argument(
    "--precision",
    default="32-true",
    choices=["32-true", "bf16-mixed", "bf16-true", "transformer-engine", "fp8-mixed"],
)
parser.add_argument("--steps", type=int, default=8)
args = parser.parse_args()
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")  # before jax starts

import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jtp  # noqa: E402
from jtp.models.llama import PRESETS, Llama, cross_entropy  # noqa: E402

SEQ_LEN = 32


class LitLlama(jtp.TrainModule):
    def __init__(self):
        self.config = PRESETS["tiny"]
        self.plan = jtp.plans.llama(
            sequence_parallel=args.sequence_parallel, loss_parallel=args.loss_parallel, fsdp=True
        )

    def configure_model(self, mesh):
        jtp.plans.check_llama(
            self.config, mesh, seq_len=SEQ_LEN, sequence_parallel=args.sequence_parallel
        )
        factory = lambda: Llama(self.config, rngs=nnx.Rngs(0))  # noqa: E731
        return jtp.sharded_init(factory, mesh, self.plan, fsdp=True)  # 2D: FSDP x TP

    def activation_rules(self):
        return self.plan.activations  # sequence / loss parallel layouts

    def training_step(self, model, batch):
        inputs, labels = batch[:, :-1], batch[:, 1:]
        return cross_entropy(model(inputs), labels)

    def configure_optimizers(self):
        return optax.adamw(3e-3)

    def train_dataloader(self):
        dataset = jtp.RandomTokenDataset(self.config.vocab_size, SEQ_LEN, 64)
        return jtp.DataLoader(dataset, batch_size=8, mesh=self.mesh, shuffle=True)


strategy = jtp.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
trainer = jtp.Trainer(strategy, max_steps=args.steps, precision=args.precision, log_every_n_steps=2)
trainer.fit(LitLlama())
print(f"final loss {trainer.losses[-1]:.4f} after {trainer.global_step} steps")
