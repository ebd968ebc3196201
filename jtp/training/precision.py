"""Precision: the one place that decides which dtypes parameters are stored and computed in.

Lightning's names, with Lightning's meaning:

- ``"32-true"``: float32 everywhere.
- ``"bf16-mixed"``: float32 parameters and optimizer state. Inside each step the model
  computes in bf16: the parameters are cast to bf16 copies (the cast's transpose brings the
  gradients back to float32 for the optimizer), float inputs of the batch are cast too, and
  every stock Flax layer (``nnx.Linear``, ``LinearGeneral``/``MultiHeadAttention``,
  ``Einsum``, ``Embed``, ``Conv``, the norms, LoRA) is told to compute in bf16, also those
  that fixed a float32 compute dtype when they were built (``nnx.Embed`` does:
  ``dtype = dtype or embedding.dtype``). Matmuls accumulate in float32 as XLA does; norm
  statistics and jtp's attention softmax are taken in float32; the loss is cast to float32.
- ``"bf16-true"``: parameters and optimizer state stored in bf16, the same bf16 compute.
- ``"transformer-engine"`` (Lightning's fp8 name; ``"fp8-mixed"`` is the same policy): as
  "bf16-mixed", and the large matmuls (every ``nnx.Linear``, ``nnx.LinearGeneral`` and
  ``nnx.Einsum``, so a Llama's projections, feed-forward and untied LM head) run in float8:
  e4m3 operands forward, e5m2 gradients backward, each tensor with its current per-tensor
  scale (:mod:`jtp.training.fp8` says why current, not delayed). Unlike Lightning's (whose
  TransformerEngine plugin stores bf16 weights), parameters and optimizer state stay
  float32; the fp8 operands exist only inside the step, so nothing of fp8 is stored or
  checkpointed. Norms, attention (its scores and softmax), the router, the experts' grouped
  matmuls and the loss compute as under "bf16-mixed".

Casting parameters alone is not a policy: ``nnx.Linear(dtype=None)`` promotes from its
inputs, so a float32 batch or a module pinned to float32 turns bf16 kernels back into
float32 matmuls. A module this policy cannot reach (a class of your own with a float32
``dtype`` attribute, or an explicit ``astype(float32)`` before a matmul) is reported:
:func:`pinned_modules` names the first kind, and the compiled step warns when more than
5% of its matmul FLOPs still run in float32 (:mod:`jtp.analysis.dtypes` reads the program).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jtp.analysis.dtypes import FLOAT8_LAYERS, POLICY_LAYERS, module_dtypes
from jtp.parallel.abstract import is_abstract
from jtp.training import fp8


@dataclasses.dataclass(frozen=True)
class Precision:
    """What one precision name means."""

    name: str
    param_dtype: Any  # what parameters (and so the optimizer state) are stored in
    compute_dtype: Any  # what the step casts the parameters to before the forward
    float8: bool = False  # the stock linear layers' matmuls in float8 (jtp.training.fp8)


POLICIES = {
    "32-true": Precision("32-true", jnp.float32, jnp.float32),
    "bf16-mixed": Precision("bf16-mixed", jnp.float32, jnp.bfloat16),
    "bf16-true": Precision("bf16-true", jnp.bfloat16, jnp.bfloat16),
    "transformer-engine": Precision("transformer-engine", jnp.float32, jnp.bfloat16, True),
    "fp8-mixed": Precision("fp8-mixed", jnp.float32, jnp.bfloat16, True),
}
PRECISIONS = tuple(POLICIES)


def policy(name: str) -> Precision:
    """The :class:`Precision` called ``name``; an unknown name lists the choices."""
    if name not in POLICIES:
        raise ValueError(f"precision={name!r} must be one of {PRECISIONS}")
    return POLICIES[name]


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Cast the floating leaves of ``tree`` to ``dtype`` (integers, keys untouched)."""

    def cast(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def compute_params(params: Any, precision: str) -> Any:
    """The parameters a step computes with (traced inside the step): bf16 copies under
    "bf16-mixed", the stored ones otherwise (already in their compute dtype)."""
    p = policy(precision)
    return cast_floats(params, p.compute_dtype) if p.compute_dtype != p.param_dtype else params


def stored_params(params: Any, precision: str) -> Any:
    """``params`` (arrays on the mesh, or abstract ones) in the dtype the precision stores
    them in, keeping each leaf's sharding. Under "bf16-true" the float32 values are not
    kept: the cast runs in one jitted call whose inputs the caller then drops."""
    dtype = policy(precision).param_dtype
    if dtype == jnp.float32:
        return params
    out = jax.tree.map(lambda a: a.sharding, params)
    cast = jax.jit(partial(cast_floats, dtype=dtype), out_shardings=out)
    return jax.eval_shape(cast, params) if is_abstract(params) else cast(params)


def apply_compute_dtype(model: nnx.Module, precision: str) -> nnx.Module:
    """Tell every stock Flax layer of ``model`` to compute in the precision's dtype, and
    under a float8 policy give the linear layers the float8 matmul (their ``dot_general``,
    ``nnx.Einsum``'s ``einsum_op``; subclasses such as jtp's LoRALinear included).

    Called on the model a step merges from its parameters (a fresh object inside the
    trace), so nothing outside the step changes. Under "32-true" the model is untouched.
    """
    p = policy(precision)
    if p.compute_dtype == jnp.float32:
        return model
    for _, module in nnx.iter_graph(model):
        if isinstance(module, POLICY_LAYERS):
            module.dtype = p.compute_dtype
        if not (p.float8 and isinstance(module, FLOAT8_LAYERS)):
            continue
        if isinstance(module, nnx.Einsum):
            module.einsum_op = fp8.einsum
        else:  # Linear, LinearGeneral
            module.dot_general = fp8.dot_general
            if getattr(module, "dot_general_cls", None) is not None:  # LinearGeneral's
                module.dot_general_cls = None  # takes precedence over dot_general
    return model


def pinned_modules(model: nnx.Module, precision: str) -> list[tuple[str, str]]:
    """``(path, dtype)`` of each module the policy cannot reach: not a stock Flax layer,
    yet with a float ``dtype`` attribute other than the precision's compute dtype (its own
    code decides what it computes in). Empty under "32-true"."""
    want = policy(precision).compute_dtype
    if want == jnp.float32:
        return []
    return [
        (path, dtype.removesuffix(" (pinned)"))
        for path, dtype in module_dtypes(model, want).items()
        if dtype.endswith("(pinned)")
    ]


def cast_batch(batch: Any, precision: str) -> Any:
    """Float leaves of a batch in the compute dtype (token ids and masks untouched), so a
    float32 input does not promote bf16 matmuls back to float32."""
    dtype = policy(precision).compute_dtype
    return batch if dtype == jnp.float32 else cast_floats(batch, dtype)
