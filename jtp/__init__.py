"""jtp: tensor parallelism for JAX and Flax NNX.

A plan outside the model names column- and row-wise layers; parameters are born sharded on a
``("data", "tensor")`` mesh; XLA inserts the collectives; the trainer keeps every
tensor-parallel group on the same batch. This file only re-exports the public API (the
last two packages below are imported by name: ``import jtp.capacity``):

- ``jtp.mesh``: axis names, :func:`make_mesh`, :class:`ModelParallelStrategy`
- ``jtp.parallel``: styles, plans, ``sharded_init`` / ``parallelize``, batches, replicas,
  :func:`infer_plan` (a plan read off the model's forward)
- ``jtp.models``: single-device NNX models (FeedForward; the decoder, ``Llama``, with an
  optional KV cache) and their plans (``jtp.plans``)
- ``jtp.hf``: Hugging Face Llama / Mistral / Qwen / Phi-3 / Gemma checkpoints in and out
- ``jtp.data``: :class:`DataLoader` (global batches, the same rows per tensor group), datasets
- ``jtp.checkpoint``: sharded orbax checkpoints, consolidated safetensors export
- ``jtp.training``: :class:`TrainModule`, :class:`Trainer`
- ``jtp.generation``: :func:`generate` (a sharded KV cache)
- ``jtp.analysis``: collectives, memory and dtypes of a compiled step, :func:`explain`
- ``jtp.recipes``: the ready-made tasks the programs run (``LlamaTask``, ...)
- ``jtp.capacity``: the capacity planner (:func:`jtp.capacity.search`)
- ``jtp.xla_flags``: the XLA flags jtp sets on GPUs (:func:`apply_gpu_flags`)
"""

from importlib.metadata import PackageNotFoundError, version

from jtp import hf, models, plans
from jtp.analysis.collectives import Collective, collectives, format_collectives
from jtp.analysis.explain import Explanation, explain
from jtp.analysis.memory import memory_breakdown, peak_memory_per_device
from jtp.checkpoint.consolidated import load_consolidated, save_consolidated
from jtp.checkpoint.sharded import Checkpointer
from jtp.data.datasets import RandomDataset, RandomTokenDataset
from jtp.data.loader import DataLoader, local_data_ranks
from jtp.data.tokens import TokenDataset
from jtp.errors import InputError
from jtp.generation import generate
from jtp.mesh import DATA, EXPERT, TENSOR, ModelParallelStrategy, make_mesh, mesh_shape
from jtp.parallel.activations import activation_rules, shard_activation
from jtp.parallel.batch import batch_sharding, shard_batch
from jtp.parallel.infer import InferredPlan, PlanCost, infer_plan
from jtp.parallel.optimizer import init_opt_state, opt_state_shardings
from jtp.parallel.parallelize import parallelize, sharded_init
from jtp.parallel.plan import Placement, TPPlan, plan_shardings, resolve
from jtp.parallel.replicas import check_replicas
from jtp.parallel.styles import ColwiseParallel, ParallelStyle, ParamSharding, RowwiseParallel
from jtp.training.module import TrainModule
from jtp.training.trainer import Trainer
from jtp.xla_flags import apply_gpu_flags, gpu_flags

try:
    __version__ = version("jtp")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "InputError",
    "DATA",
    "EXPERT",
    "TENSOR",
    "Checkpointer",
    "Collective",
    "ColwiseParallel",
    "DataLoader",
    "Explanation",
    "InferredPlan",
    "ModelParallelStrategy",
    "ParallelStyle",
    "ParamSharding",
    "Placement",
    "PlanCost",
    "RandomDataset",
    "RandomTokenDataset",
    "RowwiseParallel",
    "TPPlan",
    "TokenDataset",
    "TrainModule",
    "Trainer",
    "activation_rules",
    "apply_gpu_flags",
    "batch_sharding",
    "check_replicas",
    "collectives",
    "explain",
    "generate",
    "infer_plan",
    "format_collectives",
    "gpu_flags",
    "hf",
    "init_opt_state",
    "load_consolidated",
    "local_data_ranks",
    "make_mesh",
    "memory_breakdown",
    "mesh_shape",
    "models",
    "opt_state_shardings",
    "parallelize",
    "peak_memory_per_device",
    "plan_shardings",
    "plans",
    "resolve",
    "save_consolidated",
    "shard_activation",
    "shard_batch",
    "sharded_init",
]
