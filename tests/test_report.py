"""The HLO collective parser on literal HLO lines and on real compiled programs."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jtp
from jtp.report import (
    collectives,
    format_collectives,
    memory_breakdown,
    parse_groups,
    parse_hlo,
    peak_memory_per_device,
    total_bytes,
)


def test_group_formats():
    assert parse_groups(", replica_groups={{0,1},{2,3}}, to_apply=%add") == ((0, 1), (2, 3))
    assert parse_groups(", replica_groups=[2,4]<=[8], x") == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert parse_groups(", replica_groups=[4,2]<=[2,4]T(1,0), x") == (
        (0, 4),
        (1, 5),
        (2, 6),
        (3, 7),
    )
    assert parse_groups(", replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, x") == (
        (0, 1, 2, 3),
        (4, 5, 6, 7),
    )
    assert parse_groups(", source_target_pairs={{0,1},{1,0}}") == ((0, 1), (1, 0))


def test_literal_lines_kinds_bytes_axes():
    mesh = jtp.make_mesh(2, 4)
    hlo = "\n".join(
        [
            "%ar = f32[8,64]{1,0} all-reduce(f32[8,64]{1,0} %x), channel_id=1, "
            "replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add",
            "%t = (f32[16]{0}, bf16[4,4]{1,0}) all-reduce(f32[16]{0} %a, bf16[4,4]{1,0} %b), "
            "replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add",
            "%s = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(f32[2,8]{1,0} %p), "
            "replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}",
            "%d = f32[8,8]{1,0} all-gather-done((f32[2,8]{1,0}, f32[8,8]{1,0}) %s)",
            "ROOT %rs = f32[2,8]{1,0} reduce-scatter(f32[8,8]{1,0} %y), "
            "replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add",
            "%cp = s32[4]{0} collective-permute(s32[4]{0} %z), source_target_pairs={{0,1},{1,0}}",
            "%not = f32[8]{0} add(f32[8]{0} %a, f32[8]{0} %b)",
        ]
    )
    got = [(c.kind, c.bytes, c.axes) for c in parse_hlo(hlo, mesh)]
    assert got == [
        ("all-reduce", 8 * 64 * 4, ("tensor",)),
        ("all-reduce", 16 * 4 + 16 * 2, ("data",)),
        ("all-gather", 8 * 8 * 4, ("data", "tensor")),  # -start counted once, -done not
        ("reduce-scatter", 8 * 8 * 4, ("tensor",)),  # the operand: the un-scattered buffer
        ("collective-permute", 16, ("tensor",)),
    ]
    table = format_collectives(parse_hlo(hlo, mesh))
    assert "all-reduce" in table and "collective-permute" in table


def _row_parallel(mesh):
    """x (B, K) sharded on K over "tensor" times w (K, N) sharded on K: partial sums."""
    x = jax.device_put(jnp.ones((8, 64)), NamedSharding(mesh, P("data", "tensor")))
    w = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("tensor", None)))
    return jax.jit(lambda x, w: x @ w).lower(x, w).compile()


def test_row_parallel_matmul_axes_on_both_mesh_orientations():
    """Pins the device-number -> mesh-position mapping: (2,4) and (4,2) differ."""
    for shape in [(1, 8), (2, 4), (4, 2)]:
        mesh = jtp.make_mesh(*shape)
        colls = collectives(_row_parallel(mesh), mesh)
        rows = 8 // shape[0]
        assert [(c.kind, c.axes, c.bytes) for c in colls] == [
            ("all-reduce", ("tensor",), rows * 32 * 4)
        ], (shape, colls)
        assert all(len(g) == shape[1] for g in colls[0].groups)


def test_batch_sum_reduces_over_data():
    mesh = jtp.make_mesh(4, 2)
    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data", None)))
    colls = collectives(jax.jit(lambda x: x.sum(0)).lower(x).compile(), mesh)
    assert [(c.kind, c.axes) for c in colls] == [("all-reduce", ("data",))]
    assert total_bytes(colls, axis="data") == 16 * 4


def test_replicating_a_sharded_array_is_an_all_gather():
    mesh = jtp.make_mesh(1, 8)
    x = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P("tensor", None)))
    f = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P()))
    colls = collectives(f.lower(x).compile(), mesh)
    assert [(c.kind, c.axes, c.bytes) for c in colls] == [("all-gather", ("tensor",), 64 * 16 * 4)]


def test_peak_memory_formula():
    mesh = jtp.make_mesh(1, 8)
    x = jax.device_put(jnp.ones((64, 1024)), NamedSharding(mesh, P(None, "tensor")))
    compiled = jax.jit(lambda x: jnp.tanh(x) @ x.T).lower(x).compile()
    parts = memory_breakdown(compiled)
    ma = compiled.memory_analysis()
    assert peak_memory_per_device(compiled) == (
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        + ma.temp_size_in_bytes
        - ma.alias_size_in_bytes
    )
    assert parts["arguments"] == 64 * 1024 * 4 // 8
    assert peak_memory_per_device(compiled) >= parts["outputs"] + parts["arguments"]
    # Donation aliases the output into the input: counted once.
    donated = jax.jit(lambda x: x + 1, donate_argnums=0).lower(x).compile()
    assert memory_breakdown(donated)["aliased"] == 64 * 1024 * 4 // 8
    assert peak_memory_per_device(donated) == np.prod((64, 1024 // 8)) * 4
