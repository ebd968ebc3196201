"""Golden PartitionSpecs per parameter (a silent sharding change fails here) and plan errors."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import FF_PLAN, LM_PLAN, ff_factory, lm_factory
from jax.sharding import PartitionSpec as P

import jtp
from jtp.parallel.plan import match_plan


def specs(factory, mesh, plan, fsdp=False):
    return {p.path: p.spec for p in jtp.resolve(nnx.eval_shape(factory), mesh, plan, fsdp=fsdp)}


def test_feedforward_golden():
    mesh = jtp.make_mesh(2, 4)
    assert specs(ff_factory(), mesh, FF_PLAN) == {
        "w1.kernel": P(None, "tensor"),
        "w2.kernel": P("tensor", None),
        "w3.kernel": P(None, "tensor"),
    }
    assert specs(ff_factory(), mesh, FF_PLAN, fsdp=True) == {
        "w1.kernel": P("data", "tensor"),
        "w2.kernel": P("tensor", "data"),
        "w3.kernel": P("data", "tensor"),
    }


def test_nested_model_golden():
    """Biases, Embed, wildcards, and the unplanned rule (LayerNorm, head bias)."""
    mesh = jtp.make_mesh(2, 4)
    tp = specs(lm_factory(), mesh, LM_PLAN)
    fsdp = specs(lm_factory(), mesh, LM_PLAN, fsdp=True)
    for i in (0, 1):
        b = f"blocks.{i}"
        assert tp[f"{b}.up.kernel"] == P(None, "tensor")
        assert tp[f"{b}.up.bias"] == P("tensor")
        assert tp[f"{b}.down.kernel"] == P("tensor", None)
        assert tp[f"{b}.down.bias"] == P(None)  # added once, after the all-reduce
        assert tp[f"{b}.norm.scale"] == P(None)
        assert fsdp[f"{b}.up.kernel"] == P("data", "tensor")
        assert fsdp[f"{b}.up.bias"] == P("tensor")
        assert fsdp[f"{b}.down.kernel"] == P("tensor", "data")
        assert fsdp[f"{b}.down.bias"] == P("data")  # unplanned rule: 16 % 2 == 0
        assert fsdp[f"{b}.norm.scale"] == P("data")
    assert tp["embed.embedding"] == P("tensor", None)  # (vocab, dim): vocab rows
    assert fsdp["embed.embedding"] == P("tensor", "data")
    assert tp["head.kernel"] == P(None, "tensor")
    assert tp["head.bias"] == P("tensor")


def test_unplanned_rule_largest_divisible_dim():
    class M(nnx.Module):
        def __init__(self):
            self.a = nnx.Param(nnx.initializers.zeros(None, (3, 8, 4)))
            self.b = nnx.Param(nnx.initializers.zeros(None, (3, 5)))
            self.c = nnx.Param(nnx.initializers.zeros(None, ()))

    mesh = jtp.make_mesh(4, 2)
    got = specs(M, mesh, {}, fsdp=True)
    assert got == {"a": P(None, "data", None), "b": P(None, None), "c": P()}


def test_embed_colwise():
    class M(nnx.Module):
        def __init__(self):
            self.tok = nnx.Embed(8, 16, rngs=nnx.Rngs(0))

    mesh = jtp.make_mesh(1, 8)
    assert specs(M, mesh, {"tok": jtp.ColwiseParallel()}) == {"tok.embedding": P(None, "tensor")}


def test_wildcards_match_every_block():
    matched = match_plan(nnx.eval_shape(lm_factory()), LM_PLAN)
    assert sorted(matched) == [
        "blocks.0.down",
        "blocks.0.up",
        "blocks.1.down",
        "blocks.1.up",
        "embed",
        "head",
    ]


# --- bad input: each a ValueError naming what to fix, raised before any compile ---------


def test_key_matching_nothing():
    with pytest.raises(ValueError, match=r"plan key 'blocks\.\*\.mlp' matches no module.*blocks"):
        jtp.resolve(
            nnx.eval_shape(lm_factory()),
            jtp.make_mesh(1, 8),
            {"blocks.*.mlp": jtp.ColwiseParallel()},
        )


def test_module_matched_twice():
    plan = {"blocks.*.up": jtp.ColwiseParallel(), "blocks.0.u*": jtp.ColwiseParallel()}
    with pytest.raises(ValueError, match=r"'blocks\.0\.up' is matched by two plan keys"):
        jtp.resolve(nnx.eval_shape(lm_factory()), jtp.make_mesh(1, 8), plan)


def test_style_on_unsupported_module():
    with pytest.raises(
        ValueError, match=r"ColwiseParallel cannot shard module 'blocks\.0\.norm'.*LayerNorm"
    ):
        jtp.resolve(
            nnx.eval_shape(lm_factory()),
            jtp.make_mesh(1, 8),
            {"blocks.0.norm": jtp.ColwiseParallel()},
        )


def test_not_a_style():
    with pytest.raises(ValueError, match=r"plan\['w1'\] = 'colwise' is not a parallel style"):
        jtp.resolve(nnx.eval_shape(ff_factory()), jtp.make_mesh(1, 8), {"w1": "colwise"})


def test_indivisible_dimension_names_everything():
    msg = (
        r"plan\['w1'\]: parameter 'w1\.kernel' of shape \(16, 60\) has dimension 1 of size 60, "
        r"not divisible by mesh axis 'tensor' of size 8"
    )
    with pytest.raises(ValueError, match=msg):
        jtp.resolve(nnx.eval_shape(ff_factory(16, 60)), jtp.make_mesh(1, 8), FF_PLAN)


def test_indivisible_fsdp_dimension():
    with pytest.raises(
        ValueError, match=r"with fsdp=True: parameter 'w1\.kernel'.*mesh axis 'data' of size 8"
    ):
        jtp.resolve(nnx.eval_shape(ff_factory(12, 64)), jtp.make_mesh(8, 1), FF_PLAN, fsdp=True)


def test_plan_not_a_dict():
    with pytest.raises(ValueError, match="plan must be a dict"):
        jtp.resolve(nnx.eval_shape(ff_factory()), jtp.make_mesh(1, 8), [("w1", FF_PLAN["w1"])])


def test_merging_a_tpplan_keeps_its_activation_rules():
    """The trap: `{**plan, ...}` on a dict subclass silently dropped the rules (sequence and
    loss parallelism off). A TPPlan is not a dict: `|` keeps the rules, `**` refuses."""
    import pytest

    plan = jtp.plans.llama(sequence_parallel=True, loss_parallel=True)
    extra = {"norm": jtp.RowwiseParallel()}
    for merged in (plan | extra, extra | plan):
        assert isinstance(merged, jtp.TPPlan)
        assert merged.activations == plan.activations and "norm" in merged
        assert merged["layers.*.attention.wq"] == plan["layers.*.attention.wq"]
    both = plan | jtp.TPPlan({"norm": jtp.RowwiseParallel()}, {"extra": P()})
    assert set(both.activations) == set(plan.activations) | {"extra"}
    with pytest.raises(TypeError):
        {**plan, **extra}  # noqa: B018
    with pytest.raises(TypeError):
        dict(plan)


def test_an_activation_rule_no_mark_uses_is_an_error():
    """A misspelt rule ("logit") must not silently switch loss parallelism off."""
    import jax.numpy as jnp
    import pytest

    mesh = jtp.make_mesh(2, 4)
    x = jnp.ones((8, 4))
    with pytest.raises(ValueError, match=r"activation rules \['logit'\] matched no shard_act"):
        with jtp.activation_rules(mesh, {"logits": P("data", None), "logit": P("data", None)}):
            jtp.shard_activation(x, "logits")
    with jtp.activation_rules(mesh, {"logits": P("data", None)}):  # all used: fine
        jtp.shard_activation(x, "logits")
    with jtp.activation_rules(mesh, {"logit": P("data", None)}):  # nothing traced: unchecked
        pass


class StackedLM(nnx.Module):
    """helpers.TinyLM with its blocks stacked for a scan (jtp.parallel.stacked.stack)."""

    def __init__(self, vocab: int = 32, dim: int = 16, depth: int = 3, *, rngs: nnx.Rngs):
        from helpers import Block

        from jtp.parallel.stacked import stack

        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = stack(lambda r: Block(dim, rngs=r), depth, rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens_bt):
        from jtp.models.stack import run_blocks

        return self.head(run_blocks(self.blocks, self.embed(tokens_bt)))  # (B, T, vocab)


@pytest.mark.parametrize("fsdp", [False, True], ids=["tp", "fsdp"])
def test_stacked_layers_take_the_unrolled_keys_and_lay_out_each_layer(fsdp):
    """``blocks.*.up`` matches the stacked ``blocks.up``; every stacked variable is laid out
    as one unrolled block's (the unplanned fsdp rule included), its layer axis replicated."""
    mesh = jtp.make_mesh(2, 4)
    stacked = specs(lambda: StackedLM(rngs=nnx.Rngs(0)), mesh, LM_PLAN, fsdp=fsdp)
    unrolled = specs(lm_factory(), mesh, LM_PLAN, fsdp=fsdp)
    for name, spec in unrolled.items():
        if name.startswith("blocks.0."):
            assert stacked["blocks." + name[len("blocks.0.") :]] == P(None, *spec), name
        elif not name.startswith("blocks."):
            assert stacked[name] == spec, name
    assert stacked["blocks.up.kernel"] == P(None, "data" if fsdp else None, "tensor")
    assert len(stacked) == len(unrolled) - 6  # 6 variables per block, held once for 3 layers


def test_stacked_layers_sharded_compute_what_one_device_does():
    mesh = jtp.make_mesh(2, 4)
    model = jtp.sharded_init(lambda: StackedLM(rngs=nnx.Rngs(0)), mesh, LM_PLAN, fsdp=True)
    whole = StackedLM(rngs=nnx.Rngs(0))
    kernel = model.blocks.up.kernel.get_value()
    assert kernel.sharding.shard_shape(kernel.shape) == (3, 8, 16)  # (layers, 16/2, 64/4)
    np.testing.assert_array_equal(
        np.asarray(kernel), np.asarray(whole.blocks.up.kernel.get_value())
    )
    tokens = np.arange(32, dtype=np.int32).reshape(4, 8) % 32
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda m, t: m(t))(model, jtp.shard_batch(tokens, mesh))),
        np.asarray(whole(tokens)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_key_for_one_stacked_layer_is_an_error_listing_the_stacked_names():
    mesh = jtp.make_mesh(2, 4)
    with pytest.raises(ValueError, match=r"'blocks\.0\.up' matches no module.*blocks\.\*\.up"):
        specs(lambda: StackedLM(rngs=nnx.Rngs(0)), mesh, {"blocks.0.up": jtp.ColwiseParallel()})
    # the stacked module's own path works too
    assert specs(lambda: StackedLM(rngs=nnx.Rngs(0)), mesh, {"blocks.up": jtp.ColwiseParallel()})[
        "blocks.up.kernel"
    ] == P(None, None, "tensor")
