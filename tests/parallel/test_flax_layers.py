"""Column/row styles on every parameterised Flax layer, and ParamSharding, against the
unsharded model: same init, outputs, gradients, one AdamW update; golden specs and shard
shapes; the forward's collectives; every bad input.

Tolerances are norm-relative (||sharded - ref|| / ||ref||) over a whole pytree (why each
holds: docs/testing.md, "How tolerances are chosen"):
- Parameters right after init: 1e-7 (a few ulp). jax's threefry is partitionable, so each
  shard draws exactly the random *bits* the unsharded init gives it, but XLA:CPU compiles the
  bits -> normal transform (an ``erf_inv`` polynomial) for the shard's shape, and another loop
  shape may round the last bit differently (seen: 1 ulp in a few elements of the (16, 8, 4)
  Einsum kernel, 4.5e-9 over the model). A wrong slice or layout would be off by O(1).
- Outputs and gradients: 1e-5. fp32 has eps ~1.2e-7; the sharded program adds the same terms
  in another order (per-shard partial sums all-reduced over "tensor", the batch gradient
  reduced over "data"), which moves each result by a few ulps (seen <= 4.4e-7).
- One AdamW step: only what the gradients determine (``helpers.assert_adamw_step_matches``):
  Adam divides each gradient element by its own magnitude, so its first step is
  ~lr*sign(g), and the sign of a gradient within rounding noise of zero is not determined.
  The attention's key bias is such a gradient everywhere: adding it shifts every logit of a
  query by the same amount, which softmax cancels, so its exact gradient is zero and Adam's
  step for it is normalised rounding noise; it falls below the helper's threshold (its
  gradient is checked, and checked to be ~0).
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import (
    MIXED_PLAN,
    adamw,
    assert_adamw_step_matches,
    make_fns,
    mixed_batch,
    mixed_factory,
    mixed_loss,
    rel_err,
)
from jax.sharding import PartitionSpec as P

import jtp

T, N = "tensor", None
TP_SPECS = {
    "attn.query.kernel": P(N, T, N),  # (in, heads, head_dim): heads
    "attn.query.bias": P(T, N),
    "attn.out.kernel": P(T, N, N),  # (heads, head_dim, out): heads
    "attn.out.bias": P(N),
    "e_up.kernel": P(N, T, N),  # "btd,dnh->btnh": n, the first kernel dim reaching the output
    "e_up.bias": P(T, N),  # (n, h)
    "e_down.kernel": P(T, N, N),  # "btnh,nhd->btd": n, the first contracted kernel dim
    "e_down.bias": P(N),
    "lora_up.kernel": P(N, T),
    "lora_up.bias": P(T),
    "lora_up.lora.lora_a": P(N, N),  # (in, rank): replicated, x @ a needs no collective
    "lora_up.lora.lora_b": P(N, T),  # (rank, out): split like the kernel's output
    "down.kernel": P(T, N),
    "down.bias": P(N),
    "conv_up.kernel": P(N, N, T),  # (window, in, out): output channels
    "conv_up.bias": P(T),
    "conv_down.kernel": P(N, T, N),  # input channels
    "conv_down.bias": P(N),
    "mixer.w_in": P(N, T),
    "mixer.b_in": P(T),
    "mixer.w_out": P(T, N),
    "norm.scale": P(N),
    "norm.bias": P(N),
}
for _p in ("key", "value"):
    TP_SPECS[f"attn.{_p}.kernel"] = TP_SPECS["attn.query.kernel"]
    TP_SPECS[f"attn.{_p}.bias"] = TP_SPECS["attn.query.bias"]
D = "data"
FSDP_SPECS = TP_SPECS | {
    "attn.query.kernel": P(D, T, N),  # natural: the first input axis
    "attn.key.kernel": P(D, T, N),
    "attn.value.kernel": P(D, T, N),
    "attn.out.kernel": P(T, N, D),  # natural: the first output axis
    "attn.out.bias": P(D),  # unplanned rule (replicated on purpose)
    "e_up.kernel": P(D, T, N),  # natural: the first contracted dim
    "e_down.kernel": P(T, N, D),  # natural: the first output dim
    "e_down.bias": P(D),
    "lora_up.kernel": P(D, T),
    "lora_up.lora.lora_a": P(D, N),  # no natural choice: largest divisible dim
    "lora_up.lora.lora_b": P(D, T),  # the only remaining dim, rank 4 % 2 == 0
    "down.kernel": P(T, D),
    "down.bias": P(D),
    "conv_up.kernel": P(N, D, T),
    "conv_down.kernel": P(N, T, D),
    "conv_down.bias": P(D),
    "mixer.w_in": P(D, T),  # ParamSharding + fsdp: largest remaining divisible dim
    "mixer.w_out": P(T, D),
    "norm.scale": P(D),
    "norm.bias": P(D),
}
# (mesh, fsdp, how the model gets there): an existing model resharded, or born sharded (one
# case: compiling the initialiser is the slowest step here, and its mechanism is shared)
CASES = {
    "1x8": ((1, 8), False, "parallelize"),
    "2x4": ((2, 4), False, "parallelize"),
    "2x4-fsdp": ((2, 4), True, "sharded_init"),
}


def _flat(state):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _expected_shard(shape, spec, mesh):
    return tuple(
        n // math.prod(mesh.shape[a] for a in ((e,) if isinstance(e, str) else e or ()))
        for n, e in zip(shape, spec, strict=True)
    )


_REF: dict = {}


def _reference():
    if not _REF:
        graphdef, params = nnx.split(mixed_factory()(), nnx.Param)
        adamw_step, _ = make_fns(graphdef, mixed_loss)
        _, out, grads, new, opt = jax.jit(adamw_step)(params, adamw().init(params), mixed_batch())
        _REF.update(params=params, out=out, grads=grads, new=new, adam=opt[0])
    return _REF


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_layers_match_unsharded(case):
    shape, fsdp, how = CASES[case]
    ref = _reference()
    mesh = jtp.make_mesh(*shape)
    if how == "sharded_init":
        model = jtp.sharded_init(mixed_factory(), mesh, MIXED_PLAN, fsdp=fsdp)
    else:
        model = jtp.parallelize(mixed_factory()(), mesh, MIXED_PLAN, fsdp=fsdp)
    graphdef, params = nnx.split(model, nnx.Param)
    assert rel_err(params, ref["params"]) < 1e-7, "sharded init must be the unsharded init"

    golden = FSDP_SPECS if fsdp else TP_SPECS
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
    assert set(flat) == set(golden)
    for name, arr in flat.items():
        assert arr.sharding.spec == golden[name], name
        assert arr.sharding.shard_shape(arr.shape) == _expected_shard(arr.shape, golden[name], mesh)
    if case == "1x8":  # one head per device, spelled out
        assert flat["attn.query.kernel"].sharding.shard_shape((16, 8, 2)) == (16, 1, 2)
        assert flat["conv_down.kernel"].sharding.shard_shape((3, 32, 16)) == (3, 4, 16)

    adamw_step, _ = make_fns(graphdef, mixed_loss)
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    out_sh = (None, None, param_sh, param_sh, jtp.opt_state_shardings(adamw(), params))
    batch = jtp.shard_batch(mixed_batch(), mesh)
    _, out, grads, new, opt = jax.jit(adamw_step, out_shardings=out_sh)(
        params, jtp.init_opt_state(adamw(), params), batch
    )
    assert rel_err(out, ref["out"]) < 1e-5  # seen <= 2.3e-7: see the module docstring
    peak = {k: np.abs(v).max() for k, v in _flat(grads).items()}
    # Zero in exact math (softmax is shift-invariant): what is left is fp32 rounding noise
    # (seen <= 2.7e-8), far below every other parameter's gradient (>= 0.16).
    assert peak.pop("attn.key.bias") < 1e-6
    assert min(peak.values()) > 1e-4, peak  # every other parameter learns (LoRA factors too)
    # Gradients within 1e-5, then mu, sqrt(nu) and the update where the gradients fix it.
    assert_adamw_step_matches(dict(params=params, grads=grads, new=new, adam=opt[0]), ref)


def _forward_collectives(factory, plan, x):
    mesh = jtp.make_mesh(1, 8)
    model = jtp.parallelize(factory(), mesh, plan)
    graphdef, state = nnx.split(model)
    x = jtp.shard_batch(x, mesh)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
    return jtp.collectives(compiled, mesh), model, x


def test_forward_costs_one_all_reduce_per_column_row_pair():
    """Five column -> row pairs at tensor=8: five all-reduces over "tensor", each of one
    (B, T, D) fp32 activation, and no other collective (the LoRA path and the ParamSharding
    module included)."""
    x, _ = mixed_batch()
    records, _, _ = _forward_collectives(mixed_factory(), MIXED_PLAN, x)
    assert [(r.kind, r.axes) for r in records] == [("all-reduce", ("tensor",))] * 5
    assert all(r.bytes == x.size * 4 for r in records), [r.bytes for r in records]


class LinearThenLoRA(nnx.Module):
    def __init__(self, *, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        b_init = nnx.initializers.normal(0.1)
        self.down = nnx.LoRALinear(32, 16, lora_rank=4, b_initializer=b_init, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


class Conv2DPair(nnx.Module):
    def __init__(self, *, rngs):
        self.up = nnx.Conv(4, 16, kernel_size=(3, 3), rngs=rngs)
        self.down = nnx.Conv(16, 4, kernel_size=(3, 3), rngs=rngs)

    def __call__(self, x_bhwc):
        return self.down(nnx.relu(self.up(x_bhwc)))


@pytest.mark.parametrize(
    "name,factory,x,specs",
    [
        (
            "row LoRALinear",
            lambda: LinearThenLoRA(rngs=nnx.Rngs(0)),
            np.ones((2, 3, 16), np.float32),
            {"down.lora.lora_a": P(T, N), "down.lora.lora_b": P(N, N), "down.kernel": P(T, N)},
        ),
        (
            "2-D conv",
            lambda: Conv2DPair(rngs=nnx.Rngs(0)),
            np.linspace(-1, 1, 2 * 5 * 5 * 4, dtype=np.float32).reshape(2, 5, 5, 4),
            {"up.kernel": P(N, N, N, T), "down.kernel": P(N, N, T, N), "up.bias": P(T)},
        ),
    ],
)
def test_row_lora_and_conv2d_pairs(name, factory, x, specs):
    """A row LoRALinear: lora_a splits on the split input, so x @ a is a (.., rank) partial
    sum that XLA reduces in the same all-reduce as the base kernel's partial sums (one op
    holding both buffers): the LoRA path adds no collective. A 2-D conv pair: one all-reduce."""
    plan = {"up": jtp.ColwiseParallel(), "down": jtp.RowwiseParallel()}
    records, model, xs = _forward_collectives(factory, plan, x)
    assert [(r.kind, r.axes) for r in records] == [("all-reduce", ("tensor",))], name
    got = {p.path: p.spec for p in jtp.resolve(model, jtp.make_mesh(1, 8), plan)}
    assert {k: got[k] for k in specs} == specs
    ref = factory()(x)
    # fp32 partial sums over the split input, all-reduced: a few ulps of outputs of size ~1;
    # atol for outputs near zero, where ulps of the summands, not of the sum, count.
    np.testing.assert_allclose(np.asarray(model(xs)), np.asarray(ref), rtol=1e-5, atol=1e-6)
