"""Gradient accumulation inside the compiled step: numerics and data-axis traffic.

k micro-batches of B rows must update the parameters exactly as one step on the kB rows
(the loss is a mean over rows), and, without fsdp, move the same gradient bytes over "data"
per optimizer step whatever k: the gradients are reduced once, after the micro-batch loop.
Bytes come from the compiled HLO with loop bodies counted once per trip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import FF_PLAN, adamw, assert_adamw_step_matches, ff_factory

import jtp
from jtp.analysis.collectives import total_bytes
from jtp.training.compile import build_state, compile_train_step, train_step
from jtp.training.options import TrainerOptions

DIM, HIDDEN, B, K = 16, 64, 8, 4


class Lit(jtp.TrainModule):
    def __init__(self, fsdp=False):
        self.fsdp = fsdp

    def configure_model(self, mesh):
        return jtp.sharded_init(ff_factory(DIM, HIDDEN), mesh, FF_PLAN, fsdp=self.fsdp)

    def training_step(self, model, batch):
        return jnp.mean(model(batch) ** 2)

    def configure_optimizers(self):
        return adamw()


def _rows(n, seed):
    return np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)


def _one_step(fsdp, k, grad_reduce=None, rows=None):
    """Params and optimizer state after one optimizer step over ``rows`` split into k
    micro-batches; the compiled step and the mesh."""
    strategy = jtp.ModelParallelStrategy(2, 4, fsdp=fsdp)
    options = TrainerOptions(accumulate_grad_batches=k, grad_reduce=grad_reduce)
    module = Lit(fsdp)
    state, rules = build_state(module, strategy, options)
    step = train_step(module, state, options, fsdp=fsdp)
    rows = _rows(K * B, 0) if rows is None else rows
    per = len(rows) // k
    batches = [jtp.shard_batch(rows[i * per : (i + 1) * per], strategy.mesh) for i in range(k)]
    compiled = compile_train_step(step, state, batches, rules)
    params, opt_state, *_ = compiled(*state.arrays(), batches)
    return (params, opt_state), compiled, strategy.mesh


def _reference():
    """One AdamW step on all K*B rows, on one device: params before and after, gradients,
    Adam's state."""
    graphdef, params = nnx.split(ff_factory(DIM, HIDDEN)(), nnx.Param)
    tx = adamw()
    x = _rows(K * B, 0)
    grads = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2))(params)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    return dict(params=params, grads=grads, new=new, adam=opt_state[0])


def _data_bytes(compiled, mesh):
    return total_bytes(jtp.collectives(compiled, mesh), axes=("data",))


@pytest.mark.parametrize(
    "fsdp,grad_reduce",
    [(False, None), (True, None), (True, "per_step"), (False, "per_micro_batch")],
    ids=["tp", "fsdp", "fsdp-per-step", "tp-per-micro-batch"],
)
def test_k_micro_batches_equal_one_step_on_the_whole_batch(fsdp, grad_reduce):
    """The accumulated gradient is Adam's mu / (1 - b1) after one step: it must be the
    whole batch's gradient within 1e-5 (fp32 sums over the K*B rows, reordered per rank and
    per micro-batch), and the step what that gradient determines
    (``helpers.assert_adamw_step_matches``)."""
    (params, opt_state), _, _ = _one_step(fsdp, K, grad_reduce)
    ref = _reference()
    adam = opt_state[0]
    grads = jax.tree.map(lambda mu: np.asarray(mu, np.float64) / 0.1, adam.mu)  # 1 - b1
    # The step consumed (donated) its initial parameters: the unsharded init, exactly.
    got = dict(params=ref["params"], grads=grads, new=params, adam=adam)
    assert_adamw_step_matches(got, ref)


def test_data_axis_gradient_bytes_per_step_do_not_grow_with_k():
    _, one, mesh = _one_step(False, 1)
    _, four, _ = _one_step(False, K)
    grad_bytes = 4 * (2 * DIM * HIDDEN // 4 + HIDDEN * DIM // 4)  # fp32 tensor shards
    one_b, four_b = _data_bytes(one, mesh), _data_bytes(four, mesh)
    assert one_b >= grad_bytes  # the gradient all-reduce is there ...
    assert four_b == one_b  # ... and happens once per optimizer step for k = 4 too
    loops = [c for c in jtp.collectives(four, mesh) if c.trips > 1]
    assert not [c for c in loops if "data" in (c.axes or ())], loops  # nothing over data inside


def test_fsdp_default_reduces_per_micro_batch_as_documented():
    """fsdp keeps the accumulator sharded: every gradient reduction over "data" sits in the
    micro-batch loop (k per step); "per_step" reduces the whole tensor-shard gradient once,
    after the loop, and pays for it in memory (unreduced gradients held across the loop)."""
    _, per_micro, mesh = _one_step(True, K)
    _, per_step, _ = _one_step(True, K, "per_step")

    def reductions(compiled):  # gradient reductions: not the parameters' all-gathers
        return [
            r
            for r in jtp.collectives(compiled, mesh)
            if r.axes == ("data",)
            and r.kind in ("reduce-scatter", "all-reduce")
            and r.op_bytes > 64
        ]

    assert reductions(per_micro) and all(r.trips == K for r in reductions(per_micro))
    grad_shard_bytes = 4 * (2 * DIM * HIDDEN + HIDDEN * DIM) // 4  # fp32, tensor-sharded
    after_loop = [r for r in reductions(per_step) if r.trips == 1]
    assert [r.op_bytes for r in after_loop] == [grad_shard_bytes]
    temps = {n: jtp.memory_breakdown(c)["temps"] for n, c in [("m", per_micro), ("s", per_step)]}
    assert temps["s"] > temps["m"]


def test_resume_mid_epoch_when_k_does_not_divide_the_epoch(tmp_path):
    """5 batches per epoch, k = 2: step 3 takes epoch 0's last batch and epoch 1's first.
    Stopping after it and resuming continues bitwise (same mesh) with the next group."""
    from jtp.cli.train import main

    common = [
        "--dim",
        "16",
        "--hidden-dim",
        "64",
        "--samples",
        "40",
        "--batch-size",
        "8",
        "--max-epochs",
        "2",
        "--accumulate-grad-batches",
        "2",
        "--no-progress",
        "--root-dir",
        str(tmp_path / "runs"),
        "--data-parallel",
        "2",
    ]
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    a = main([*common, *ck, "--max-steps", "3"])
    assert jtp.Checkpointer(str(tmp_path / "ck")).all_steps() == [3]
    b = main([*common, *ck, "--resume"])
    full = main(common)
    assert full["steps"] == 5 and a["steps"] == 3 and b["first_step"] == 3 and b["steps"] == 2
    assert a["losses"] + b["losses"] == full["losses"]  # bitwise
