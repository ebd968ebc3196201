"""Training a mixture-of-experts model (jtp.recipes.objective through LlamaTask): the loss
with the router's auxiliary terms against a hand computation, the train step's gradients
on meshes against one device's (the experts split over "tensor" on E, or on F where the
tensor size does not divide E), and the CLI's presets, options and recorded metrics.

Tolerances. The hand computation: 1e-6 relative; the same float32 numbers summed in another
order (transformers' formula on the layers' logits concatenated, in float64 here, vs jtp's
sums of per-layer stats): seen 2.1e-7 (loss), 1.2e-7 (aux). The meshes:
``helpers.GRAD_TOL`` (1e-5 norm-relative, the dense models' parity tolerance: per-shard
partial sums all-reduced, rows reduced over "data" in another order; seen 1.3e-6 to
1.5e-6 on the 8 meshes), and the routing itself
must be the same: the expert loads (integers) equal exactly, so no near-tie flipped.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import GRAD_TOL, rel_err
from jax.sharding import PartitionSpec as P

import jtp
from jtp.models import moe
from jtp.models.llama import PRESETS, Llama
from jtp.recipes import LlamaTask, LlamaTaskConfig
from jtp.recipes.objective import lm_loss, next_token_loss
from jtp.training.compile import build_state, compile_train_step, train_step
from jtp.training.options import TrainerOptions

B, T = 8, 32


def tokens(seed: int, vocab: int = 512) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T + 1), dtype=np.int32)


def transformers_aux(gate_logits: list[np.ndarray], k: int) -> float:
    """transformers' ``load_balancing_loss_func`` (no mask) on the layers' router logits
    concatenated, in float64 (as tests/models/test_moe.py)."""
    logits = np.concatenate(gate_logits).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    n_experts = probs.shape[-1]
    chosen = np.argsort(-probs, axis=-1)[:, :k]  # (tokens, k)
    mask = np.eye(n_experts)[chosen]  # (tokens, k, E)
    return float(np.sum(mask.mean(axis=0) * probs.mean(axis=0)[None]) * n_experts)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_the_loss_adds_the_router_losses_as_computed_by_hand(monkeypatch, capacity_factor):
    """loss = CE + aux_coef * transformers' load-balancing loss over both sparse layers'
    logits + z_coef * mean(logsumexp ** 2); the metrics are the hand-counted loads. One
    dense layer between (unrolled) shows only sparse layers count."""
    config = dataclasses.replace(
        PRESETS["tiny-moe"],
        n_layers=3,
        moe_layers=(True, False),
        scan_layers=False,
        router_aux_loss_coef=0.3,
        router_z_loss_coef=0.01,
        capacity_factor=capacity_factor,
    )
    model = Llama(config, rngs=nnx.Rngs(0))
    logits_seen = []
    route = moe.Router.__call__

    def recording(self, x_nd):
        logits = route(self, x_nd)
        logits_seen.append(np.asarray(logits))
        return logits

    monkeypatch.setattr(moe.Router, "__call__", recording)
    batch = jnp.asarray(tokens(0))
    loss, metrics = next_token_loss(model, batch)
    assert len(logits_seen) == 2  # layers 0 and 2
    seen = logits_seen[:]  # (the forwards below record theirs too)
    logits_btv = np.asarray(model(batch[:, :-1]), np.float64)
    lse = np.log(np.sum(np.exp(logits_btv - logits_btv.max(-1, keepdims=True)), -1))
    lse += logits_btv.max(-1)
    labels = np.asarray(batch[:, 1:])
    ce = float(np.mean(lse - np.take_along_axis(logits_btv, labels[..., None], -1)[..., 0]))
    aux = transformers_aux(seen, config.experts_per_token)
    all_logits = np.concatenate(seen).astype(np.float64)
    z = float(np.mean(np.log(np.sum(np.exp(all_logits), -1)) ** 2))
    want = ce + 0.3 * aux + 0.01 * z
    print(
        f"loss {abs(float(loss) - want) / want:.1e} aux {abs(metrics['aux_loss'] - aux) / aux:.1e}"
    )
    assert abs(float(loss) - want) <= 1e-6 * want
    assert abs(float(metrics["lm_loss"]) - ce) <= 1e-6 * ce
    assert abs(float(metrics["aux_loss"]) - aux) <= 1e-6 * aux
    assert abs(float(metrics["z_loss"]) - z) <= 1e-6 * z
    chosen = [np.argsort(-lg, axis=-1)[:, :2] for lg in seen]  # (N, k) per layer
    load = sum(np.bincount(c.ravel(), minlength=8) for c in chosen) / 2  # per sparse layer
    assert float(metrics["expert_load_max"]) == load.max()
    assert float(metrics["expert_load_mean"]) == B * T * 2 / 8
    assert float(metrics["expert_load_ratio"]) == pytest.approx(load.max() / load.mean())
    if capacity_factor is None:
        assert "dropped_pairs" not in metrics
    else:  # capacity ceil(1.0 * 256 * 2 / 8) = 64 pairs per expert per layer
        dropped = sum(np.maximum(np.bincount(c.ravel(), minlength=8) - 64, 0) for c in chosen)
        assert float(metrics["dropped_pairs"]) == dropped.sum() > 0
        assert float(metrics["dropped_fraction"]) == pytest.approx(dropped.sum() / (2 * 512))
    # perplexity's loss is the cross-entropy alone
    assert abs(float(lm_loss(model, batch)) - ce) <= 1e-6 * ce


def test_a_dense_model_s_step_is_the_cross_entropy_alone():
    """No metrics, no stats: the dense program is the one before experts (its StableHLO was
    checked identical before/after this change, docs/moe.md)."""
    model = Llama(PRESETS["tiny"], rngs=nnx.Rngs(0))
    out = LlamaTask().training_step(model, jnp.asarray(tokens(0)))
    assert isinstance(out, jax.Array) and out.shape == ()


def adam_mu_grads(opt_state) -> object:
    """The gradient of a first AdamW step: mu / (1 - b1)."""
    (adam,) = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    return jax.tree.map(lambda mu: np.asarray(mu, np.float64) / 0.1, adam.mu)


# Each case covers several features at once (CI's time): plain tensor 8 and 2 x 4 are in
# tests/parallel/test_experts.py and test_moe_expert_parallel.py; fsdp without accumulation
# in the fsdp-accumulate2 case here (the same program, one micro-batch fewer).
MESHES = {  # (data, tensor, fsdp, scan_layers, accumulate, capacity_factor)
    "tensor8-unrolled-mixed": (1, 8, False, False, 1, None),
    # per step: each data rank runs its rows alone (a vmap over the ranks), the routing
    # counts psummed over them (batch_total)
    "2x4-unrolled-mixed-accumulate2": (2, 4, False, False, 2, None),
    # per micro-batch (fsdp's default): the global micro-batch, no per-rank loop
    "2x4-fsdp-accumulate2": (2, 4, True, True, 2, None),
    # per step with a capacity: 4 = E / k never drops, so the step is the dropless one's
    "2x4-per-step-capacity-accumulate2": (2, 4, False, True, 2, 4.0),
    # F split (experts fewer than the tensor size): tests/parallel/test_experts.py
}


@pytest.mark.parametrize("name", MESHES)
def test_train_step_gradients_on_meshes_equal_one_device(name):
    """One optimizer step's gradient (Adam's mu / 0.1) on the mesh vs jax.grad on one device
    of the mean over micro-batches of each one's own loss (CE + its aux term)."""
    data, tensor, fsdp, scan, k, capacity_factor = MESHES[name]
    config = LlamaTaskConfig(
        preset="tiny-moe",
        fsdp=fsdp,
        scan_layers=scan,
        batch_size=B,
        router_z_loss_coef=0.01,
        capacity_factor=capacity_factor,
    )
    shapes = LlamaTask(config).shapes
    if not scan:  # unrolled with a dense layer first
        shapes = dataclasses.replace(shapes, n_layers=3, moe_layers=(False, True))
    if "4-experts" in name:
        shapes = dataclasses.replace(shapes, n_experts=4)
    task = LlamaTask(config, model_config=shapes)
    strategy = jtp.ModelParallelStrategy(data, tensor, fsdp=fsdp)
    options = TrainerOptions(accumulate_grad_batches=k)
    state, rules = build_state(task, strategy, options)
    experts = task.plan.styles["layers.*.feed_forward.experts"].specs["w1"]
    assert experts == (P(None, None, "tensor") if "4-experts" in name else P("tensor", None, None))
    if k > 1:  # per step: the rows of each data rank alone, their counts psummed
        reduce = options.grad_reduce_for(fsdp=fsdp)
        assert reduce == ("per_micro_batch" if fsdp else "per_step")
    step = train_step(task, state, options, fsdp=fsdp)
    rows = [tokens(i) for i in range(k)]
    batches = [jtp.shard_batch(r, strategy.mesh) for r in rows]
    compiled = compile_train_step(step, state, batches, rules)
    _, opt_state, _, metrics = compiled(*state.arrays(), batches)
    got = adam_mu_grads(opt_state)

    model = Llama(task.shapes, rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p):
        outs = [next_token_loss(nnx.merge(graphdef, p), jnp.asarray(r)) for r in rows]
        return sum(o[0] for o in outs) / k, [o[1] for o in outs]

    (loss, ref_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    err = rel_err(got, grads)
    print(f"{name}: gradient rel err {err:.2e}")
    assert err < GRAD_TOL
    for key in ("expert_load_max", "expert_load_ratio", "aux_loss", "lm_loss"):
        want = np.mean([float(m[key]) for m in ref_metrics])
        assert abs(float(metrics[key]) - want) <= 1e-5 * abs(want), key
    assert float(metrics["expert_load_max"]) == np.mean(
        [float(m["expert_load_max"]) for m in ref_metrics]
    )  # the same routing
    assert abs(float(metrics["loss"]) - float(loss)) <= 1e-5 * float(loss)


def aux_losses(coef: float, steps: int = 16) -> list[float]:
    """The load-balancing loss at each of ``steps`` Adam steps (lr 1e-2) of the tiny MoE
    from a sharp, skewed routing (router kernels x 8, plus a ramp over the experts)."""
    config = dataclasses.replace(PRESETS["tiny-moe"], router_aux_loss_coef=coef)
    model = Llama(config, rngs=nnx.Rngs(0))
    kernel = model.layers.feed_forward.router.kernel
    kernel.set_value(kernel.get_value() * 8 + jnp.linspace(0, 2, 8))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-2)
    rows = jnp.asarray(tokens(0))

    @jax.jit
    def step(p, opt):
        def loss_fn(p):
            return next_token_loss(nnx.merge(graphdef, p), rows)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, metrics["aux_loss"]

    opt, out = tx.init(params), []
    for _ in range(steps):
        params, opt, aux = step(params, opt)
        out.append(float(aux))
    return out


def test_a_large_aux_coefficient_balances_the_experts():
    """Sanity only (the proof is the hand computation and the gradients above): with
    coefficient 1 the loss falls towards k = 2 (a perfect balance); with 0 it does not
    (seen: 2.17 -> 2.04 with 1, 2.17 -> 2.50 with 0)."""
    on, off = aux_losses(1.0), aux_losses(0.0)
    assert on[0] == off[0] > 2.1
    assert np.mean(on[-4:]) < on[0] - 0.08 and np.mean(on[-4:]) < np.mean(off[-4:]) - 0.2


def test_the_cli_trains_a_moe_preset_and_records_router_metrics_per_step(tmp_path):
    """``jtp train --preset tiny-moe`` with a capacity factor and the loss coefficients: the
    router metrics of every step in --metrics-json and in the CSV log."""
    from jtp.cli.train import main

    out = tmp_path / "m.json"
    argv = [
        "--devices", "8", "--model", "llama", "--preset", "tiny-moe",
        "--data-parallel", "2", "--tensor-parallel", "4", "--max-steps", "3",
        "--router-aux-loss-coef", "0.01", "--router-z-loss-coef", "0.001",
        "--capacity-factor", "1.0", "--no-progress", "--metrics-json", str(out),
        "--default-root-dir", str(tmp_path / "runs"), "--log-every-n-steps", "1",
    ]  # fmt: skip
    main(argv)
    router = json.loads(out.read_text())["router"]
    assert set(router) == {
        "lm_loss", "aux_loss", "z_loss", "expert_load_max", "expert_load_mean",
        "expert_load_ratio", "dropped_pairs", "dropped_fraction",
    }  # fmt: skip
    assert all(len(v) == 3 for v in router.values())
    assert all(a >= 2 - 1e-4 for a in router["aux_loss"])  # k at a perfect balance
    assert all(0 < f < 1 for f in router["dropped_fraction"])  # capacity 1: some dropped
    (csv,) = (tmp_path / "runs").rglob("metrics.csv")
    header = csv.read_text().splitlines()[0].split(",")
    assert set(router) <= set(header)


def test_moe_options_on_a_dense_model_are_refused():
    with pytest.raises(ValueError, match="--capacity-factor: the model has no experts"):
        LlamaTask(LlamaTaskConfig(preset="tiny", capacity_factor=1.0))
    task = LlamaTask(LlamaTaskConfig(preset="tiny-moe", router_aux_loss_coef=0.5))
    assert task.shapes.router_aux_loss_coef == 0.5 and task.shapes.capacity_factor is None


def test_a_bf16_moe_step_multiplies_in_bf16_and_routes_in_float32():
    """Under bf16-mixed the placed MoE step's matmuls (the experts' grouped ones inside
    the placement's shard_map included) are bf16 but for the router's, which stays
    float32 by design (jtp.models.moe): >= 95% of the step's matmul FLOPs in bf16, read
    from the traced program, and float32 FLOPs no more than the routers' (2 D E per token
    and layer, forward and two backward products)."""
    from jtp.analysis.dtypes import dot_flops_by_dtype
    from jtp.recipes.llama import trace_llama_step

    task = LlamaTaskConfig(preset="tiny-moe", seq_len=32, batch_size=8)
    traced, _ = trace_llama_step(task, (2, 4), jax.devices(), precision="bf16-mixed")
    flops = dot_flops_by_dtype(traced.jaxpr)
    assert flops["bfloat16"] / sum(flops.values()) >= 0.95, flops
    c = PRESETS["tiny-moe"]
    router = 3 * 2 * (8 * 32) * c.dim * c.n_experts * c.n_layers
    assert flops.get("float32", 0.0) <= router, flops
