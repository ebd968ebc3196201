"""jtp.explain tables and jtp.check_replicas in one process."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import FF_PLAN, LM_PLAN, MIXED_PLAN, ff_factory, lm_factory, mixed_factory
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jtp
from jtp.models.llama import PRESETS, Llama


def test_explain_feedforward_rows_and_totals():
    mesh = jtp.make_mesh(2, 4)
    e = jtp.explain(ff_factory(64, 256), mesh, FF_PLAN, fsdp=True)
    rows = {r.placement.path: r for r in e.rows}
    assert rows["w1.kernel"].shard == (32, 64) and rows["w2.kernel"].shard == (64, 32)
    assert e.param_bytes == 3 * 32 * 64 * 4 == e.grad_bytes
    assert e.optimizer_bytes == 2 * e.param_bytes
    text = str(e)
    assert "w1 -> ColwiseParallel" in text and "P('data', 'tensor')" in text
    assert "total" in text
    exact = jtp.explain(ff_factory(64, 256), mesh, FF_PLAN, fsdp=True, tx=optax.adamw(1e-3))
    assert exact.optimizer_bytes == e.optimizer_bytes + 4  # + the replicated int32 step count


def test_explain_marks_unplanned_and_strict_rejects_them():
    mesh = jtp.make_mesh(1, 8)
    plan = {k: v for k, v in LM_PLAN.items() if k != "head"}
    e = jtp.explain(lm_factory(), mesh, plan)
    head = next(r for r in e.rows if r.placement.path == "head.kernel")
    assert head.placement.key is None and "replicated: no key" in str(e)
    with pytest.raises(
        ValueError, match=r"parameter 'head.kernel' \(16, 32\) \(2,048 bytes\) is replicated"
    ):
        jtp.explain(lm_factory(), mesh, plan, strict=True, strict_min_bytes=1024)


def test_explain_flax_layers_rows_and_strict():
    """Rows of the new styles, and strict mode: a parameter a style replicates on purpose (a
    column LoRA's lora_a, 256 bytes) is planned; a forgotten layer or a parameter a
    ParamSharding does not name is not."""
    mesh = jtp.make_mesh(1, 8)
    e = jtp.explain(mixed_factory(), mesh, MIXED_PLAN, strict=True, strict_min_bytes=256)
    rows = {r.placement.path: r for r in e.rows}
    assert rows["attn.query.kernel"].shard == (16, 1, 2)  # (in, heads, head_dim): a head each
    assert rows["e_down.kernel"].shard == (1, 4, 16)
    assert rows["conv_up.kernel"].shard == (3, 16, 4)
    assert rows["lora_up.lora.lora_a"].shard == (16, 4)
    assert rows["mixer.w_out"].shard == (4, 16)
    text = str(e)
    for row in (
        "attn.query -> ColwiseParallel",
        "attn.out -> RowwiseParallel",
        "e_up -> ColwiseParallel",
        "lora_up -> ColwiseParallel",
        "conv_down -> RowwiseParallel",
        "mixer -> ParamSharding",
    ):
        assert row in text, row
    assert text.count("lora_up -> ColwiseParallel") == 4  # kernel, bias and both factors

    no_conv = {k: v for k, v in MIXED_PLAN.items() if not k.startswith("conv")}
    msg = r"parameter 'conv_down.kernel' \(3, 32, 16\) \(6,144 bytes\) is replicated"
    with pytest.raises(ValueError, match=msg):
        jtp.explain(mixed_factory(), mesh, no_conv, strict=True, strict_min_bytes=256)
    half = MIXED_PLAN | {"mixer": jtp.ParamSharding({"w_in": P(None, jtp.TENSOR)})}
    with pytest.raises(ValueError, match=r"parameter 'mixer.w_out' \(32, 16\)"):
        jtp.explain(mixed_factory(), mesh, half, strict=True, strict_min_bytes=256)


def test_explain_llama3_8b_abstractly():
    mesh = jtp.make_mesh(1, 8)
    e = jtp.explain(lambda: Llama(PRESETS["llama3-8b"], rngs=nnx.Rngs(0)), mesh, jtp.plans.llama())
    # 8.03B fp32 params; norms replicated (tiny), everything else split 8 ways.
    assert 8.03e9 * 4 / 8 < e.param_bytes < 8.04e9 * 4 / 8 + 2e6


def _batch_with(mesh, rows_for_device):
    sharding = NamedSharding(mesh, P("data", None))
    shape = (8, 4)
    arrays = []
    for d, index in sharding.devices_indices_map(shape).items():
        arrays.append(jax.device_put(rows_for_device(d, index), d))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def test_check_replicas_passes_loader_batches_and_catches_a_bad_one():
    mesh = jtp.make_mesh(2, 4)
    loader = jtp.DataLoader(jtp.RandomDataset(4, 32), 8, mesh=mesh, shuffle=True)
    for batch in loader:
        jtp.check_replicas(batch, step=1)
    base = np.arange(32, dtype=np.float32).reshape(8, 4)
    good = _batch_with(mesh, lambda d, idx: base[idx])
    jtp.check_replicas({"x": good})
    bad = _batch_with(mesh, lambda d, idx: base[idx] + (d.id == 5))  # device 5 disagrees
    msg = r"step 7: devices that must hold the same rows of batch leaf \['x'\] differ: .*device 5"
    with pytest.raises(ValueError, match=msg):
        jtp.check_replicas({"x": bad}, step=7)


def test_trainer_checks_replicas_for_first_steps():
    class BadLoader(jtp.TrainModule):
        def configure_model(self, mesh):
            return jtp.sharded_init(ff_factory(4, 16), mesh, FF_PLAN)

        def training_step(self, model, batch):
            return model(batch).sum()

        def configure_optimizers(self):
            return optax.sgd(0.1)

        def train_dataloader(self):
            base = np.ones((8, 4), np.float32)
            return [_batch_with(self.mesh, lambda d, idx: base[idx] * (1 + (d.id == 1)))]

    trainer = jtp.Trainer(jtp.ModelParallelStrategy(2, 4), check_replicas=1, logger=None)
    with pytest.raises(ValueError, match="step 1: devices that must hold the same rows"):
        trainer.fit(BadLoader())


def test_cli_explain_prints_the_table(tmp_path, capsys):
    from jtp.cli.train import main

    main(
        [
            "--devices",
            "8",
            "--dim",
            "32",
            "--hidden-dim",
            "64",
            "--samples",
            "16",
            "--no-progress",
            "--explain",
            "--root-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "| w2.kernel | (64, 32)" in out and "w2 -> RowwiseParallel" in out
    assert out.index("plan key -> style") < out.index("Peak memory usage")  # before training


def test_explain_says_what_each_layer_computes_in_and_names_pinned_modules():
    """With a policy's compute dtype: a "computes in" column (stock layers follow the
    policy, raw parameters compute in their inputs' dtype) and a warning naming a module
    that keeps its own float32."""
    import jax.numpy as jnp
    from flax import nnx

    class Pinned(nnx.Module):
        def __init__(self, *, rngs):
            self.dtype = jnp.float32
            self.inner = nnx.Linear(4, 4, rngs=rngs)

    text = str(jtp.explain(lm_factory(), jtp.make_mesh(2, 4), LM_PLAN, compute_dtype=jnp.bfloat16))
    assert "computes in" in text.splitlines()[0]
    assert all(line.rstrip(" |").endswith("bfloat16") for line in text.splitlines()[2:17])
    assert "computes in" not in str(jtp.explain(lm_factory(), jtp.make_mesh(2, 4), LM_PLAN))
    pinned = jtp.explain(
        lambda: Pinned(rngs=nnx.Rngs(0)), jtp.make_mesh(2, 4), {}, compute_dtype=jnp.bfloat16
    )
    assert pinned.pinned == ("<model>",) and "WARNING" in str(pinned)


def test_under_fp8_the_linear_layers_compute_in_float8_as_the_policy_sets_them():
    """``precision="transformer-engine"``: explain's "computes in" names float8 for exactly
    the layers whose matmul the policy replaces (read off the model the policy changed), and
    bf16 for the rest of the stock layers (the embedding, the norms)."""
    import jax.numpy as jnp
    from flax import nnx

    from jtp.analysis.dtypes import FLOAT8_MATMUL
    from jtp.training import fp8
    from jtp.training.precision import apply_compute_dtype

    mesh = jtp.make_mesh(2, 4)
    shown = jtp.explain(lm_factory(), mesh, LM_PLAN, compute_dtype=jnp.bfloat16, float8=True)
    float8_rows = {
        r.placement.path.rsplit(".", 1)[0] for r in shown.rows if r.computes == FLOAT8_MATMUL
    }
    other = {r.computes for r in shown.rows if r.computes not in (None, FLOAT8_MATMUL)}
    model = apply_compute_dtype(lm_factory()(), "transformer-engine")
    replaced = {
        ".".join(map(str, path))
        for path, m in nnx.iter_graph(model)
        if getattr(m, "dot_general", None) is fp8.dot_general
        or getattr(m, "einsum_op", None) is fp8.einsum
    }
    assert float8_rows and float8_rows == replaced
    assert other == {"bfloat16"}
    assert FLOAT8_MATMUL in str(shown)
