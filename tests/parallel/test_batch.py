import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jtp


def test_shard_batch_pytree_rows_per_tensor_group():
    mesh = jtp.make_mesh(4, 2)
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    out = jtp.shard_batch({"x": x, "y": np.arange(8)}, mesh)
    assert out["x"].sharding.spec == P("data", None) and out["y"].sharding.spec == P("data")
    for shard in out["x"].addressable_shards:
        assert shard.data.shape == (2, 3)  # 8 rows / data 4, whole on the tensor axis
        rows = shard.index[0]
        np.testing.assert_array_equal(np.asarray(shard.data), x[rows])
    np.testing.assert_array_equal(np.asarray(out["x"]), x)


def test_shard_batch_errors():
    mesh = jtp.make_mesh(4, 2)
    with pytest.raises(ValueError, match=r"batch dimension 6 \(shape \(6, 3\)\) is not divisible"):
        jtp.shard_batch(np.zeros((6, 3)), mesh)
    with pytest.raises(ValueError, match="scalar"):
        jtp.shard_batch(np.float32(1.0), mesh)
