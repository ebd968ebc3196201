"""Apply a plan: parameters born sharded, existing models resharded, optimizer state alike.

``sharded_init`` is the reason jtp needs no "meta device": ``nnx.eval_shape`` gives the model's
shapes for free, the plan turns them into shardings, and ``jax.jit(init, out_shardings=...)``
lets XLA's partitioner run each initialiser only for the shard a device keeps (jax's threefry
is partitionable, so the values are the same as an unsharded ``factory()``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from jtp.errors import InputError
from jtp.parallel.plan import Plan, plan_shardings
from jtp.parallel.threefry import unrolled_threefry_on_cpu


def _init_program[M: nnx.Module](
    factory: Callable[[], M], mesh: Mesh, plan: Plan, *, fsdp: bool = False
) -> tuple[jax.stages.Compiled, nnx.GraphDef]:
    """The compiled initialiser (all validation done first) and the model's graph definition."""
    if isinstance(factory, nnx.Module):
        raise InputError(
            f"factory must be a zero-argument callable returning the model, got a built "
            f"{type(factory).__name__}; wrap its construction in a lambda, or reshard the "
            "existing model with jtp.parallelize(model, mesh, plan)"
        )
    if not callable(factory):
        raise InputError(
            f"factory must be a zero-argument callable returning the model, got "
            f"{type(factory).__name__}; write `lambda: MyModel(..., rngs=nnx.Rngs(0))`"
        )
    abstract = nnx.eval_shape(factory)
    shardings = plan_shardings(abstract, mesh, plan, fsdp=fsdp)
    graphdef = nnx.graphdef(abstract)

    def init() -> nnx.State:
        return nnx.state(factory())

    with unrolled_threefry_on_cpu():
        compiled = jax.jit(init, out_shardings=shardings).lower().compile()
    return compiled, graphdef


def sharded_init[M: nnx.Module](
    factory: Callable[[], M], mesh: Mesh, plan: Plan, *, fsdp: bool = False
) -> M:
    """Build ``factory()`` with every parameter created directly in its shards.

    No device ever holds an unsharded planned parameter. Parameters no plan key covers are
    replicated (or, with ``fsdp=True``, split on ``"data"``: see :mod:`jtp.parallel.plan`).

    Args:
      factory: zero-argument callable returning the model, e.g.
        ``lambda: FeedForward(8192, 8192, rngs=nnx.Rngs(0))``.
      mesh: a ``("data", "tensor")`` mesh from :func:`jtp.make_mesh`.
      plan: ``{module_path_pattern: style}``.
      fsdp: also split each planned kernel's other dimension on ``"data"`` (2D parallelism).

    Returns:
      The model, its variables global ``jax.Array``s with ``NamedSharding``s.
    """
    init, graphdef = _init_program(factory, mesh, plan, fsdp=fsdp)
    return nnx.merge(graphdef, init())


def parallelize[M: nnx.Module](model: M, mesh: Mesh, plan: Plan, *, fsdp: bool = False) -> M:
    """Reshard an existing model's variables in place (torch's ``parallelize_module``).

    Returns the same object, so ``model = jtp.parallelize(model, mesh, plan)`` reads as in
    torch. Prefer :func:`sharded_init` for large models: this one starts from whatever the
    model holds now, usually whole arrays on one device.
    """
    shardings = plan_shardings(model, mesh, plan, fsdp=fsdp)
    nnx.update(model, jax.device_put(nnx.state(model), shardings))
    return model
