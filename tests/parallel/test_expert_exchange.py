"""The expert-parallel token exchange (jtp.parallel.expert_exchange) against one device.

Under ``jax.shard_map`` on meshes with an "expert" axis of 2, 4 and 8 (with and without
"tensor"), each device's tokens go through experts held elsewhere; outputs and gradients
must be those of the one-device MoE computation (:class:`jtp.models.moe.MoEFeedForward`'s
own forward, and the same computation written as a function for the gradients).

Tolerance: 2e-6 of the largest |value| (outputs and each gradient). The exchange moves rows
(exact) and the grouped matmuls see the same rows and weights; what may differ is the order
of fp32 sums: the tensor split of F sums two or four partial products with one psum, and
XLA:CPU's dot kernels may block a row's D- or F-long sum differently for other row counts
(AVX2 and AVX-512 kernels alike: both accumulate in fp32 with at most F = 32 terms per sum,
so the worst case is ~32 * 6e-8 = 2e-6 of the terms' magnitude; the weight gradients sum a
device's ~16 pairs per expert, then the devices' sums in another order, as few terms). Seen:
<= 2.5e-7 over outputs and all gradients on every mesh here, the same with AVX-512 and with
XLA_FLAGS=--xla_cpu_max_isa=AVX2.
Routing is computed once and passed to both sides, so no near-tie can choose differently.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jtp
from jtp.analysis.collectives import collectives
from jtp.models.feedforward import ACTIVATIONS
from jtp.models.moe import MoEFeedForward, capacity, combine_outputs, route
from jtp.parallel import expert_exchange
from jtp.parallel.expert_exchange import exchange

D, F, E, K, N = 16, 32, 8, 2, 64  # N: global tokens
TOL = 2e-6
MESHES = {
    "e2": dict(expert=2),  # data 4
    "e4": dict(expert=4),  # data 2
    "e8": dict(expert=8),
    "e2t4": dict(expert=2, tensor=4),
    "e4t2": dict(expert=4, tensor=2),
    "d2e2t2": dict(data=2, expert=2, tensor=2),
}


def swiglu(x_md, group_sizes, w1, w2, w3):
    """Experts.grouped with the weights as arguments."""
    gate_mf = jax.lax.ragged_dot(x_md, w1, group_sizes)
    up_mf = jax.lax.ragged_dot(x_md, w3, group_sizes)
    return jax.lax.ragged_dot(ACTIVATIONS["silu"](gate_mf) * up_mf, w2, group_sizes)


def _combine(moe):
    return partial(combine_outputs, gating=moe.gating)


def _setup(capacity_factor=None, seed=1):
    moe = MoEFeedForward(D, F, E, K, rngs=nnx.Rngs(0), capacity_factor=capacity_factor)
    x = jax.random.normal(jax.random.key(seed), (N, D), jnp.float32)
    weights, experts, *_ = route(moe.router(x), K, moe.gating, moe.norm_topk_prob)
    ws = tuple(getattr(moe.experts, w).get_value() for w in ("w1", "w2", "w3"))
    return moe, x, weights, experts, ws


def reference(x, weights, experts, w1, w2, w3, combine):
    """The one-device dropless MoE (MoEFeedForward.__call__ after routing) as a function."""
    m = x.shape[0] * K
    expert_m = experts.reshape(m)
    order = jnp.argsort(expert_m, stable=True)
    y_sorted = swiglu(x[order // K], jnp.bincount(expert_m, length=E), w1, w2, w3)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(m))
    return combine(y_sorted[inverse].reshape(-1, K, D), weights)


def sharded(mesh, combine, **kw):
    """(x, weights, experts, w1, w2, w3) -> (y, dropped) under shard_map: tokens over the
    batch axes, experts over "expert", F over "tensor" (partial outputs psum'd)."""
    b = jtp.mesh.batch_axes(mesh)

    def body(x, weights, experts, w1, w2, w3):
        y, dropped = exchange(
            *(x, weights, experts, w1, w2, w3),
            grouped=swiglu,
            combine=combine,
            axis="expert",
            n_experts=E,
            **kw,
        )
        return jax.lax.psum(y, "tensor"), jax.lax.psum(dropped, "data")

    col, row = P("expert", None, "tensor"), P("expert", "tensor", None)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(P(b), P(b), P(b), col, row, col), out_specs=(P(b), P())
    )


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check_values_and_grads(mesh, **kw):
    moe, x, weights, experts, ws = _setup()
    y_ref = moe(x[None])[0][0]  # the model's own forward
    ref = partial(reference, combine=_combine(moe))
    assert _err(ref(x, weights, experts, *ws), y_ref) < 1e-7
    f = sharded(mesh, _combine(moe), **kw)
    y, dropped = jax.jit(f)(x, weights, experts, *ws)
    assert int(dropped) == 0
    errors = {"y": _err(y, y_ref)}
    r = jax.random.normal(jax.random.key(2), (N, D))
    args = (0, 1, 3, 4, 5)  # x, routing weights, w1, w2, w3
    got = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0] * r), args))(x, weights, experts, *ws)
    want = jax.grad(lambda *a: jnp.sum(ref(*a) * r), args)(x, weights, experts, *ws)
    for name, g, w in zip(("x", "weights", "w1", "w2", "w3"), got, want, strict=True):
        errors["d" + name] = _err(g, w)
    assert max(errors.values()) < TOL, errors
    return errors


@pytest.mark.parametrize("shape", list(MESHES.values()), ids=list(MESHES))
def test_padded_exchange_matches_one_device(shape):
    _check_values_and_grads(jtp.make_mesh(**shape), ragged=False)


def _emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """ragged_all_to_all's documented semantics from all-gathers (XLA:CPU has no thunk
    for it): lets the CPU suite check the offsets the ragged path computes."""
    del recv_sizes  # implied by the senders' send_sizes
    me = jax.lax.axis_index(axis_name)
    rows_s = jax.lax.all_gather(operand, axis_name)  # (X, M_in, ...)
    take = lambda a: jax.lax.all_gather(a, axis_name)[:, me]  # noqa: E731  (X,) for me
    start_s, size_s, at_s = take(input_offsets), take(send_sizes), take(output_offsets)
    r = jnp.arange(output.shape[0])
    for s in range(rows_s.shape[0]):
        i = r - at_s[s]
        hit = (i >= 0) & (i < size_s[s])
        src = jnp.clip(start_s[s] + i, 0, operand.shape[0] - 1)
        output = jnp.where(hit[:, None], rows_s[s][src], output)
    return output


@pytest.mark.parametrize("shape", [MESHES["e8"], MESHES["e4t2"], MESHES["d2e2t2"]])
def test_ragged_offsets_match_one_device_with_an_emulated_collective(shape, monkeypatch):
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
    _check_values_and_grads(jtp.make_mesh(**shape), ragged=True)


def _expert_groups(mesh):
    """Device positions grouped along "expert" (the all-to-alls' replica groups)."""
    ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    x = mesh.axis_names.index("expert")
    return sorted(tuple(sorted(g)) for g in np.moveaxis(ids, x, -1).reshape(-1, ids.shape[x]))


@pytest.mark.parametrize("shape", list(MESHES.values()), ids=list(MESHES))
def test_compiled_exchange_is_two_all_to_alls_over_expert(shape):
    """Forward: exactly two all-to-alls, over "expert", each of X buffers of M rows (padded:
    X * M * D * 4 bytes per device), replica groups the expert groups; over "expert"
    besides them only the (X, E) int32 counts are all-gathered: no weight is gathered.
    Forward + backward: four all-to-alls, still no weight gathered."""
    mesh = jtp.make_mesh(**shape)
    moe, x, weights, experts, ws = _setup()
    f = sharded(mesh, _combine(moe), ragged=False)
    compiled = jax.jit(f).lower(x, weights, experts, *ws).compile()
    records = collectives(compiled, mesh)
    a2a = [c for c in records if c.kind == "all-to-all"]
    x_size, m = mesh.shape["expert"], N // jtp.mesh.batch_ranks(mesh) * K
    assert len(a2a) == 2, records
    for c in a2a:
        assert c.axes == ("expert",) and c.dtype == "f32"
        assert sorted(tuple(sorted(g)) for g in c.groups) == _expert_groups(mesh)
        assert c.bytes == x_size * m * D * 4
    over_expert = [c for c in records if c.axes and "expert" in c.axes and c.kind != "all-to-all"]
    assert [(c.kind, c.dtype, c.shapes) for c in over_expert] == [
        ("all-gather", "s32", ((x_size, E),))
    ]
    r = jnp.ones((N, D))
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0] * r), (0, 1, 3, 4, 5)))
    records = collectives(grad.lower(x, weights, experts, *ws).compile(), mesh)
    assert sum(c.kind == "all-to-all" and c.axes == ("expert",) for c in records) == 4
    gathers = [c for c in records if c.kind == "all-gather" and "expert" in (c.axes or ())]
    assert all(c.dtype == "s32" for c in gathers), gathers


def test_ragged_choice_lowers_to_two_ragged_all_to_alls():
    """ragged=True (what a GPU or TPU gets by default) lowers, without compiling, to two
    ragged_all_to_all over the expert groups: the M = N_local * k pair rows (M, D) into a
    worst-case (X * M, D) buffer, and back; no plain all_to_all. ragged=None on CPU picks the
    padded exchange."""
    mesh = jtp.make_mesh(expert=4, tensor=2)
    moe, x, weights, experts, ws = _setup()
    text = jax.jit(sharded(mesh, _combine(moe), ragged=True)).lower(x, weights, experts, *ws)
    lines = [ln for ln in text.as_text().splitlines() if "ragged_all_to_all" in ln]
    m = N // jtp.mesh.batch_ranks(mesh) * K  # 32 pairs per device
    assert len(lines) == 2
    assert f"(tensor<{m}x{D}xf32>, tensor<{4 * m}x{D}xf32>," in lines[0]
    assert f"(tensor<{4 * m}x{D}xf32>, tensor<{m}x{D}xf32>," in lines[1]
    assert all("replica_groups = dense<[[0, 2, 4, 6], [1, 3, 5, 7]]>" in ln for ln in lines)
    assert "all_to_all" not in text.as_text().replace("ragged_all_to_all", "")
    default = jax.jit(sharded(mesh, _combine(moe))).lower(x, weights, experts, *ws).as_text()
    assert "ragged_all_to_all" not in default and "all_to_all" in default


@pytest.mark.parametrize("shape", [MESHES["e2"], MESHES["e8"], MESHES["d2e2t2"]])
def test_capacity_drops_match_the_model_on_each_devices_tokens(shape):
    """capacity_factor 1: each device's tokens fill at most C = capacity(N_local) slots of
    each expert (GShard's per-device capacity): outputs and the dropped count are the
    model's own with the same factor run on each batch shard alone; the all-to-alls move
    fixed (E * C, D) buffers."""
    mesh = jtp.make_mesh(**shape)
    moe, x, weights, experts, ws = _setup(capacity_factor=1.0)
    f = jax.jit(sharded(mesh, _combine(moe), capacity_factor=1.0))
    y, dropped = f(x, weights, experts, *ws)
    ranks = jtp.mesh.batch_ranks(mesh)
    per_rank = [moe(xs[None]) for xs in np.split(np.asarray(x), ranks)]
    y_ref = np.concatenate([np.asarray(out[0][0]) for out in per_rank])
    want = sum(int(out[1].dropped) for out in per_rank)
    assert want > 0 and int(dropped) == want
    assert _err(y, y_ref) < TOL
    c = capacity(N // ranks, K, E, 1.0)
    a2a = [r for r in collectives(f.lower(x, weights, experts, *ws).compile(), mesh)]
    a2a = [r for r in a2a if r.kind == "all-to-all"]
    assert len(a2a) == 2 and all(r.bytes == E * c * D * 4 for r in a2a)


def test_local_experts_must_divide():
    mesh = jtp.make_mesh(expert=4, tensor=2)
    moe, x, weights, experts, ws = _setup()

    def body(*args):
        kw = dict(grouped=swiglu, combine=_combine(moe), axis="expert", n_experts=2 * E)
        return exchange(*args, **kw)[0]

    b = ("data", "expert")
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(b),) * 3 + (P("expert"),) * 3, out_specs=P(b))
    with pytest.raises(
        ValueError, match="2 local experts x axis 'expert' of size 4 != n_experts 16"
    ):
        f(x, weights, experts, *ws)


def test_capacity_is_the_models():
    for n, k, e, f in [(32, 2, 8, 1.0), (7, 3, 8, 1.25), (1, 1, 64, 0.5), (64, 8, 128, 2.0)]:
        assert expert_exchange.capacity(n, k, e, f) == capacity(n, k, e, f)
