"""Lightning's tensor-parallel docs example, ported to jtp by renaming imports.

    python examples/01_feedforward_tp.py                 # dim 1024 on 8 forced CPU devices
    python examples/01_feedforward_tp.py --dim 8192      # the docs' full size

Lightning                                       jtp
--------------------------------------------    ------------------------------------------
class LitModel(L.LightningModule)               class LitModel(jtp.TrainModule)
configure_model: parallelize_module(...)        configure_model: jtp.sharded_init(...)
  with device_mesh["tensor"]                      with mesh (its "tensor" axis)
training_step(self, batch)                      training_step(self, model, batch) (pure)
torch.optim.AdamW(..., lr=3e-3)                 optax.adamw(3e-3)
DataLoader(RandomDataset(8192, 64), 8)          jtp.DataLoader(..., mesh=self.mesh)
L.Trainer(strategy=ModelParallelStrategy())     jtp.Trainer(jtp.ModelParallelStrategy())
"""

import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("--dim", type=int, default=1024, help="8192 for the docs' full size")
parser.add_argument("--devices", type=int, default=8, help="forced CPU devices")
args = parser.parse_args()
os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(args.devices))  # before jax starts

import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jtp  # noqa: E402
from jtp.models import FeedForward  # noqa: E402


class LitModel(jtp.TrainModule):
    def __init__(self, dim: int):
        self.dim = dim

    def configure_model(self, mesh):
        # The plan lives here, outside the model: w1/w3 split their outputs, w2 its inputs.
        plan = {
            "w1": jtp.ColwiseParallel(),
            "w2": jtp.RowwiseParallel(),
            "w3": jtp.ColwiseParallel(),
        }
        # Parameters are born sharded: no device ever holds a whole kernel.
        return jtp.sharded_init(
            lambda: FeedForward(self.dim, self.dim, rngs=nnx.Rngs(0)), mesh, plan
        )

    def training_step(self, model, batch):
        output = model(batch)
        return output.sum()

    def configure_optimizers(self):
        return optax.adamw(3e-3)

    def train_dataloader(self):
        # Every device of a tensor group gets the same rows: the order is a pure function of
        # (seed, epoch), never of the process.
        dataset = jtp.RandomDataset(self.dim, 64)
        return jtp.DataLoader(dataset, batch_size=8, mesh=self.mesh)


trainer = jtp.Trainer(strategy=jtp.ModelParallelStrategy(), max_epochs=1)
trainer.fit(LitModel(args.dim))
# The trainer prints "Peak memory usage: X GB" per device, as the Lightning example does.
