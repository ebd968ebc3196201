"""The training state on the mesh: what ``TrainModule.configure_model`` built, split for jit.

``nnx.split`` separates the parameters (differentiated, updated by the optimizer) from the
rest of the model's state (RNG counters, batch statistics), and the graph definition that
``nnx.merge`` needs to rebuild the model inside a step. Every leaf is placed on the mesh
with a fixed sharding, so the compiled step's inputs and outputs never change layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.parallel.abstract import abstract_array, is_abstract
from jtp.parallel.optimizer import abstract_opt_state, init_opt_state
from jtp.parallel.parallelize import parallelize, sharded_init
from jtp.parallel.plan import activation_rules_of
from jtp.training.module import TrainModule
from jtp.training.precision import stored_params


def shardings(tree: Any) -> Any:
    """The sharding of every leaf of ``tree`` (arrays or abstract arrays)."""
    return jax.tree.map(lambda a: a.sharding, tree)


def build_model(module: TrainModule, mesh: Mesh, *, fsdp: bool) -> tuple[nnx.Module, dict]:
    """Call ``configure_model`` and shard what it returns; the model and activation rules.

    ``configure_model`` returns a sharded model, or ``(factory, plan)`` / ``(model, plan)``,
    which are sharded here with the strategy's ``fsdp``. The module's own
    ``activation_rules()`` win over those the plan carries.
    """
    built = module.configure_model(mesh)
    rules = module.activation_rules()
    if isinstance(built, tuple):
        target, plan = built
        rules = rules if rules is not None else activation_rules_of(plan)
        if isinstance(target, nnx.Module):
            built = parallelize(target, mesh, plan, fsdp=fsdp)
        else:
            built = sharded_init(target, mesh, plan, fsdp=fsdp)
    if not isinstance(built, nnx.Module):
        raise ValueError(
            f"{type(module).__name__}.configure_model must return an nnx.Module or "
            f"(factory, plan), got {type(built).__name__}; return "
            "jtp.sharded_init(factory, mesh, plan) or (factory, plan)"
        )
    return built, dict(rules or {})


@dataclasses.dataclass
class TrainState:
    """Graph definition + parameters + optimizer state + the rest, all on ``mesh``.

    Under ``"bf16-true"`` the parameters are stored in bf16 and the fp32 values the model
    was built with are dropped (nothing keeps them alive).
    """

    graphdef: nnx.GraphDef
    params: Any
    rest: Any
    mesh: Mesh
    opt_state: Any = None
    # The parameters the optimizer trains (a Flax filter): every nnx.Param, or only the
    # adapters (nnx.LoRAParam) with the base frozen. The others get no gradient and no
    # optimizer state; they stay in ``params`` (checkpoints and exports see the whole model).
    trainable: nnx.filterlib.Filter = nnx.Param

    @classmethod
    def from_model(
        cls,
        model: nnx.Module,
        mesh: Mesh,
        *,
        precision: str,
        trainable: nnx.filterlib.Filter = nnx.Param,
    ) -> TrainState:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        replicated = NamedSharding(mesh, P())

        def place(x: Any) -> Any:
            """Put any leaf that is not yet a mesh array (e.g. an RNG counter) replicated."""
            sharding = getattr(x, "sharding", None)
            if isinstance(x, jax.ShapeDtypeStruct):
                return x if sharding is not None else abstract_array(x, replicated)
            if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
                return x
            return jax.device_put(x, replicated)

        params, rest = jax.tree.map(place, params), jax.tree.map(place, rest)
        return cls(graphdef, stored_params(params, precision), rest, mesh, trainable=trainable)

    @property
    def abstract(self) -> bool:
        """True for a shapes-only state (capacity planning): nothing is allocated."""
        return is_abstract(self.params)

    def init_optimizer(self, tx: optax.GradientTransformation) -> None:
        """Create ``tx``'s state of the trained parameters inside jit, sharded like them."""
        make = abstract_opt_state if self.abstract else init_opt_state
        self.opt_state = make(tx, self.trained_params())

    def trained_params(self) -> Any:
        """The parameters ``trainable`` selects (all of them unless the base is frozen)."""
        return nnx.split_state(self.params, self.trainable, ...)[0]

    def shardings(self) -> tuple[Any, Any, Any]:
        """(params, opt_state, rest) shardings: the step's fixed in/out layouts."""
        return (
            shardings(self.params),
            shardings(self.opt_state),
            shardings(self.rest),
        )

    def arrays(self) -> tuple[Any, Any, Any]:
        return self.params, self.opt_state, self.rest

    def update(self, params: Any, opt_state: Any, rest: Any) -> None:
        self.params, self.opt_state, self.rest = params, opt_state, rest

    def tree(self) -> dict[str, Any]:
        """What a checkpoint holds (names: ``params.*``, ``opt_state.*``, ``rest.*``)."""
        return {"params": self.params, "opt_state": self.opt_state, "rest": self.rest}

    def model(self) -> nnx.Module:
        """The user-visible model, pointing at the current arrays (no copy)."""
        return nnx.merge(self.graphdef, self.params, self.rest)
