import jax
import numpy as np
import pytest
from jax.sharding import AxisType

import jtp


@pytest.mark.parametrize(
    "data,tensor,expect", [(-1, 1, (8, 1)), (2, 4, (2, 4)), (-1, 4, (2, 4)), (1, -1, (1, 8))]
)
def test_shapes_and_fill(data, tensor, expect):
    mesh = jtp.make_mesh(data=data, tensor=tensor)
    assert mesh.axis_names == ("data", "tensor")
    assert (mesh.shape["data"], mesh.shape["tensor"]) == expect
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_tensor_axis_is_innermost():
    """A tensor group is a run of consecutive devices (one host); data spans them."""
    mesh = jtp.make_mesh(data=2, tensor=4)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    np.testing.assert_array_equal(ids, np.array([d.id for d in jax.devices()]).reshape(2, 4))


def test_explicit_devices():
    mesh = jtp.make_mesh(data=1, tensor=2, devices=jax.devices()[:2])
    assert mesh.devices.shape == (1, 2)


def test_product_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"data=3 x tensor=2 = 6 devices, but 8 devices"):
        jtp.make_mesh(data=3, tensor=2)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"data": -1, "tensor": 3}, "8 devices are not divisible by tensor=3"),
        ({"data": -1, "tensor": -1}, "only one of data and tensor may be -1"),
        ({"data": 0, "tensor": 8}, "data=0 must be a positive int"),
    ],
)
def test_bad_sizes(kw, msg):
    with pytest.raises(ValueError, match=msg):
        jtp.make_mesh(**kw)


@pytest.mark.parametrize(
    "kw,expect",
    [
        ({"data": 2, "expert": 2, "tensor": 2}, (2, 2, 2)),
        ({"expert": 8}, (1, 8, 1)),
        ({"expert": 4, "tensor": 2}, (1, 4, 2)),
        ({"data": 2, "expert": -1, "tensor": 2}, (2, 2, 2)),
    ],
)
def test_expert_axis(kw, expect):
    """("data", "expert", "tensor"), tensor innermost, expert between; batch over both."""
    mesh = jtp.make_mesh(**kw)
    assert mesh.axis_names == ("data", "expert", "tensor")
    assert tuple(mesh.shape.values()) == expect
    assert mesh.axis_types == (AxisType.Auto,) * 3
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    np.testing.assert_array_equal(ids, np.arange(8).reshape(expect))
    assert jtp.mesh_shape(mesh) == dict(zip(("data", "expert", "tensor"), expect, strict=True))
    assert jtp.mesh.batch_axes(mesh) == ("data", "expert")
    assert jtp.mesh.batch_ranks(mesh) == expect[0] * expect[1]
    assert jtp.mesh.batch_grid(mesh).shape == (expect[0] * expect[1], expect[2])


def test_expert_one_is_the_mesh_of_before():
    """expert=1 leaves the axis out: the same axes, so the same programs as ever."""
    mesh = jtp.make_mesh(data=2, expert=1, tensor=4)
    assert mesh.axis_names == ("data", "tensor")
    assert mesh == jtp.make_mesh(data=2, tensor=4)
    assert jtp.mesh_shape(mesh) == {"data": 2, "tensor": 4}
    assert jtp.mesh.batch_axes(mesh) == "data"


def test_strategy_expert_parallel_size():
    s = jtp.ModelParallelStrategy(2, 2, expert_parallel_size=2)
    assert jtp.mesh_shape(s.mesh) == {"data": 2, "expert": 2, "tensor": 2}
    s = jtp.ModelParallelStrategy("auto", 2, expert_parallel_size=2)
    assert jtp.mesh_shape(s.mesh) == {"data": 2, "expert": 2, "tensor": 2}
    s = jtp.ModelParallelStrategy(expert_parallel_size=4)  # one process: data 1, tensor fill
    assert jtp.mesh_shape(s.mesh) == {"data": 1, "expert": 4, "tensor": 2}
    with pytest.raises(ValueError, match="expert_parallel_size=2 x tensor_parallel_size=4"):
        _ = jtp.ModelParallelStrategy(2, 4, expert_parallel_size=2).mesh
