"""bf16 that computes in bf16, asserted from the program, never from the losses.

The CPU backend rewrites bf16 dots to float32 during optimisation, so the matmuls are read
from the jaxpr of the very step the trainer compiles (train and eval), and the collectives
from the HLO right after SPMD partitioning (before the CPU's float normalisation).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import LM_PLAN, MIXED_PLAN, ff_loss, lm_factory, lm_loss, mixed_factory

import jtp
from jtp.analysis.dtypes import collective_bytes, dot_flops_by_dtype, partitioned_hlo
from jtp.recipes import FeedForwardConfig, FeedForwardTask, LlamaTask, LlamaTaskConfig
from jtp.training import precision as precision_module
from jtp.training.compile import build_state, compile_train_step, train_step
from jtp.training.options import TrainerOptions
from jtp.training.steps import make_eval_step

BF16 = ("bf16-mixed", "bf16-true")


class StockLM(jtp.TrainModule):
    """A user's model of stock Flax layers, built without any dtype argument."""

    def __init__(self, factory, plan, loss, batch):
        self.factory, self.plan, self.loss, self.batch = factory, plan, loss, batch

    def configure_model(self, mesh):
        return self.factory, self.plan

    def training_step(self, model, batch):
        return self.loss(model, batch)[0]

    validation_step = training_step

    def configure_optimizers(self):
        return optax.adamw(1e-3)


def _programs(module, strategy, precision, batch):
    """(train-step jaxpr, eval-step jaxpr, lowered train step) as the trainer builds them."""
    options = TrainerOptions(precision=precision)
    state, rules = build_state(module, strategy, options)
    step = train_step(module, state, options, fsdp=strategy.fsdp)
    batches = [jtp.shard_batch(batch, strategy.mesh)]
    jitted = jax.jit(step)
    with jtp.activation_rules(strategy.mesh, rules):
        train = jitted.trace(*state.arrays(), batches)
        evaluate = jax.make_jaxpr(
            make_eval_step(state.graphdef, module.validation_step, precision=precision)
        )(state.params, state.rest, batches[0])
    return train.jaxpr, evaluate, train.lower()


def _bf16_share(jaxpr) -> float:
    totals = dot_flops_by_dtype(jaxpr)
    return totals.get("bfloat16", 0.0) / sum(totals.values())


def _llama():
    config = LlamaTaskConfig(fsdp=True, sequence_parallel=True, loss_parallel=True)
    tokens = np.random.default_rng(0).integers(0, 512, (8, 33)).astype(np.int32)
    return LlamaTask(config), jtp.ModelParallelStrategy(2, 4, fsdp=True), tokens


def _feedforward():
    task = FeedForwardTask(FeedForwardConfig(dim=16, hidden_dim=64, samples=8))
    batch = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    return task, jtp.ModelParallelStrategy(2, 4), batch


def _stock_lm():
    tokens = np.random.default_rng(0).integers(0, 32, (8, 9)).astype(np.int32)
    module = StockLM(lm_factory(), LM_PLAN, lm_loss, None)
    return module, jtp.ModelParallelStrategy(2, 4), (tokens[:, :-1], tokens[:, 1:])


def _stock_mixed():
    x = np.random.default_rng(0).standard_normal((4, 8, 16)).astype(np.float32)
    module = StockLM(mixed_factory(), MIXED_PLAN, ff_loss, None)
    return module, jtp.ModelParallelStrategy(2, 4), (x, x)


MODELS = {
    "llama": _llama,
    "feedforward": _feedforward,
    "stock_lm": _stock_lm,
    "stock_mixed": _stock_mixed,
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("precision", ("32-true", *BF16))
def test_matmul_flops_run_in_the_policys_dtype(model, precision):
    """>= 95% of matmul FLOPs in bf16 under both bf16 policies (what is left: the backward
    of jax's XLA attention multiplies its float32 softmax gradient by bf16 keys, ~1% at this
    size); none under 32-true. Train and eval steps alike. The stock models are made only
    of Flax layers built without a dtype (Embed, Linear, LayerNorm, MultiHeadAttention,
    Einsum, LoRALinear, Conv) and a raw-Param layer; the FeedForward gets a float32 batch."""
    module, strategy, batch = MODELS[model]()
    train, evaluate, _ = _programs(module, strategy, precision, batch)
    for jaxpr in (train, evaluate):
        share = _bf16_share(jaxpr)
        if precision == "32-true":
            assert share == 0.0
            assert set(dot_flops_by_dtype(jaxpr)) == {"float32"}
        else:
            assert share >= 0.95, dot_flops_by_dtype(jaxpr)


def test_without_the_policy_the_embedding_pins_float32(monkeypatch):
    """What the policy fixes: ``nnx.Embed`` fixed its compute dtype to float32 when it was
    built, so casting the parameters alone leaves the whole stock LM in float32."""
    monkeypatch.setattr(precision_module, "apply_compute_dtype", lambda model, _: model)
    import jtp.training.steps as steps

    monkeypatch.setattr(steps, "apply_compute_dtype", lambda model, _: model)
    module, strategy, batch = _stock_lm()
    train, _, _ = _programs(module, strategy, "bf16-true", batch)
    assert _bf16_share(train) < 0.05


def _float_collective_bytes(precision):
    module, strategy, batch = _llama()
    _, _, lowered = _programs(module, strategy, precision, batch)
    found = collective_bytes(partitioned_hlo(lowered))
    return {k: v for k, v in found.items() if k[1] in ("bf16", "f32")}


def test_tensor_and_fsdp_collectives_carry_bf16():
    """After SPMD partitioning (before the CPU promotes them), the Llama step's collectives
    (2x4, fsdp + sequence + loss parallel) carry bf16: tensor-parallel all-reduces, the
    sequence-parallel all-gathers of normed activations, and the fsdp all-gathers of the
    weights (bf16-mixed casts before it gathers). What stays float32 is < 2% of the bytes:
    the loss's (B, T) log-sum-exp over vocabulary shards (float32 by the policy) and the
    (D,) norm scales. So the bytes are about half those of 32-true."""
    full = _float_collective_bytes("32-true")
    assert all(dtype == "f32" for _, dtype in full)
    for precision in BF16:
        found = _float_collective_bytes(precision)
        for kind in ("all-reduce", "all-gather"):
            assert found[(kind, "bf16")] > 0, found
        f32 = sum(v for (_, dtype), v in found.items() if dtype == "f32")
        assert f32 <= 0.02 * sum(found.values()), found
        assert sum(found.values()) <= 0.52 * sum(full.values()), (found, full)


def test_a_module_pinned_to_float32_is_reported():
    """A user's class that keeps its own float32 compute dtype is out of the policy's
    reach: listed by ``pinned_modules`` and, as its matmul is most of the step's FLOPs, a
    warning at compile naming the line."""

    class Pinned(nnx.Module):
        def __init__(self, *, rngs):
            self.dtype = jnp.float32
            self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 64)))
            self.out = nnx.Linear(64, 16, rngs=rngs)

        def __call__(self, x):
            return self.out(x.astype(self.dtype) @ self.w[...].astype(self.dtype))

    model = Pinned(rngs=nnx.Rngs(0))
    assert precision_module.pinned_modules(model, "bf16-mixed") == [("", "float32")]
    assert precision_module.pinned_modules(model, "32-true") == []
    x = np.ones((8, 16), np.float32)
    module = StockLM(lambda: Pinned(rngs=nnx.Rngs(0)), {}, ff_loss, None)
    strategy = jtp.ModelParallelStrategy(2, 4)
    options = TrainerOptions(precision="bf16-mixed")
    state, rules = build_state(module, strategy, options)
    step = train_step(module, state, options, fsdp=False)
    batches = [jtp.shard_batch((x, x), strategy.mesh)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_train_step(step, state, batches, rules, precision="bf16-mixed")
    messages = [str(w.message) for w in caught if "matmul FLOPs" in str(w.message)]
    assert len(messages) == 1 and "test_bf16_program.py" in messages[0], messages


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_a_hugging_face_checkpoint_trains_in_bf16(name):
    """``jtp.hf.load_pretrained`` builds float32 layers (exact for the file); under both
    bf16 policies the fine-tuning step runs no matmul with two float32 operands. At the
    fixtures' head dim 8 attention is a large part of the FLOPs, so the float32-gradient x
    bf16 dots of jax's XLA attention backward reach ~6%: the bf16 share bound is 0.9 here."""
    import os

    hf = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf", name)
    task = LlamaTask(LlamaTaskConfig(hf=hf, seq_len=16, fsdp=True))
    tokens = np.random.default_rng(0).integers(0, 128, (8, 17)).astype(np.int32)
    strategy = jtp.ModelParallelStrategy(2, 4, fsdp=True)
    for precision in BF16:
        train, evaluate, _ = _programs(task, strategy, precision, tokens)
        for jaxpr in (train, evaluate):
            assert "float32" not in dot_flops_by_dtype(jaxpr) and _bf16_share(jaxpr) >= 0.9
