"""Golden PartitionSpecs of every Flax layer variant under both styles (and fsdp), ParamSharding,
and every bad input: each a ValueError naming key, parameter, shape and axis, before compile.
All of it is shape work on abstract models (``nnx.eval_shape``): nothing is allocated."""

import jax
import pytest
from flax import nnx
from helpers import MIXED_PLAN, mixed_factory
from jax.sharding import PartitionSpec as P

import jtp
from jtp.parallel.plan import shard_shape

C, R = jtp.ColwiseParallel(), jtp.RowwiseParallel()
T, D, N = "tensor", "data", None


class Holder(nnx.Module):
    """One layer under the attribute ``x`` (built by ``make``), as a plan sees it."""

    def __init__(self, make):
        self.x = make(nnx.Rngs(0))


def specs(make, style, mesh=(2, 4), fsdp=False):
    model = nnx.eval_shape(lambda: Holder(make))
    got = jtp.resolve(model, jtp.make_mesh(*mesh), {"x": style}, fsdp=fsdp)
    return {p.path.removeprefix("x."): p.spec for p in got}


def test_linear_general_multi_axis_and_batch_axis():
    def two_in(r):
        return nnx.LinearGeneral((4, 6), (8, 2), axis=(-2, -1), rngs=r)  # (4, 6, 8, 2)

    assert specs(two_in, C) == {"kernel": P(N, N, T, N), "bias": P(T, N)}
    assert specs(two_in, R) == {"kernel": P(T, N, N, N), "bias": P(N, N)}
    assert specs(two_in, C, fsdp=True) == {"kernel": P(D, N, T, N), "bias": P(T, N)}
    assert specs(two_in, R, fsdp=True)["kernel"] == P(T, N, D, N)

    def batched(r):
        return nnx.LinearGeneral(4, (8, 2), batch_axis={0: 2}, rngs=r)  # (2, 4, 8, 2)

    assert specs(batched, C) == {"kernel": P(N, N, T, N), "bias": P(N, T, N)}
    assert specs(batched, R) == {"kernel": P(N, T, N, N), "bias": P(N, N, N)}


def test_einsum_full_broadcast_bias_and_no_bias():
    # 'nta,hab->nthb': h reaches the output (column), a is contracted (row)
    def full(r):
        return nnx.Einsum("nta,hab->nthb", (8, 4, 4), (1, 1, 8, 4), rngs=r)

    assert specs(full, C) == {"kernel": P(T, N, N), "bias": P(N, N, T, N)}
    assert specs(full, R) == {"kernel": P(N, T, N), "bias": P(N, N, N, N)}
    assert specs(full, C, fsdp=True)["kernel"] == P(T, D, N)  # natural: the contracted a
    assert specs(full, R, fsdp=True)["kernel"] == P(D, T, N)  # natural: the first output dim

    def no_bias(r):
        return nnx.Einsum("btd,dnh->btnh", (16, 8, 2), rngs=r)

    assert specs(no_bias, C) == {"kernel": P(N, T, N)}


def test_conv_any_rank():
    def conv3d(r):
        return nnx.Conv(8, 16, kernel_size=(2, 2, 2), rngs=r)  # (2, 2, 2, 8, 16)

    assert specs(conv3d, C) == {"kernel": P(N, N, N, N, T), "bias": P(T)}
    assert specs(conv3d, R) == {"kernel": P(N, N, N, T, N), "bias": P(N)}
    assert specs(conv3d, C, fsdp=True)["kernel"] == P(N, N, N, D, T)
    assert specs(conv3d, R, fsdp=True) == {"kernel": P(N, N, N, T, D), "bias": P(D)}


def test_lora_standalone_with_base_module():
    def make(r):
        return nnx.LoRA(16, 4, 32, base_module=nnx.Linear(16, 32, rngs=r), rngs=r)

    assert specs(make, C) == {
        "lora_a": P(N, N),
        "lora_b": P(N, T),
        "base_module.kernel": P(N, T),
        "base_module.bias": P(T),
    }
    assert specs(make, R) == {
        "lora_a": P(T, N),
        "lora_b": P(N, N),
        "base_module.kernel": P(T, N),
        "base_module.bias": P(N),
    }


def test_nearest_matched_module_wins():
    """A LoRALinear's key covers its ``lora`` child unless a key names the child itself."""
    model = nnx.eval_shape(lambda: Holder(lambda r: nnx.LoRALinear(16, 32, lora_rank=4, rngs=r)))
    plan = {"x": C, "x.lora": jtp.ParamSharding({"lora_a": P(T, N)})}
    got = {p.path: (p.key, p.spec) for p in jtp.resolve(model, jtp.make_mesh(1, 8), plan)}
    assert got["x.kernel"] == ("x", P(N, T))
    assert got["x.lora.lora_a"] == ("x.lora", P(T, N))
    assert got["x.lora.lora_b"] == (None, P(N, N))  # not named by the nearer key: unplanned


class Raw(nnx.Module):
    def __init__(self, rngs=None):
        self.w = nnx.Param(jax.numpy.zeros((6, 16, 8)))
        self.v = nnx.Param(jax.numpy.zeros((16,)))


def test_param_sharding_fsdp_and_multi_axis():
    mesh = jtp.make_mesh(2, 4)
    model = nnx.eval_shape(lambda: Holder(Raw))
    plan = {"x": jtp.ParamSharding({"w": P(N, N, jtp.TENSOR)})}
    got = {p.path: p for p in jtp.resolve(model, mesh, plan, fsdp=True)}
    assert got["x.w"].spec == P(N, D, T)  # largest remaining divisible dim: 16, not 6
    assert got["x.v"].key is None and got["x.v"].spec == P(D)  # not named: unplanned rule
    explicit = {"x": jtp.ParamSharding({"w": P(D, N, T)})}  # already on data: added once only
    placed = {p.path: p for p in jtp.resolve(model, mesh, explicit, fsdp=True)}["x.w"]
    assert placed.spec == P(D, N, T)
    both = {"x": jtp.ParamSharding({"w": P(N, (D, T), N)})}  # 16 split over all 8 devices
    placed = {p.path: p for p in jtp.resolve(model, mesh, both, fsdp=True)}["x.w"]
    assert placed.spec == P(N, (D, T), N) and shard_shape(placed, mesh) == (6, 2, 8)


def test_param_sharding_is_a_frozen_value():
    """Equal specs, equal styles (and hashes); the specs cannot change after validation."""
    a, b = jtp.ParamSharding({"w": P(T)}), jtp.ParamSharding({"w": P(T)})
    assert a == b and hash(a) == hash(b) and a != jtp.ParamSharding({"w": P(N)})
    with pytest.raises(TypeError):
        a.specs["w"] = P(N)


# --- bad input ------------------------------------------------------------------------------


def _raises(make, style, match, mesh=(1, 8), fsdp=False):
    with pytest.raises(ValueError, match=match):
        specs(make, style, mesh, fsdp)


@pytest.mark.parametrize(
    "spec,match",
    [
        (
            {"u": P(N)},
            r"plan\['x'\]: ParamSharding on module 'x' of type .*Raw: no parameter 'u' "
            r"\(spec P\(None,\)\) in this module; its parameters are: v \(16,\), "
            r"w \(6, 16, 8\)",
        ),
        (
            {"w": P(N, T)},
            r"plan\['x'\]: spec P\(None, 'tensor'\) for parameter 'x\.w' of shape "
            r"\(6, 16, 8\) has 2 entries, but the parameter has 3 dimensions",
        ),
        (
            {"w": P(N, "model", N)},
            r"plan\['x'\]: spec .* for parameter 'x\.w' of shape \(6, 16, 8\) puts dimension 1 "
            r"on mesh axis 'model', not a mesh axis of \('data', 'tensor'\)",
        ),
        (
            {"w": P(T, N, N)},
            r"plan\['x'\]: parameter 'x\.w' of shape \(6, 16, 8\) has dimension 0 of size 6, "
            r"not divisible by mesh axis 'tensor' of size 8",
        ),
        (
            {"w": P(N, T, T)},
            r"plan\['x'\]: spec .* for parameter 'x\.w' of shape \(6, 16, 8\) puts dimension 2 "
            r"on mesh axis 'tensor', used twice",
        ),
    ],
    ids=["unknown-param", "rank", "unknown-axis", "indivisible", "axis-twice"],
)
def test_param_sharding_bad_specs(spec, match):
    _raises(Raw, jtp.ParamSharding(spec), match)


@pytest.mark.parametrize(
    "arg,match",
    [({}, "non-empty dict"), ({"w": (None, "tensor")}, "PartitionSpec"), ({"w": P(3)}, "names")],
)
def test_param_sharding_bad_construction(arg, match):
    with pytest.raises(ValueError, match=match):
        jtp.ParamSharding(arg)


def test_param_sharding_fails_before_compile(monkeypatch):
    def no_jit(*a, **k):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(jax, "jit", no_jit)
    plan = MIXED_PLAN | {"mixer": jtp.ParamSharding({"w_in": P(N, "tensor", N)})}
    with pytest.raises(ValueError, match=r"plan\['mixer'\]: spec .* 'mixer\.w_in' of shape"):
        jtp.sharded_init(mixed_factory(), jtp.make_mesh(1, 8), plan)


def test_attention_heads_not_divisible():
    def attn(r):
        return nnx.MultiHeadAttention(4, 16, decode=False, rngs=r)

    model = nnx.eval_shape(lambda: Holder(attn))
    with pytest.raises(
        ValueError,
        match=r"plan\['x\.query'\]: parameter 'x\.query\.bias' of shape \(4, 4\) has "
        r"dimension 0 of size 4, not divisible by mesh axis 'tensor' of size 8",
    ):
        jtp.resolve(model, jtp.make_mesh(1, 8), {"x.query": C})


def test_natural_fsdp_dim_not_divisible():
    _raises(
        lambda r: nnx.LinearGeneral(3, (8, 2), rngs=r),
        C,
        r"plan\['x'\] with fsdp=True: parameter 'x\.kernel' of shape \(3, 8, 2\) has "
        r"dimension 0 of size 3, not divisible by mesh axis 'data' of size 2",
        mesh=(2, 4),
        fsdp=True,
    )


@pytest.mark.parametrize(
    "make,style,match",
    [
        (  # h is a batch dimension (in the input and the output) before the feature f
            lambda r: nnx.Einsum("bhd,hdf->bhf", (8, 4, 16), rngs=r),
            C,
            r"einsum 'bhd,hdf->bhf': the first kernel dimension reaching the output, 0 \('h'\), "
            r"is also an input dimension.*ambiguous.*ParamSharding\(\{'kernel': "
            r"P\('tensor', None, None\)\}\) or the first feature dimension 2 \('f'\): "
            r"ParamSharding\(\{'kernel': P\(None, None, 'tensor'\)\}\)",
        ),
        (
            lambda r: nnx.Einsum("btd,dk->bt", (16, 4), rngs=r),  # k: summed on its own
            C,
            r"no kernel dimension of einsum 'btd,dk->bt' reaches the output.*no column split",
        ),
        (
            lambda r: nnx.Einsum("bd,hk->bdhk", (8, 4), rngs=r),  # an outer product
            R,
            r"no kernel dimension of einsum 'bd,hk->bdhk' is contracted.*no row split",
        ),
        (
            lambda r: nnx.Einsum("btd,...dh->bth", (16, 8), rngs=r),
            C,
            r"kernel operand '\.\.\.dh'.*own letter \(no '\.\.\.'\).*ParamSharding",
        ),
        (
            lambda r: nnx.Einsum("btd,dnh->btnh", (16, 8, 2), (16,), rngs=r),
            C,
            r"bias of shape \(16,\) of einsum 'btd,dnh->btnh' is not laid out along the output "
            r"dims \['n', 'h'\].*ParamSharding",
        ),
        (
            lambda r: nnx.Conv(8, 16, 3, feature_group_count=2, rngs=r),
            R,
            r"plan\['x'\]: RowwiseParallel on module 'x' of type .*Conv: no column/row layout "
            r"for a grouped convolution \(feature_group_count=2\).*ParamSharding",
        ),
        (
            lambda r: nnx.LayerNorm(16, rngs=r),
            C,
            r"ColwiseParallel cannot shard module 'x'.*LayerNorm; it supports nnx\.Linear, "
            r"nnx\.LinearGeneral, nnx\.Einsum, nnx\.Conv, nnx\.Embed, nnx\.LoRA, nnx\.LoRALinear; "
            r"lay out any other module with jtp\.ParamSharding",
        ),
    ],
    ids=[
        "einsum-batch-dim",
        "einsum-no-column",
        "einsum-no-row",
        "einsum-ellipsis",
        "einsum-flat-bias",
        "grouped-conv",
        "unsupported",
    ],
)
def test_layers_without_an_unambiguous_layout(make, style, match):
    _raises(make, style, match)
