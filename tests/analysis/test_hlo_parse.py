"""Collectives and memory read off compiled programs, and the HLO parser on literal lines.

Compiled cases run on the 8 forced CPU devices. CPU HLO prints operands without their types
(``all-reduce(%fusion)``), so byte counts come from result types; the literal lines below
also carry typed operands, as hand-written or other backends' HLO may.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.analysis.collectives import (
    collectives,
    format_collectives,
    parse_groups,
    parse_hlo,
    total_bytes,
)
from jtp.analysis.memory import device_peak_bytes, memory_breakdown, peak_memory_per_device
from jtp.mesh import DATA, TENSOR, make_mesh

B, K, N = 8, 64, 32  # batch, contracted features, output features


def _put(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def _compile(f, *args, **jit_kwargs):
    return jax.jit(f, **jit_kwargs).lower(*args).compile()


def _summary(colls):
    return [(c.kind, c.axes, c.bytes) for c in colls]


# --- the parser on literal HLO ------------------------------------------------------------


def test_replica_group_formats():
    assert parse_groups(", replica_groups={{0,1},{2,3}}, to_apply=%add") == ((0, 1), (2, 3))
    assert parse_groups(", replica_groups={}, to_apply=%add") == ()
    assert parse_groups(", replica_groups=[2,4]<=[8], x") == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert parse_groups(", replica_groups=[1,8]<=[8], x") == (tuple(range(8)),)
    columns = ((0, 4), (1, 5), (2, 6), (3, 7))
    assert parse_groups(", replica_groups=[4,2]<=[2,4]T(1,0), x") == columns
    assert parse_groups(", replica_groups=[2,4]<=[4,2]T(1,0), x") == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert parse_groups(", source_target_pairs={{0,1},{1,0}}") == ((0, 1), (1, 0))


def test_shardy_mesh_replica_groups():
    """Shardy prints groups as mesh axes: ids of the mesh array with grouped axes last."""
    mesh_24 = "replica_groups=mesh['data'=2,'tensor'=4]"
    assert parse_groups(f", {mesh_24} {{'tensor'}}, x") == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert parse_groups(f", {mesh_24} {{'data'}}, x") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert parse_groups(f", {mesh_24} {{'data','tensor'}}, x") == (tuple(range(8)),)
    # Unquoted names; sub-axes `b:(pre)size` of b=4 split it as (2, 2): (1)2 is its major
    # half, (2)2 its minor half.
    sub = ", replica_groups=mesh[a=2,b=4] {{b:({})2}}, x"
    assert parse_groups(sub.format(1)) == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert parse_groups(sub.format(2)) == ((0, 1), (2, 3), (4, 5), (6, 7))
    # A non-iota mesh lists its device ids, explicitly or as iota.
    ids = ", replica_groups=mesh['a'=2,'b'=2], device_ids=(3,1,2,0) {'b'}, x"
    assert parse_groups(ids) == ((3, 1), (2, 0))
    ids = ", replica_groups=mesh['a'=2,'b'=2], device_ids=([2,2]<=[2,2]T(1,0)) {'b'}, x"
    assert parse_groups(ids) == ((0, 2), (1, 3))


HLO = "\n".join(
    [
        "HloModule jit_step, is_scheduled=true, num_partitions=8",
        "%add (a: f32[], b: f32[]) -> f32[] {",
        "  ROOT %s = f32[] add(f32[] %a, f32[] %b)",
        "}",
        "%body (p: (s32[], f32[16])) -> (s32[], f32[16]) {",
        "  %ar.loop = f32[16]{0} all-reduce(%g), channel_id=9, "
        "replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add",
        "}",
        "ENTRY %main (x: f32[8,64]) -> f32[8,64] {",
        "  %ar = f32[8,64]{1,0} all-reduce(f32[8,64]{1,0} %x), channel_id=1, "
        "replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add, "
        'metadata={op_name="jit(step)/dot_general"}',
        "  %t = (f32[16]{0}, bf16[4,4]{1,0}) all-reduce(%a, %b), "
        "replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add",
        "  %ars = (f32[32]{0}, bf16[8]{0}) all-reduce-start(%c, %d), "
        "replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add",
        "  %ard = (f32[32]{0}, bf16[8]{0}) all-reduce-done(%ars)",
        "  %ags = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(f32[2,8]{1,0} %p), "
        "replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}",
        "  %agd = f32[8,8]{1,0} all-gather-done((f32[2,8]{1,0}, f32[8,8]{1,0}) %ags)",
        "  %rs = f32[2,8]{1,0} reduce-scatter(%y), replica_groups=[2,4]<=[8], dimensions={0}",
        "  %a2a = (s8[4]{0}, s8[4]{0}) all-to-all(%u, %v), replica_groups={}",
        "  %cps = (u16[4]{0}, u16[4]{0}, u32[], u32[]) collective-permute-start(%z), "
        "source_target_pairs={{0,1},{1,0}}",
        "  %cpd = u16[4]{0} collective-permute-done(%cps)",
        "  %w = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body",
        '  %f = f32[8]{0} fusion(%q), kind=kLoop, metadata={op_name="not an all-reduce(x)"}',
        "}",
    ]
)


def test_literal_hlo_kinds_bytes_groups_axes():
    mesh = make_mesh(2, 4)
    colls = parse_hlo(HLO, mesh)
    assert [(c.instruction, c.kind, c.bytes, c.axes) for c in colls] == [
        ("ar.loop", "all-reduce", 16 * 4, (DATA,)),  # in the loop body: once, statically
        ("ar", "all-reduce", 8 * 64 * 4, (TENSOR,)),
        ("t", "all-reduce", 16 * 4 + 4 * 4 * 2, (DATA,)),  # tuple: elements summed
        ("ars", "all-reduce", 32 * 4 + 8 * 2, (TENSOR,)),  # async: -start once, -done not
        ("ags", "all-gather", 8 * 8 * 4, (DATA, TENSOR)),  # (operand, result): the result
        ("rs", "reduce-scatter", 2 * 8 * 4 * 4, (TENSOR,)),  # result x group: the operand
        ("a2a", "all-to-all", 8, (DATA, TENSOR)),  # `{}` = all of num_partitions
        ("cps", "collective-permute", 8, (TENSOR,)),  # (in, out, contexts): the output
    ]
    loop, ar, tup = colls[:3]
    assert loop.computation == "body" and ar.computation == "main"
    assert ar.op_name == "jit(step)/dot_general" and ar.shapes == ((8, 64),)
    assert tup.dtype == "f32,bf16" and tup.groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert colls[6].groups == (tuple(range(8)),)
    assert [c.axes for c in parse_hlo(HLO)] == [None] * 8  # no mesh: no axes


@pytest.mark.parametrize(
    ("dtype", "size"),
    [
        ("pred", 1),
        ("s8", 1),
        ("u16", 2),
        ("bf16", 2),
        ("f16", 2),
        ("s32", 4),
        ("u64", 8),
        ("f64", 8),
        ("f8e4m3fn", 1),
        ("f8e5m2", 1),
        ("c64", 8),
        ("c128", 16),
    ],
)
def test_element_sizes(dtype, size):
    line = f"%r = {dtype}[3,5]{{1,0}} all-reduce(%x), replica_groups={{{{0,1}}}}, to_apply=%f"
    assert parse_hlo(line)[0].bytes == 15 * size


# --- compiled programs: the device-position -> mesh mapping ------------------------------


@pytest.mark.parametrize("order", ["natural", "permuted"])
@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
def test_groups_match_what_the_devices_actually_reduce(shape, order):
    """Pins HLO device position -> mesh place against execution, not against our reading.

    Each device holds 2**(its flat mesh position); a psum over one axis returns, on every
    device, the sum over its group. The parsed groups, mapped onto the mesh, must predict
    every device's result, and name exactly the axis summed over.
    """
    devices = jax.devices()
    if order == "permuted":
        devices = [devices[i] for i in [5, 2, 7, 0, 3, 6, 1, 4]]
    mesh = make_mesh(*shape, devices=devices)
    x = _put(2.0 ** np.arange(8, dtype=np.float32).reshape(shape), mesh, P(DATA, TENSOR))
    for axis in (DATA, TENSOR):
        f = jax.shard_map(
            lambda b, axis=axis: jax.lax.psum(b, axis),
            mesh=mesh,
            in_specs=P(DATA, TENSOR),
            out_specs=P(DATA, TENSOR),
            check_vma=False,
        )
        compiled = _compile(f, x)
        (coll,) = collectives(compiled, mesh)
        assert coll.kind == "all-reduce" and coll.axes == (axis,), coll
        got = np.asarray(compiled(x))
        for group in coll.groups:
            places = [np.unravel_index(i, shape) for i in group]
            assert all(got[p] == sum(2.0**i for i in group) for p in places), (group, got)


def test_axes_follow_device_ids_not_positions():
    """The same program read against another mesh of the same devices: a tensor group of
    mesh_p is, device by device, a data column of the natural (4, 2) mesh."""
    devices = jax.devices()
    mesh_p = make_mesh(2, 4, devices=[devices[i] for i in [0, 2, 4, 6, 1, 3, 5, 7]])
    x = _put(jnp.ones((B, K)), mesh_p, P(DATA, TENSOR))
    w = _put(jnp.ones((K, N)), mesh_p, P(TENSOR, None))
    compiled = _compile(lambda x, w: x @ w, x, w)
    assert [c.axes for c in collectives(compiled, mesh_p)] == [(TENSOR,)]
    assert [c.axes for c in collectives(compiled, make_mesh(4, 2))] == [(DATA,)]
    with pytest.raises(ValueError, match="not in"):
        collectives(compiled, make_mesh(1, 4, devices=devices[:4]))

    class PublicOnly:  # the executable's private device list gone: in/out NamedShardings
        as_text = compiled.as_text
        input_shardings = compiled.input_shardings
        output_shardings = compiled.output_shardings

    assert [c.axes for c in collectives(PublicOnly(), make_mesh(4, 2))] == [(DATA,)]


# --- compiled programs: kinds and bytes ----------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (4, 2)])
def test_row_parallel_matmul_is_one_all_reduce_over_tensor(shape):
    """x (B, K) @ w (K, N), both sharded on K: partial sums of the local (B/data, N) block."""
    mesh = make_mesh(*shape)
    x = _put(jnp.ones((B, K)), mesh, P(DATA, TENSOR))
    w = _put(jnp.ones((K, N)), mesh, P(TENSOR, None))
    (coll,) = collectives(_compile(lambda x, w: x @ w, x, w), mesh)
    assert _summary([coll]) == [("all-reduce", (TENSOR,), B // shape[0] * N * 4)]
    rows = np.arange(8).reshape(shape)  # tensor groups are the mesh's rows
    assert coll.groups == tuple(tuple(int(i) for i in r) for r in rows)


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
def test_batch_sum_reduces_over_data(shape):
    mesh = make_mesh(*shape)
    x = _put(jnp.ones((B, K)), mesh, P(DATA, None))
    (coll,) = collectives(_compile(lambda x: x.sum(0), x), mesh)
    assert coll.kind == "all-reduce" and coll.axes == (DATA,)
    assert coll.groups == tuple(tuple(int(i) for i in c) for c in np.arange(8).reshape(shape).T)
    assert coll.bytes == K * 4 and total_bytes([coll], axes=(DATA,)) == coll.bytes


def test_replicating_a_sharded_array_is_an_all_gather_of_the_whole():
    mesh = make_mesh(1, 8)
    x = _put(jnp.ones((K, 16)), mesh, P(TENSOR, None))
    replicated = NamedSharding(mesh, P())
    colls = collectives(_compile(lambda x: x * 2, x, out_shardings=replicated), mesh)
    assert _summary(colls) == [("all-gather", (TENSOR,), K * 16 * 4)]


def test_explicit_collectives_and_loop_bodies():
    """shard_map's own collectives: reduce-scatter counts its (untyped) operand; an op in a
    fori_loop body is one static record, outside the ENTRY computation."""
    mesh = make_mesh(2, 4)
    x = _put(jnp.ones((B, K)), mesh, P(DATA, None))  # local (4, 64)

    def smap(f, out):
        return jax.shard_map(f, mesh=mesh, in_specs=P(DATA, None), out_specs=out, check_vma=False)

    scatter = smap(
        lambda b: jax.lax.psum_scatter(b, TENSOR, scatter_dimension=1, tiled=True), P(DATA, TENSOR)
    )
    colls = collectives(_compile(scatter, x), mesh)
    assert _summary(colls) == [("reduce-scatter", (TENSOR,), 4 * K * 4)]
    assert colls[0].shapes == ((4, K // 4),)
    shift = smap(lambda b: jax.lax.ppermute(b, DATA, [(0, 1), (1, 0)]), P(DATA, None))
    assert _summary(collectives(_compile(shift, x), mesh)) == [
        ("collective-permute", (DATA,), 4 * K * 4)
    ]
    loop = smap(
        lambda b: jax.lax.fori_loop(0, 3, lambda i, c: jax.lax.psum(c, TENSOR) / 4, b),
        P(DATA, None),
    )
    (coll,) = collectives(_compile(loop, x), mesh)
    # The op sits in the loop body once and runs 3 times per program run: counted 3 times.
    assert (coll.kind, coll.axes, coll.op_bytes, coll.trips) == (
        "all-reduce",
        (TENSOR,),
        4 * K * 4,
        3,
    )
    assert coll.bytes == 3 * 4 * K * 4
    assert "main" not in coll.computation and "while" in coll.op_name


def test_format_and_totals():
    colls = parse_hlo(HLO, make_mesh(2, 4))
    table = format_collectives(colls)
    assert table.splitlines()[0].split() == ["kind", "axes", "bytes", "count"]
    assert "reduce-scatter" in table and "data,tensor" in table
    assert total_bytes(colls, "all-reduce") == 64 + 8 * 64 * 4 + 96 + 144
    assert total_bytes(colls, axes=(TENSOR,)) == 8 * 64 * 4 + 144 + 256 + 8
    assert total_bytes(colls, axis=DATA) == 64 + 96 + 256 + 8


# --- memory --------------------------------------------------------------------------------


def test_peak_memory_is_arguments_outputs_temps_minus_aliases():
    mesh = make_mesh(1, 8)
    x = _put(jnp.ones((K, 1024)), mesh, P(None, TENSOR))
    shard = K * 1024 * 4 // 8
    compiled = _compile(lambda x: jnp.tanh(x) @ x.T, x)
    ma = compiled.memory_analysis()
    parts = memory_breakdown(compiled)
    formula = (
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        + ma.temp_size_in_bytes
        - ma.alias_size_in_bytes
    )
    assert peak_memory_per_device(compiled) == parts["total"] == formula
    assert parts["arguments"] == shard and parts["outputs"] == K * K * 4
    assert peak_memory_per_device(compiled) >= parts["outputs"] + parts["arguments"]
    # Donation writes the output into the input's buffer: counted once.
    donated = _compile(lambda x: x + 1, x, donate_argnums=0)
    assert memory_breakdown(donated)["aliased"] == shard
    assert peak_memory_per_device(donated) == shard


def test_device_peak_bytes_is_none_on_cpu():
    assert jax.devices()[0].memory_stats() is None
    assert device_peak_bytes() is None


NESTED_LOOPS = """\
HloModule m, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %s = f32[] add(%x, %y)
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(%v), channel_id=1, replica_groups=[4,2]<=[8], to_apply=%add
}

%inner_cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %c = pred[] compare(%i, %n), direction=LT
}

%outer_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %w = (s32[], f32[8]) while(%t), condition=%inner_cond, body=%inner_body, TRIPS2
  %ag = f32[16]{0} all-gather(%v), channel_id=2, replica_groups=[4,2]<=[8], dimensions={0}
}

%outer_cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %c = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %loop = (s32[], f32[8]) while(%t), condition=%outer_cond, body=%outer_body, TRIPS3
  %top = f32[8]{0} all-reduce(%a), channel_id=3, replica_groups=[4,2]<=[8], to_apply=%add
}
"""
for _n in (2, 3):  # XLA's annotation of a loop with static bounds
    NESTED_LOOPS = NESTED_LOOPS.replace(
        f"TRIPS{_n}", f'backend_config={{"known_trip_count":{{"n":"{_n}"}}}}'
    )


def test_collectives_in_loops_count_once_per_trip():
    from jtp.analysis.hlo import computation_trips

    trips = computation_trips(NESTED_LOOPS)
    assert trips["main"] == 1 and trips["outer_body"] == 3 and trips["inner_body"] == 6
    assert trips["outer_cond"] == 4 and trips["inner_cond"] == 9  # a condition runs n + 1 times
    by_name = {r.instruction: r for r in parse_hlo(NESTED_LOOPS)}
    assert (by_name["ar"].trips, by_name["ar"].bytes, by_name["ar"].op_bytes) == (6, 6 * 32, 32)
    assert (by_name["ag"].trips, by_name["ag"].bytes) == (3, 3 * 64)
    assert (by_name["top"].trips, by_name["top"].bytes) == (1, 32)
    assert by_name["ar"].computation == "inner_body"
    rows = [line.split() for line in format_collectives(list(by_name.values())).splitlines()]
    assert ["all-reduce", "-", "32", "7"] in rows  # 6 loop trips + 1 at top level
    assert ["all-gather", "-", "64", "3"] in rows
