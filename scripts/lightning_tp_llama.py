"""Lightning's own tensor-parallel Llama example, cut to 46M parameters, on CPU processes.

The other side of ``python -m jtp.bench lightning`` (docs/performance.md): it imports the
example's ``model``, ``parallelism`` and ``data`` modules (Lightning-AI/pytorch-lightning,
``examples/pytorch/tensor_parallel``) from ``--example-dir`` and runs what its ``train.py``
runs: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)`` (tensor +
sequence + loss parallel, FSDP2, activation checkpointing on every block), AdamW lr 3e-3,
its ``RandomTokenDataset`` (128 rows of 128 + 1 tokens) in batches of 8 per data-parallel
rank. What it changes, and only that:

- ``accelerator="cpu"`` (4 processes, gloo) instead of 4 GPUs, no ``torch.cuda`` calls;
- the model's dims (``ModelArgs(dim=512, n_layers=4, n_heads=8, vocab_size=32000)``: 46.4M
  parameters; SwiGLU width 1536 by its ``multiple_of=256`` rule) instead of 7B;
- float32: its ``parallelism.py`` hardcodes ``MixedPrecisionPolicy(param_dtype=bfloat16)``
  for FSDP2; here that name is replaced by a float32 policy before ``parallelize`` runs
  (and ``torch.set_float32_matmul_precision`` is left at "highest"); the result lists the
  dtypes every ``nn.Linear`` produced (``linear_output_dtypes``);
- 16 optimizer steps (``max_epochs=2`` of 8 batches) instead of ``limit_train_batches=10``;
  no checkpoint at the epochs' ends (``enable_checkpointing=False``): jtp's side saves none.

Process 0 prints one line ``LIGHTNING_TP_RESULT {json}`` with the parameter count, the
losses (mean over the data-parallel ranks, one per step), ``step_times`` (seconds from the
start of training to the end of each step), ``cpu_seconds`` (user + system, all ranks and
their data workers) and the versions. Needs torch and lightning
(never jtp's environment)::

    python3.11 -m venv /work/venv-lightning
    /work/venv-lightning/bin/pip install torch==2.13.0 lightning
    /work/venv-lightning/bin/python scripts/lightning_tp_llama.py --example-dir DIR
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time

RESULT_PREFIX = "LIGHTNING_TP_RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--example-dir", required=True, help="the example's model/parallelism/data")
    p.add_argument("--devices", type=int, default=4, help="CPU processes")
    p.add_argument("--data-parallel", type=int, default=2, help="data_parallel_size")
    p.add_argument("--tensor-parallel", type=int, default=2, help="tensor_parallel_size")
    p.add_argument("--dim", type=int, default=512, help="ModelArgs.dim")
    p.add_argument("--n-layers", type=int, default=4, help="ModelArgs.n_layers")
    p.add_argument("--n-heads", type=int, default=8, help="ModelArgs.n_heads (example: 32)")
    p.add_argument("--vocab-size", type=int, default=32000, help="ModelArgs.vocab_size")
    p.add_argument("--seq-len", type=int, default=128, help="RandomTokenDataset seq_length")
    p.add_argument("--batch-size", type=int, default=8, help="rows per data-parallel rank")
    p.add_argument("--max-epochs", type=int, default=2, help="epochs of 128 rows")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers (example: 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW lr (example: 3e-3)")
    p.add_argument("--root-dir", default=None, help="Trainer default_root_dir (logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, args.example_dir)
    import lightning as L
    import parallelism  # the example's
    import torch
    import torch.nn.functional as F
    from data import RandomTokenDataset  # the example's
    from lightning.pytorch.strategies import ModelParallelStrategy
    from model import ModelArgs, Transformer  # the example's
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor.parallel import loss_parallel
    from torch.utils.data import DataLoader

    def fp32_policy(**_: object) -> MixedPrecisionPolicy:
        """What parallelism.py builds with bf16 parameters, in float32 throughout."""
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)

    parallelism.MixedPrecisionPolicy = fp32_policy

    class Llama3(L.LightningModule):
        """The example's ``train.Llama3`` with the dims, lr and batch from ``args``."""

        def __init__(self) -> None:
            super().__init__()
            self.model_args = ModelArgs(
                dim=args.dim,
                n_layers=args.n_layers,
                n_heads=args.n_heads,
                vocab_size=args.vocab_size,
            )
            self.model = Transformer(self.model_args)

        def configure_model(self) -> None:
            parallelism.parallelize(self.model, device_mesh=self.device_mesh)

        def on_train_start(self) -> None:
            self.model.init_weights()

        def training_step(self, batch: torch.Tensor) -> torch.Tensor:
            inputs, labels = batch[:, :-1], batch[:, 1:]
            output = self.model(inputs)
            with loss_parallel():
                return F.cross_entropy(output.reshape(-1, output.size(-1)), labels.reshape(-1))

        def backward(self, *a: object, **kw: object) -> None:
            with loss_parallel():
                super().backward(*a, **kw)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.model.parameters(), lr=args.lr, foreach=True)

        def train_dataloader(self) -> DataLoader:
            dataset = RandomTokenDataset(
                vocab_size=self.model_args.vocab_size, seq_length=args.seq_len
            )
            return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)

    class StepClock(L.Callback):
        """When each step ends (CPU: the work is done when the call returns), its loss."""

        def __init__(self) -> None:
            self.t0 = 0.0
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            # what the matmuls compute in (float32: the bf16 FSDP2 policy is replaced)
            self.dtypes: set[str] = set()
            for m in module.modules():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_hook(lambda _, __, out: self.dtypes.add(str(out.dtype)))
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self.t0)
            loss = outputs["loss"]
            loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
            self.losses.append(float(loss.detach()))

    strategy = ModelParallelStrategy(
        data_parallel_size=args.data_parallel, tensor_parallel_size=args.tensor_parallel
    )
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.max_epochs,
        enable_checkpointing=False,
        callbacks=[clock],
        default_root_dir=args.root_dir,
    )
    with trainer.init_module(empty_init=True):
        module = Llama3()
    params = sum(p.numel() for p in module.parameters())
    ffn_hidden = module.model.layers["0"].feed_forward.w1.weight.shape[0]  # before wrapping
    trainer.print(f"Number of model parameters: {params / 1e6:.1f} M")
    t0 = time.perf_counter()
    trainer.fit(module)
    fit_seconds = time.perf_counter() - t0
    # each data-parallel rank's loss is of its own rows: the global batch's is their mean
    local = torch.tensor(clock.losses, dtype=torch.float64)
    torch.distributed.all_reduce(local)
    losses = (local / torch.distributed.get_world_size()).tolist()
    # CPU seconds of the whole job: every rank's own (all its threads) and its reaped
    # children's (the data workers), summed over the ranks
    own, workers = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    cpu = sum(r.ru_utime + r.ru_stime for r in (own, workers))
    cpu_seconds = torch.tensor([cpu], dtype=torch.float64)
    torch.distributed.all_reduce(cpu_seconds)
    if trainer.is_global_zero:
        result = {
            "params": params,
            "losses": losses,
            "finite": all(math.isfinite(x) for x in losses),
            "step_times": clock.times,
            "fit_seconds": fit_seconds,
            "cpu_seconds": cpu_seconds.item(),
            "world_size": trainer.world_size,
            "threads_per_process": torch.get_num_threads(),
            "linear_output_dtypes": sorted(clock.dtypes),
            "model": {
                "dim": args.dim,
                "n_layers": args.n_layers,
                "n_heads": args.n_heads,
                "vocab_size": args.vocab_size,
                "ffn_hidden": ffn_hidden,
            },
            "versions": {"torch": torch.__version__, "lightning": L.__version__},
        }
        print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
