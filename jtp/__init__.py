"""jtp: tensor parallelism for JAX and Flax NNX.

A plan outside the model names column- and row-wise layers; parameters are born sharded on a
``("data", "tensor")`` mesh; XLA inserts the collectives; the trainer keeps every
tensor-parallel group on the same batch.
"""

from jtp import models, plans
from jtp.activations import activation_rules, shard_activation
from jtp.batch import batch_sharding, shard_batch
from jtp.checkpoint import Checkpointer
from jtp.data import DataLoader, RandomDataset, RandomTokenDataset, local_data_ranks
from jtp.explain import Explanation, explain
from jtp.export import load_consolidated, save_consolidated
from jtp.mesh import DATA, TENSOR, make_mesh, mesh_shape
from jtp.module import TrainModule
from jtp.parallelize import init_opt_state, opt_state_shardings, parallelize, sharded_init
from jtp.plan import (
    ColwiseParallel,
    ParallelStyle,
    Placement,
    RowwiseParallel,
    TPPlan,
    plan_shardings,
    resolve,
)
from jtp.replicas import check_replicas
from jtp.report import (
    Collective,
    collectives,
    format_collectives,
    memory_breakdown,
    peak_memory_per_device,
)
from jtp.strategy import ModelParallelStrategy
from jtp.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "DATA",
    "TENSOR",
    "Checkpointer",
    "Collective",
    "ColwiseParallel",
    "DataLoader",
    "ModelParallelStrategy",
    "ParallelStyle",
    "Placement",
    "RandomDataset",
    "RandomTokenDataset",
    "TPPlan",
    "activation_rules",
    "plans",
    "save_consolidated",
    "shard_activation",
    "RowwiseParallel",
    "TrainModule",
    "Trainer",
    "Explanation",
    "batch_sharding",
    "check_replicas",
    "explain",
    "collectives",
    "format_collectives",
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
    "resolve",
    "shard_batch",
    "sharded_init",
]
