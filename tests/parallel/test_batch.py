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


def test_shard_batch_over_data_and_expert():
    """On ("data", "expert", "tensor") rows split over data x expert (data major); every
    device of a tensor group holds the same rows (check_replicas passes)."""
    mesh = jtp.make_mesh(data=2, expert=2, tensor=2)
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    out = jtp.shard_batch(x, mesh)
    assert out.sharding.spec == P(("data", "expert"), None)
    grid = jtp.mesh.batch_grid(mesh)  # (4 ranks, 2 tensor)
    for rank, devices in enumerate(grid):
        for d in devices:
            (shard,) = [s for s in out.addressable_shards if s.device == d]
            np.testing.assert_array_equal(np.asarray(shard.data), x[2 * rank : 2 * rank + 2])
    jtp.check_replicas({"x": out})
    with pytest.raises(ValueError, match=r"mesh axes \('data', 'expert'\) of size 4"):
        jtp.shard_batch(np.zeros((6, 3)), mesh)
