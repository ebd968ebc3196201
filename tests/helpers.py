"""Shared test fixtures: a user-style nested model, the seed plan, reference comparisons."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import jtp
from jtp.parallel.context import balanced_order
from jtp.parallel.names import path_str
from jtp.parallel.stacked import stacked_name

FF_PLAN = {"w1": jtp.ColwiseParallel(), "w2": jtp.RowwiseParallel(), "w3": jtp.ColwiseParallel()}


class Block(nnx.Module):
    """A pre-norm residual MLP with biases, the way users write them."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


class TinyLM(nnx.Module):
    """Embed -> blocks -> head; biases everywhere a user would put them."""

    def __init__(self, vocab: int = 32, dim: int = 16, depth: int = 2, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, rngs=rngs) for _ in range(depth)])
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens_bt):
        x_btd = self.embed(tokens_bt)
        for block in self.blocks:
            x_btd = block(x_btd)
        return self.head(x_btd)  # (B, T, vocab)


LM_PLAN = {
    "embed": jtp.RowwiseParallel(),
    "blocks.*.up": jtp.ColwiseParallel(),
    "blocks.*.down": jtp.RowwiseParallel(),
    "head": jtp.ColwiseParallel(),
}


def ff_factory(dim: int = 16, hidden: int = 64):
    return lambda: jtp.models.FeedForward(dim, hidden, rngs=nnx.Rngs(0))


def lm_factory():
    return lambda: TinyLM(rngs=nnx.Rngs(0))


def ff_loss(model, batch):
    x, y = batch
    out = model(x)
    return jnp.mean((out - y) ** 2), out


def lm_loss(model, batch):
    tokens, labels = batch
    logits = model(tokens)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, logits


def ff_batch(batch: int = 8, dim: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, dim), dtype=np.float32),
        rng.standard_normal((batch, dim), dtype=np.float32),
    )


def lm_batch(batch: int = 8, seq: int = 8, vocab: int = 32, seed: int = 1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def rel_err(a, b) -> float:
    """Norm-relative error ||a - b|| / ||b|| over a whole pytree."""
    la = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(la, lb, strict=True))
    den = sum(float(np.sum(y**2)) for y in lb)
    return float(np.sqrt(num / max(den, 1e-30)))  # 1e-30: only guards an all-zero reference


def delta(after, before):
    """``after - before`` leaf by leaf, on the host (a parameter update)."""
    return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), after, before)


def flat(tree) -> np.ndarray:
    """Every element of a pytree, in leaf order, as one float64 vector."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


# The parity tests' optimizers and tolerances (docs/testing.md, "How tolerances are chosen").
LR = 1e-2
ADAM_EPS = 1e-8  # optax.adamw's default
# Sharded vs unsharded gradients, norm-relative. fp32 (eps 1.2e-7) sums of up to a few
# thousand terms in another order (per-shard partial sums all-reduced over "tensor", the batch
# reduced over "data") move each result by a few ulps: seen <= 1.4e-6 on every model here, on
# AVX-512, AVX2 and SSE4.2 code alike.
GRAD_TOL = 1e-5
F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23


def adamw() -> optax.GradientTransformation:
    return optax.adamw(LR, eps=ADAM_EPS)


def momentum_sgd() -> optax.GradientTransformation:
    """Two steps move p by -lr (1.9 g1 + g2): linear in the gradients, so the update after
    several steps inherits their tolerance (AdamW's does not: assert_adamw_step_matches)."""
    return optax.sgd(LR, momentum=0.9)


def grad_fn(graphdef, loss_fn):
    """(params, batch) -> (loss, output, gradients) over the pure params State."""

    def fwd_grad(params, batch):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p), batch)

        (loss, out), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss, out, grads

    return fwd_grad


def make_fns(graphdef, loss_fn):
    """(adamw_step, sgd_steps) over the pure params State.

    ``adamw_step(params, opt_state, batch)`` -> loss, output, gradients, params and opt_state
    after one AdamW step taken from those very gradients (one program, so the gradients
    compared are the ones applied). ``sgd_steps(params, opt_state, batch)`` -> params and
    opt_state after two momentum-SGD steps (the state carried from one step to the next)."""
    fwd_grad, adam, sgd = grad_fn(graphdef, loss_fn), adamw(), momentum_sgd()

    def adamw_step(params, opt_state, batch):
        loss, out, grads = fwd_grad(params, batch)
        updates, opt_state = adam.update(grads, opt_state, params)
        return loss, out, grads, optax.apply_updates(params, updates), opt_state

    def sgd_steps(params, opt_state, batch):
        for _ in range(2):
            _, _, grads = fwd_grad(params, batch)
            updates, opt_state = sgd.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state

    return adamw_step, sgd_steps


def assert_adamw_step_matches(got, ref, *, lr: float = LR, grad_tol: float = GRAD_TOL):
    """One AdamW step from zero moments, sharded (``got``) vs unsharded (``ref``): dicts of
    ``params`` (before the step), ``grads``, ``new`` (params after) and ``adam`` (the
    ``ScaleByAdamState`` after). Compares what the gradients determine, and only that:

    - the gradients, norm-relative within ``grad_tol``;
    - mu = (1 - b1) g and sqrt(nu) = sqrt(1 - b2) |g|: one or two roundings away from the
      gradients, and ||g| - |g'|| <= |g - g'|, so both within ``grad_tol`` too;
    - the update -lr (g / (|g| + eps) + wd p), which is ~ -lr sign(g): where a gradient is
      within rounding noise of zero its sign is not determined (another summation order,
      another instruction set) and the two updates may differ by 2 lr. Every element obeys
      |g_i - g'_i| <= ||g - g'||_2 < grad_tol ||g||_2 = tau / 2, so where |g_i| > tau both
      have the same sign and |g'_i| > tau / 2: there g / (|g| + eps) differs by at most
      eps / tau, and the updates by lr eps / tau plus the fp32 rounding of the update and of
      p + u, F32_EPS (|p| + 16 lr). Exact-zero gradients on both sides (embedding rows no
      token uses) give exactly -lr wd p and are compared too. At least 95% of the elements
      must be so determined, so the check never passes by checking nothing.
    """
    assert rel_err(got["grads"], ref["grads"]) < grad_tol
    assert rel_err(got["adam"].mu, ref["adam"].mu) < grad_tol
    root = lambda t: jax.tree.map(lambda v: np.sqrt(np.asarray(v, np.float64)), t)  # noqa: E731
    assert rel_err(root(got["adam"].nu), root(ref["adam"].nu)) < grad_tol
    g, g_got = flat(ref["grads"]), flat(got["grads"])
    tau = 2 * grad_tol * float(np.linalg.norm(g))
    sure = (np.abs(g) > tau) | ((g == 0) & (g_got == 0))
    assert sure.mean() > 0.95, f"only {sure.mean():.1%} of the elements are determined"
    diff = np.abs(flat(delta(got["new"], got["params"])) - flat(delta(ref["new"], ref["params"])))
    bound = lr * ADAM_EPS / tau + F32_EPS * (np.abs(flat(ref["params"])) + 16 * lr)
    bad = np.flatnonzero(sure & (diff > bound))
    assert not bad.size, (
        f"{bad.size} determined update elements differ: first at flat index {bad[0]}, "
        f"|g| {abs(g[bad[0]]):.3e} > tau {tau:.3e}, diff {diff[bad[0]]:.3e} > {bound[bad[0]]:.3e}"
    )


def assert_sgd_steps_match(got, ref, *, steps: int = 2, grad_tol: float = GRAD_TOL):
    """``steps`` momentum-SGD steps, sharded (``got``) vs unsharded (``ref``): dicts of
    ``params`` (before), ``new`` (after) and ``trace`` (the momentum after). Both are sums of
    gradients, so they inherit the gradients' tolerance:

    - the momentum, sum_t 0.9**(steps - t) g_t with each g_t taken at the parameters the
      previous steps made (a state carried wrongly or a step not applied moves it by
      percents), within ``grad_tol``;
    - the update p_steps - p_0 within ``grad_tol`` of its norm, plus the fp32 rounding of
      p + u at every step on each side (<= 2**-24 |p| per element and step: steps * F32_EPS
      * ||p|| in all), which dominates when lr |g| is far below |p|.
    """
    assert rel_err(got["trace"], ref["trace"]) < grad_tol
    u, u_ref = flat(delta(got["new"], got["params"])), flat(delta(ref["new"], ref["params"]))
    rounding = steps * F32_EPS * float(np.linalg.norm(flat(ref["params"])))
    assert np.linalg.norm(u - u_ref) < grad_tol * np.linalg.norm(u_ref) + rounding


class Mixer(nnx.Module):
    """A user's own layer from raw ``nnx.Param``s: no built-in style knows it."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.w_in = nnx.Param(init(rngs.params(), (dim, hidden)))  # (D, H)
        self.b_in = nnx.Param(nnx.initializers.normal(0.1)(rngs.params(), (hidden,)))  # (H,)
        self.w_out = nnx.Param(init(rngs.params(), (hidden, dim)))  # (H, D)

    def __call__(self, x_btd):
        h_bth = nnx.gelu(x_btd @ self.w_in[...] + self.b_in[...])
        return h_bth @ self.w_out[...]  # (B, T, D)


class MixedBlock(nnx.Module):
    """Every parameterised stock Flax layer in column -> row pairs, each pair a residual
    branch: attention (LinearGeneral), an Einsum pair, a LoRALinear feeding a Linear, a Conv
    pair and a raw-Param ``Mixer``. Five pairs, so five all-reduces in the forward."""

    def __init__(self, dim=16, heads=8, hidden=32, rank=4, *, rngs: nnx.Rngs):
        head_dim = hidden // heads
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.e_up = nnx.Einsum(
            "btd,dnh->btnh", (dim, heads, head_dim), (heads, head_dim), rngs=rngs
        )
        self.e_down = nnx.Einsum("btnh,nhd->btd", (heads, head_dim, dim), (dim,), rngs=rngs)
        # lora_b is zero at init by default, which would zero lora_a's gradient: not a test.
        b_init = nnx.initializers.normal(0.1)
        self.lora_up = nnx.LoRALinear(dim, hidden, lora_rank=rank, b_initializer=b_init, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, rngs=rngs)
        self.conv_up = nnx.Conv(dim, hidden, kernel_size=3, rngs=rngs)
        self.conv_down = nnx.Conv(hidden, dim, kernel_size=3, rngs=rngs)
        self.mixer = Mixer(dim, hidden, rngs=rngs)

    def __call__(self, x_btd):
        x_btd = x_btd + self.attn(self.norm(x_btd))
        x_btd = x_btd + self.e_down(nnx.gelu(self.e_up(x_btd)))  # via (B, T, heads, head_dim)
        x_btd = x_btd + self.down(nnx.gelu(self.lora_up(x_btd)))
        x_btd = x_btd + self.conv_down(nnx.gelu(self.conv_up(x_btd)))  # 1-D conv over T
        return x_btd + self.mixer(x_btd)


_C, _R = jtp.ColwiseParallel(), jtp.RowwiseParallel()
MIXED_PLAN = {
    "attn.query": _C,
    "attn.key": _C,
    "attn.value": _C,
    "attn.out": _R,
    "e_up": _C,
    "e_down": _R,
    "lora_up": _C,
    "down": _R,
    "conv_up": _C,
    "conv_down": _R,
    "mixer": jtp.ParamSharding(
        {"w_in": P(None, jtp.TENSOR), "b_in": P(jtp.TENSOR), "w_out": P(jtp.TENSOR, None)}
    ),
}


def mixed_factory():
    return lambda: MixedBlock(rngs=nnx.Rngs(0))


mixed_loss = ff_loss  # the same regression loss: mean squared error, and the output


def mixed_batch(batch: int = 4, seq: int = 8, dim: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, seq, dim), dtype=np.float32),
        rng.standard_normal((batch, seq, dim), dtype=np.float32),
    )


@contextlib.contextmanager
def backend_compiles() -> Iterator[list[str]]:
    """A list that gains one entry per program XLA compiles inside the ``with`` block (jax's
    own compile events: what "compiled nothing" or "compiled once" is read off)."""
    events: list[str] = []

    def listener(event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def unrolled_copy(model: jtp.models.Llama) -> jtp.models.Llama:
    """An unrolled decoder holding the scanned ``model``'s weights (layer i: slice i)."""
    config = dataclasses.replace(model.config, scan_layers=False)
    out = nnx.eval_shape(lambda: jtp.models.Llama(config, rngs=nnx.Rngs(0)))
    stacked = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    updates = []
    for p, var in nnx.to_flat_state(nnx.state(out)):
        found = stacked_name(path_str(p), stacked)
        value = stacked[found[0]][found[1]] if found else stacked[path_str(p)]
        updates.append((p, var.replace(value)))
    nnx.update(out, nnx.from_flat_state(updates))
    return out


def pieces_logits(model, mesh, tokens_bt, sp=False):
    """The logits of ``tokens_bt`` (B, T) computed in the balanced order of ``mesh``'s
    context size, returned in order, and the sharding they left the forward with."""
    order_t = balanced_order(tokens_bt.shape[1], jtp.mesh.context_size(mesh))
    positions_bt = np.broadcast_to(order_t, tokens_bt.shape).astype(np.int32)
    batch = jtp.shard_batch({"tokens": tokens_bt[:, order_t], "positions": positions_bt}, mesh)
    plan = jtp.plans.llama(model.config, sequence_parallel=sp, mesh=mesh)
    graphdef, state = nnx.split(model)

    def forward(state, batch):
        return nnx.merge(graphdef, state)(batch["tokens"], positions_bt=batch["positions"])

    with jtp.activation_rules(mesh, plan.activations):
        out_btv = jax.jit(forward)(state, batch)
    logits_btv = np.empty(out_btv.shape, np.float32)
    logits_btv[:, order_t] = np.asarray(out_btv)  # piece order -> sequence order
    return logits_btv, out_btv.sharding


def fit_once(strategy: jtp.ModelParallelStrategy, task: jtp.TrainModule, **trainer_kwargs):
    """A quiet Trainer after one step of ``task``: the compiled step and the peak memory the
    planner's figures are compared with (``accumulate_grad_batches`` and the like pass on)."""
    trainer = jtp.Trainer(
        strategy,
        max_steps=1,
        logger=None,
        enable_progress_bar=False,
        report_memory=False,
        **trainer_kwargs,
    )
    trainer.fit(task)
    return trainer
