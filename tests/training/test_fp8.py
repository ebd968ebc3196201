"""The "transformer-engine" (fp8) precision: float8 matmuls with current per-tensor scales,
asserted from the program (which matmuls are float8, and in which format), gradients
within float8 rounding of float32 ones, and a checkpoint that resumes as under bf16 (the
scales are not state, so there is nothing of fp8 to save)."""

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from helpers import MIXED_PLAN, ff_loss, mixed_factory

import jtp
from jtp.analysis.dtypes import (
    collective_bytes,
    dot_flops_by_dtype,
    dots,
    float8_fraction,
    partitioned_hlo,
)
from jtp.cli.train import main
from jtp.recipes import LlamaTask, LlamaTaskConfig
from jtp.training import fp8
from jtp.training.compile import build_state, trace_train_step, train_step
from jtp.training.options import TrainerOptions
from jtp.training.precision import PRECISIONS, apply_compute_dtype, policy

# Worst-case relative rounding error of one element: half an ulp, 2^-(mantissa bits + 1).
E4M3_REL, E5M2_REL = 2.0**-4, 2.0**-3


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_names_and_what_they_store():
    """Lightning's fp8 name and jtp's alias: float32 storage, bf16 compute, float8 dots."""
    for name in ("transformer-engine", "fp8-mixed"):
        assert name in PRECISIONS
        p = policy(name)
        assert (p.param_dtype, p.compute_dtype, p.float8) == (jnp.float32, jnp.bfloat16, True)
    assert not policy("bf16-mixed").float8


def test_linear_gradients_are_within_float8_rounding_of_float32():
    """An ``nnx.Linear`` under the policy (bf16 compute, the fp8 dot) against the same
    Linear in float32: output, input gradient and kernel gradient, each relative to its
    norm. Each product's factors carry independent rounding errors of at most 2^-4 (e4m3,
    forward) or 2^-4 and 2^-3 (e4m3 operand, e5m2 gradient, backward) and bf16's 2^-9;
    summed over 64 or 256 products those errors average out, so the norm-relative error is
    well under the per-element worst case (observed ~0.03 forward, ~0.05 backward): 2^-4 +
    2^-9 forward and 2^-3 backward are bounds with margin that a wrong transpose (error ~1)
    or a missing scale (error ~1) cannot meet. It is also above 1e-3: float8 is in use.
    A batched dot with two contracted dimensions checks the general transposes."""
    rng = np.random.default_rng(0)  # numpy's: jax's RNG compiles a program per shape
    x = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((4, 8, 32)), jnp.float32)
    linear = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    fp8_linear = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    apply_compute_dtype(fp8_linear, "transformer-engine")
    assert fp8_linear.dot_general is fp8.dot_general

    a = jnp.asarray(rng.standard_normal((3, 5, 7, 6)), jnp.float32)  # (B, M, K1, K2)
    b = jnp.asarray(rng.standard_normal((3, 6, 7, 4)), jnp.float32)  # (B, K2, K1, N)
    c = jnp.asarray(rng.standard_normal((3, 5, 4)), jnp.float32)  # (B, M, N)
    dims = (((3, 2), (1, 2)), ((0,), (0,)))

    @partial(jax.jit, static_argnums=1)  # one compile per dot, not one per operation
    def both(model, dot):
        # linear losses: their gradients are exactly the matmuls' transposes
        def loss(model, x):
            return jnp.sum(model(x).astype(jnp.float32) * cot)

        def batched(a, b):
            return jnp.sum(c * dot(a, b, dims))

        out = model(x).astype(jnp.float32)
        return out, jax.grad(loss, argnums=(0, 1))(model, x), jax.grad(batched, (0, 1))(a, b)

    want = both(linear, jax.lax.dot_general)
    got = both(fp8_linear, fp8.dot_general)
    assert 1e-3 < _rel(got[0], want[0]) < E4M3_REL + 2.0**-9  # output
    (g_model, g_x), (w_model, w_x) = got[1], want[1]
    assert 1e-3 < _rel(g_x, w_x) < E5M2_REL  # input gradient
    assert 1e-3 < _rel(g_model.kernel[...], w_model.kernel[...]) < E5M2_REL  # kernel gradient
    for g, w in zip(got[2], want[2], strict=True):  # the batched dot's two gradients
        assert g.shape == w.shape and 1e-3 < _rel(g, w) < E5M2_REL


def test_llama_train_step_runs_its_matmuls_in_float8():
    """The trainer's own train step for the tiny Llama (2x4, fsdp + sequence + loss
    parallel) under "transformer-engine", read off its jaxpr: >= 90% of the matmul FLOPs
    have float8 operands (the rest is attention's scores and values, in bf16 as under
    "bf16-mixed"); the forward ones are e4m3 x e4m3 and every backward one multiplies an
    e5m2 gradient by an e4m3 residual; no float8 dot in another pairing; parameters and
    optimizer state float32; the compiled-step check counts float8 as low precision (no
    "not bfloat16" warning); and the collectives' element types, read after SPMD
    partitioning (before the CPU promotes them)."""
    config = LlamaTaskConfig(fsdp=True, sequence_parallel=True, loss_parallel=True)
    module, strategy = LlamaTask(config), jtp.ModelParallelStrategy(2, 4, fsdp=True)
    tokens = np.random.default_rng(0).integers(0, 512, (8, 33)).astype(np.int32)
    options = TrainerOptions(precision="transformer-engine")
    state, rules = build_state(module, strategy, options)
    step = train_step(module, state, options, fsdp=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = [jtp.shard_batch(tokens, strategy.mesh)]
        traced = trace_train_step(step, state, batches, rules, precision="transformer-engine")
    totals = dot_flops_by_dtype(traced.jaxpr)
    assert float8_fraction(traced.jaxpr) >= 0.9, totals
    float8_pairs = {d.dtype for d in dots(traced.jaxpr) if "float8" in d.dtype}
    assert float8_pairs == {"float8_e4m3fn", "float8_e5m2 x float8_e4m3fn"}, totals
    # backward FLOPs are twice the forward's (input and weight gradients)
    np.testing.assert_allclose(
        totals["float8_e5m2 x float8_e4m3fn"], 2 * totals["float8_e4m3fn"], rtol=1e-6
    )
    # After SPMD partitioning: the tensor-parallel all-reduces carry bf16 (the fp8 dots
    # write bf16, as bf16 ones do; a float32 output would double those bytes), fsdp
    # gathers the quantized weights in float8, and float32 stays under 2% of the bytes.
    found = collective_bytes(partitioned_hlo(traced.lower()))
    assert found[("all-reduce", "bf16")] > 0 and found[("all-gather", "f8e4m3fn")] > 0, found
    assert sum(v for (_, e), v in found.items() if e == "f32") < 0.02 * sum(found.values())
    for tree in (state.params, state.opt_state):
        floats = [x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and set(floats) == {jnp.dtype(jnp.float32)}


def test_an_fp8_run_resumes_bitwise(tmp_path):
    """2 steps + checkpoint, then --resume to 4, equals 4 straight steps bit for bit under
    "transformer-engine" (FeedForward, 2x4 fsdp): the scales are recomputed from the
    tensors every step, so the checkpoint (float32 parameters and optimizer state, as for
    bf16) is the whole state."""
    flags = "--devices 8 --dim 32 --hidden-dim 64 --samples 64 --no-progress --fsdp".split()
    flags += ["--data-parallel", "2", "--tensor-parallel", "4", "--root-dir", str(tmp_path)]
    flags += ["--precision", "transformer-engine"]
    full = main(flags + ["--max-steps", "4"])["losses"]
    ck = str(tmp_path / "ck")
    first = main(flags + ["--checkpoint-dir", ck, "--max-steps", "2"])
    second = main(flags + ["--checkpoint-dir", ck, "--resume", "--max-steps", "4"])
    assert first["losses"] == full[:2] and second["first_step"] == 2
    assert second["losses"] == full[2:]


def test_llama3_8b_step_at_t2048_is_at_least_90_percent_float8():
    """Llama-3-8B's shapes (32 scanned layers, counted per trip; untied head, vocabulary
    128,256), T = 2048, XLA's attention, traced on abstract arrays (nothing allocated):
    >= 90% of the train step's matmul FLOPs are float8 (91.3%), and every matmul that is
    not is attention's (its (T, T) products grow with T: at T = 8192 they are 27.6% as
    XLA counts them, docs/performance.md)."""
    from jtp.analysis.dtypes import is_float8
    from jtp.recipes.llama import trace_llama_step

    config = LlamaTaskConfig(
        preset="llama3-8b", seq_len=2048, batch_size=1, attention="xla", remat="dots"
    )
    traced, _ = trace_llama_step(config, (1, 1), jax.devices()[:1], precision="fp8-mixed")
    assert float8_fraction(traced.jaxpr) >= 0.9, dot_flops_by_dtype(traced.jaxpr)
    others = {d.where.split(" ")[-1] for d in dots(traced.jaxpr) if not is_float8(d.dtype)}
    assert others == {"(attention)"}, others


class _Mixed(jtp.TrainModule):
    """Every parameterised stock Flax layer (tests/helpers.py's MixedBlock), 2x4."""

    def configure_model(self, mesh):
        return mixed_factory(), MIXED_PLAN

    def training_step(self, model, batch):
        return ff_loss(model, batch)[0]

    def configure_optimizers(self):
        return optax.adamw(1e-3)


def test_every_stock_linear_layer_gets_the_float8_matmul():
    """The policy reaches ``nnx.LinearGeneral`` (MultiHeadAttention's query, key, value and
    output projections), ``nnx.Einsum`` (two) and ``nnx.Linear`` (``LoRALinear``'s base and
    a plain one): their 8 forward matmuls are e4m3 x e4m3; what stays bf16 is the rest
    (attention's own products, the convolutions, LoRA's A and B, a raw-Param layer). The
    block holds LoRA, so only the adapters train and the layers before them run no backward:
    the Llama test above checks the backward's formats."""
    x = np.random.default_rng(0).standard_normal((4, 8, 16)).astype(np.float32)
    module, strategy = _Mixed(), jtp.ModelParallelStrategy(2, 4)
    options = TrainerOptions(precision="transformer-engine")
    state, rules = build_state(module, strategy, options)
    step = train_step(module, state, options, fsdp=False)
    batches = [jtp.shard_batch((x, x), strategy.mesh)]
    traced = trace_train_step(step, state, batches, rules, precision="transformer-engine")
    found = dots(traced.jaxpr)
    assert sum(d.dtype == "float8_e4m3fn" for d in found) == 8
    assert {d.dtype for d in found if "float8" not in d.dtype} == {"bfloat16"}
