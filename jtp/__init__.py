"""jtp: tensor parallelism for JAX and Flax NNX.

A plan outside the model names column- and row-wise layers; parameters are born sharded on a
``("data", "tensor")`` mesh; XLA inserts the collectives.
"""

from jtp import models
from jtp.batch import shard_batch
from jtp.mesh import DATA, TENSOR, make_mesh
from jtp.parallelize import init_opt_state, opt_state_shardings, parallelize, sharded_init
from jtp.plan import ColwiseParallel, ParallelStyle, Placement, RowwiseParallel, resolve

__version__ = "0.1.0"

__all__ = [
    "DATA",
    "TENSOR",
    "ColwiseParallel",
    "ParallelStyle",
    "Placement",
    "RowwiseParallel",
    "init_opt_state",
    "make_mesh",
    "models",
    "opt_state_shardings",
    "parallelize",
    "resolve",
    "shard_batch",
    "sharded_init",
]
