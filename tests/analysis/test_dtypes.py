"""Reading dtypes off a program: matmul FLOPs by operand dtype from a jaxpr (loops counted
per trip, convolutions included), collectives by element type from partitioned HLO, and
what each layer computes in under a policy."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jtp
from jtp.analysis.dtypes import (
    collective_bytes,
    collective_dtypes,
    dot_flops_by_dtype,
    dots,
    module_dtypes,
    partitioned_hlo,
)


def test_dot_flops_count_each_loop_trip_and_mixed_operands():
    a = jnp.ones((8, 16), jnp.bfloat16)
    b = jnp.ones((16, 4), jnp.bfloat16)

    def f(a, b):
        def body(c, _):
            return c, a @ b  # 2 * 8 * 4 * 16 = 1024 FLOPs per trip

        _, ys = jax.lax.scan(body, 0, None, length=5)
        return ys, a.astype(jnp.float32) @ b  # a float32 x bfloat16 pair, once

    totals = dot_flops_by_dtype(jax.make_jaxpr(f)(a, b))
    assert totals == {"bfloat16": 5 * 1024.0, "float32 x bfloat16": 1024.0}
    assert all("test_dtypes.py" in d.where for d in dots(jax.make_jaxpr(f)(a, b)))


def test_convolution_flops():
    conv = nnx.Conv(3, 5, kernel_size=(3,), rngs=nnx.Rngs(0))
    x = jnp.ones((2, 7, 3))
    (d,) = dots(jax.make_jaxpr(lambda x: conv(x))(x))
    assert d.flops == 2 * (2 * 7 * 5) * (3 * 3)  # out elements x (window x in features)


def test_grouped_matmul_flops_count_the_groups_work_not_the_dense_product():
    """``ragged_dot`` (M, K) x (G, K, N): each row meets one group, 2 * M * K * N FLOPs; its
    gradients too: d lhs is another such grouped matmul, d rhs (G, K, N) sums each group's
    own rows only (the CPU backend computes G times that, masked: not what is counted)."""
    m, k, n, g = 12, 8, 6, 4
    x, w = jnp.ones((m, k)), jnp.ones((g, k, n))
    sizes = jnp.array([3, 0, 5, 4], jnp.int32)

    def f(x, w):
        return jnp.sum(jax.lax.ragged_dot(x, w, sizes))

    (forward,) = dots(jax.make_jaxpr(f)(x, w))
    assert forward.flops == 2 * m * k * n
    backward = dots(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w))
    assert [d.flops for d in backward] == [2 * m * k * n] * 3  # forward, d lhs, d rhs


def test_collectives_after_partitioning_keep_bf16():
    """The same program after SPMD partitioning (bf16 all-reduce) and after the CPU's
    optimisation (promoted to float32): only the first tells what a GPU runs."""
    mesh = jtp.make_mesh(2, 4)
    shard = jax.sharding.NamedSharding
    P = jax.sharding.PartitionSpec
    x = jax.device_put(jnp.ones((8, 16), jnp.bfloat16), shard(mesh, P("data", None)))
    w1 = jax.device_put(jnp.ones((16, 64), jnp.bfloat16), shard(mesh, P(None, "tensor")))
    w2 = jax.device_put(jnp.ones((64, 16), jnp.bfloat16), shard(mesh, P("tensor", None)))
    lowered = jax.jit(lambda x, a, b: (x @ a) @ b).lower(x, w1, w2)
    assert collective_dtypes(partitioned_hlo(lowered)) == {("all-reduce", "bf16"): 1}
    assert collective_bytes(partitioned_hlo(lowered)) == {("all-reduce", "bf16"): 4 * 16 * 2}
    optimised = collective_dtypes(lowered.compile().as_text())
    assert optimised[("all-reduce", "f32")] >= 1 and ("all-reduce", "bf16") not in optimised


def test_hlo_parser_reads_tuples_and_async_starts():
    text = (
        "%a = (bf16[4,8]{1,0}, f32[2]{0}) all-reduce(%x, %y), to_apply=%add\n"
        "%b = f32[16]{0} all-gather-start(%z), dimensions={0}\n"
        "%c = bf16[2,2]{1,0} add(%p, %q)\n"
    )
    assert collective_dtypes(text) == {
        ("all-reduce", "bf16"): 1,
        ("all-reduce", "f32"): 1,
        ("all-gather", "f32"): 1,
    }
    assert collective_bytes(text)[("all-reduce", "bf16")] == 4 * 8 * 2


def test_module_dtypes_names_the_stock_layers_and_the_pinned_ones():
    class Own(nnx.Module):
        def __init__(self):
            self.dtype = jnp.float32  # its own code decides

    class Model(nnx.Module):
        def __init__(self, *, rngs):
            self.embed = nnx.Embed(10, 4, rngs=rngs)  # pinned float32 at build, reachable
            self.own = Own()
            self.head = nnx.Linear(4, 10, rngs=rngs)

    found = module_dtypes(Model(rngs=nnx.Rngs(0)), jnp.bfloat16)
    assert found == {"embed": "bfloat16", "own": "float32 (pinned)", "head": "bfloat16"}
    assert np.dtype(Model(rngs=nnx.Rngs(0)).embed.dtype) == np.float32  # untouched
