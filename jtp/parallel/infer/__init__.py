"""Plan inference, ``jtp.infer_plan(model, *example_args)``: a tensor-parallel plan read off
the model's traced forward, each layer with the reason for its style.

1. trace: ``jax.make_jaxpr`` of the forward, flattened into one dataflow graph
   (:mod:`~jtp.parallel.infer.dataflow`);
2. pairings: each layer tried as a column layer, its split moved op by op
   (:mod:`~jtp.parallel.infer.split_rules`, shape facts in :mod:`~jtp.parallel.infer.dims`)
   until it ends in row layers: a group (:mod:`~jtp.parallel.infer.pairing`);
3. cost choice: the non-overlapping groups that all-reduce the fewest bytes
   (:mod:`~jtp.parallel.infer.choice`);
4. reasons: one line per layer, naming what the other pairings would move
   (:mod:`~jtp.parallel.infer.reasons`).

:mod:`~jtp.parallel.infer.plan` runs the steps and assembles the :class:`InferredPlan`.
"""

from jtp.parallel.infer.choice import PlanCost
from jtp.parallel.infer.plan import InferredPlan, infer_plan

__all__ = ["InferredPlan", "PlanCost", "infer_plan"]
