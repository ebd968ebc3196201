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
