"""jtp.infer_plan: jtp's Llama gets exactly the hand-written plan's layouts (scanned,
unrolled, tied, LoRA, Qwen-style, kv heads repeated); models it has never seen (an MLP
stack, a transformer of stock Flax layers, LoRA-wrapped linears) get a plan whose compiled
forward equals the unsharded model, with one all-reduce per column -> row pair and no
all-gather, sharding what a hand plan shards; the refusals carry their reasons, and
jtp.explain prints them.

Tolerance of the sharded forward: 1e-5, norm-relative (``||sharded - ref|| / ||ref||``).
Both programs compute the same float32 products; the sharded one sums each row layer's
contraction as per-device partial sums all-reduced over "tensor" (and the vocabulary-split
embedding lookup as a sum of one non-zero row and zeros), an order that moves each output by
a few ulps (fp32 eps is 1.2e-7; seen <= 3.2e-7, AVX-512 and AVX2 code alike). A wrong
layout or a misplaced split would be off by O(1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import MIXED_PLAN, mixed_batch, mixed_factory, rel_err

import jtp
from jtp.models.llama import Llama, LlamaConfig
from jtp.models.plans import replicate_kv

TOKENS = jax.ShapeDtypeStruct((2, 16), jnp.int32)


def _specs(model, mesh, plan, fsdp=False):
    return {p.path: p.spec for p in jtp.resolve(model, mesh, plan, fsdp=fsdp)}


LLAMAS = {
    "scanned": LlamaConfig(),
    "unrolled": LlamaConfig(scan_layers=False, n_layers=3),
    "tied": LlamaConfig(tie_embeddings=True),
    "lora": LlamaConfig(lora_rank=4),
    "qwen3-remat": LlamaConfig(qk_norm=True, qkv_bias=True, explicit_head_dim=16, remat="full"),
    # 4 kv heads for tensor 8: each repeated twice (jtp.plans.replicate_kv), wk / wv whole.
    "kv-replicas": replicate_kv(LlamaConfig(n_kv_heads=4), 8),
}


def _inferred_equals_hand_plan(config):
    """The plan inferred for ``Llama(config)``, after checking that it has jtp.plans.llama's
    keys and gives every variable its PartitionSpec on 1x8 and on 2x4 with fsdp."""
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    plan = jtp.infer_plan(model, TOKENS)
    hand = jtp.plans.llama(config)
    assert set(plan.styles) == set(hand.styles)
    for shape, fsdp in (((1, 8), False), ((2, 4), True)):
        mesh = jtp.make_mesh(*shape)
        assert _specs(model, mesh, plan, fsdp) == _specs(model, mesh, hand, fsdp)
    return plan


@pytest.mark.parametrize("name", list(LLAMAS))
def test_llama_gets_the_hand_written_plan(name):
    """Every variable's PartitionSpec equals jtp.plans.llama's, on a 1x8 mesh and on 2x4
    with fsdp, and the keys read as the hand plan's ("layers.*.attention.wq")."""
    config = LLAMAS[name]
    plan = _inferred_equals_hand_plan(config)
    # q, k, v and wo split on whole heads: the kv heads (as computed) bound the tensor size.
    assert plan["layers.*.attention.wq"].heads == config.cached_kv_heads == 8
    assert plan["layers.*.feed_forward.w1"].heads is None
    why = plan.reasons
    assert why["layers.*.feed_forward.w1"].startswith("column: its output stays split through")
    assert "silu" in why["layers.*.feed_forward.w1"]
    assert "into layers.*.feed_forward.w2 (row)" in why["layers.*.feed_forward.w1"]
    assert "with layers.*.feed_forward.w3" in why["layers.*.feed_forward.w1"]
    assert why["layers.*.attention.wo"].startswith("row: contracts the split output of")
    assert why["tok_embeddings"].startswith("row (vocabulary rows): an embedding lookup")
    assert why["layers.*.attention_norm"].startswith("replicated: RMSNorm has no column/row")
    if config.kv_replicas > 1:
        assert why["layers.*.attention.wk"].startswith("replicated: its heads are repeated")
    if config.tie_embeddings:
        assert "tied output projection" in why["tok_embeddings"]
    else:
        assert why["output"].startswith("column: a projection to a larger output (128 -> 512")


class MLPStack(nnx.Module):
    def __init__(self, *, rngs):
        self.l0, self.l1 = nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 16, rngs=rngs)
        self.l2, self.l3 = nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x_bd):
        x_bd = self.l1(nnx.gelu(self.l0(x_bd)))
        return self.l3(nnx.relu(self.l2(x_bd)))


class Block(nnx.Module):
    """Pre-norm attention (nnx.MultiHeadAttention: LinearGeneral q/k/v/out) and a GELU MLP."""

    def __init__(self, dim, heads, *, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.up, self.down = (
            nnx.Linear(dim, 4 * dim, rngs=rngs),
            nnx.Linear(4 * dim, dim, rngs=rngs),
        )

    def __call__(self, x_btd):
        mask = nnx.make_causal_mask(x_btd[..., 0])  # (B, 1, T, T)
        x_btd = x_btd + self.attn(self.ln1(x_btd), mask=mask)
        return x_btd + self.down(nnx.gelu(self.up(self.ln2(x_btd))))


class Transformer(nnx.Module):
    def __init__(self, vocab=64, dim=32, heads=8, depth=2, *, rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(depth)])
        self.norm, self.head = nnx.LayerNorm(dim, rngs=rngs), nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens_bt):
        x_btd = self.embed(tokens_bt)
        for block in self.blocks:
            x_btd = block(x_btd)
        return self.head(self.norm(x_btd))  # (B, T, vocab)


class LoRAMLP(nnx.Module):
    """A LoRALinear, then an nnx.LoRA wrapping a Linear (PEFT-style adapters on both)."""

    def __init__(self, *, rngs):
        b_init = nnx.initializers.normal(0.1)  # non-zero B: the low-rank path counts
        self.up = nnx.LoRALinear(16, 64, lora_rank=4, b_initializer=b_init, rngs=rngs)
        base = nnx.Linear(64, 16, rngs=rngs)
        self.down = nnx.LoRA(64, 4, 16, base_module=base, b_initializer=b_init, rngs=rngs)

    def __call__(self, x_bd):
        return self.down(nnx.relu(self.up(x_bd)))


C, R = jtp.ColwiseParallel(), jtp.RowwiseParallel()
X = np.random.default_rng(0).standard_normal((8, 16), dtype=np.float32)
IDS = np.random.default_rng(1).integers(0, 64, (4, 8), dtype=np.int32)
# model, input, mesh, its hand-written plan, all-reduces (one per column -> row pair, one
# per vocabulary-split lookup), bytes of each per device: one (..., D) fp32 activation
UNSEEN = {
    "mlp-stack": (MLPStack, X, (1, 8), {"l0": C, "l1": R, "l2": C, "l3": R}, 2, 8 * 16 * 4),
    "transformer": (
        Transformer,
        IDS,
        (2, 4),
        {
            "embed": R,
            "blocks.*.attn.query": C,
            "blocks.*.attn.key": C,
            "blocks.*.attn.value": C,
            "blocks.*.attn.out": R,
            "blocks.*.up": C,
            "blocks.*.down": R,
            "head": C,
        },
        4 + 1,
        4 * 8 * 32 * 4 // 2,  # the batch is split on "data" (2)
    ),
    # The row LoRA's rank-4 partial sums (x @ lora_a: (8, 4)) ride in the pair's all-reduce.
    "lora-mlp": (LoRAMLP, X, (1, 8), {"up": C, "down": R}, 1, 8 * 16 * 4 + 8 * 4 * 4),
}


def test_gemma_layers_of_two_kinds_in_one_scan_get_the_hand_written_plan():
    """Gemma 2's layers (sliding and global in one scanned block: a cond between two
    attentions, jtp.models.layer_kinds; soft-caps, GeGLU, (1 + w) norms, sandwich norms,
    q/k norms): each branch of the cond carries the heads' split to ``wo``, so the plan is
    jtp.plans.llama's."""
    config = LlamaConfig(
        n_layers=3,
        sliding_window=8,
        sliding_layers=(True, False, True),
        local_rope_theta=10000.0,
        activation="gelu_tanh",
        norm_offset=True,
        embed_scale=True,
        sandwich_norms=True,
        query_pre_attn_scalar=16.0,
        attn_softcap=50.0,
        final_softcap=30.0,
        qk_norm=True,
        tie_embeddings=True,
    )
    plan = _inferred_equals_hand_plan(config)
    assert plan.reasons["layers.*.attention.wo"].startswith("row: contracts the split output")


@pytest.mark.parametrize("name", list(UNSEEN))
def test_unseen_models_shard_like_a_hand_plan(name):
    """The inferred plan shards every parameter as the hand plan does; the compiled sharded
    forward equals the unsharded one (1e-5: see the module docstring) and communicates one
    all-reduce over "tensor" per pair (and per vocabulary-split lookup), each of one
    activation, with no all-gather (of a weight or anything else)."""
    cls, x, shape, hand, n_reduce, activation = UNSEEN[name]
    mesh = jtp.make_mesh(*shape)
    model = cls(rngs=nnx.Rngs(0))
    plan = jtp.infer_plan(model, x)
    assert _specs(model, mesh, plan) == _specs(model, mesh, hand)
    assert set(plan.styles) == set(hand)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    ref = forward(state, x)
    sharded = jtp.parallelize(cls(rngs=nnx.Rngs(0)), mesh, plan)
    state = nnx.state(sharded)
    batch = jtp.shard_batch(x, mesh)
    compiled = forward.lower(state, batch).compile()
    assert rel_err(compiled(state, batch), ref) < 1e-5  # seen <= 3.2e-7

    records = jtp.collectives(compiled, mesh)
    assert [(r.kind, r.axes) for r in records] == [("all-reduce", ("tensor",))] * n_reduce
    assert all(r.bytes == activation for r in records), [r.bytes for r in records]


def test_every_flax_layer_pairs_as_by_hand():
    """The suite's block of every parameterised Flax layer in pairs (attention's
    LinearGeneral, Einsum, LoRALinear -> Linear, Conv, a raw-Param mixer) gets its hand
    plan's layout, except the mixer: raw parameters have no layout to infer (ParamSharding
    is the hand-written escape hatch), so they stay whole, saying so."""
    model = nnx.eval_shape(mixed_factory())
    plan = jtp.infer_plan(model, mixed_batch()[0])
    hand = {k: v for k, v in MIXED_PLAN.items() if k != "mixer"}
    mesh = jtp.make_mesh(1, 8)
    assert set(plan.styles) == set(hand)
    assert _specs(model, mesh, plan) == _specs(model, mesh, hand)
    assert plan.reasons["conv_up"].startswith("column: its output stays split through")
    assert plan.reasons["conv_up"].endswith("into conv_down (row)")
    assert plan.reasons["mixer"].startswith("replicated: Mixer has no column/row layout")


class NormBetween(nnx.Module):
    def __init__(self, *, rngs):
        self.up, self.down = nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(64, rngs=rngs)
        self.spare = nnx.Linear(16, 16, rngs=rngs)  # never called

    def __call__(self, x_bd):
        return self.down(self.norm(self.up(x_bd)))


class NoMatmul(nnx.Module):
    def __init__(self, *, rngs):
        self.norm = nnx.LayerNorm(16, rngs=rngs)

    def __call__(self, x_bd):
        return 2 * self.norm(x_bd)


def test_refusals_say_why():
    """A norm over the split features stops the pair (both layers replicated, with the
    reason), a layer the forward never calls is said to be unused; a model without matmuls
    gets an empty plan saying so; a head count the tensor size does not divide is refused
    when the plan meets the mesh; bad calls fail early."""
    plan = jtp.infer_plan(NormBetween(rngs=nnx.Rngs(0)), X)
    assert dict(plan.styles) == {}
    assert plan.reasons["up"].startswith(
        "replicated: as a column layer, its split output is reduced over the split axis "
        "(a norm, softmax or mean over the split features) (reduce_sum at normalization.py"
    )
    assert plan.reasons["down"].startswith(
        "replicated: as a column layer, its split output reaches no row layer"
    )
    assert "maps 64 features to 16" in plan.reasons["down"]
    assert plan.reasons["norm"].startswith("replicated: LayerNorm has no column/row layout")
    assert plan.reasons["spare"] == "replicated: the forward does not use it"

    plan = jtp.infer_plan(NoMatmul(rngs=nnx.Rngs(0)), X)
    assert dict(plan.styles) == {} and "no parameterised matmul" in plan.reasons["(model)"]

    six = LlamaConfig(dim=48, n_heads=6, n_kv_heads=6, ffn_hidden=64, n_layers=1)
    model = nnx.eval_shape(lambda: Llama(six, rngs=nnx.Rngs(0)))
    plan = jtp.infer_plan(model, TOKENS)
    assert plan["layers.*.attention.wq"].heads == 6
    jtp.resolve(model, jtp.make_mesh(4, 2), plan)  # 2 divides 6 (and 48)
    msg = (
        r"plan\['layers.\*.attention.wk'\]: parameter 'layers.attention.wk.kernel' of shape "
        r"\(48, 48\): dimension 1 of size 48 holds 6 heads, not divisible by mesh axis "
        r"'tensor' of size 4; each device must hold whole heads"
    )
    with pytest.raises(ValueError, match=msg):  # 48 % 4 == 0, but a head would straddle
        jtp.sharded_init(lambda: Llama(six, rngs=nnx.Rngs(0)), jtp.make_mesh(2, 4), plan)

    with pytest.raises(ValueError, match=r"give the forward's inputs"):
        jtp.infer_plan(NoMatmul(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"takes an nnx.Module or a zero-argument factory"):
        jtp.infer_plan("model", X)
    with pytest.raises(ValueError, match=r"heads must be a positive int"):
        jtp.ColwiseParallel(heads=0)


def test_explain_prints_the_reasons():
    """``jtp.explain(model, mesh, jtp.infer_plan(model, x))``: the usual table (styles with
    their head counts) and, under it, one line per layer saying why."""
    model = nnx.eval_shape(lambda: Llama(LlamaConfig(), rngs=nnx.Rngs(0)))
    text = str(jtp.explain(model, jtp.make_mesh(1, 8), jtp.infer_plan(model, TOKENS)))
    assert "layers.*.attention.wq -> ColwiseParallel(heads=8)" in text
    assert "layers.*.feed_forward.w1 -> ColwiseParallel " in text
    tail = text[text.index("why each layer has its style (jtp.infer_plan):") :].splitlines()
    assert tail[1].startswith("tok_embeddings: row (vocabulary rows)")
    assert "layers.*.feed_forward.w2: row: contracts the split output of" in text
    assert "norm: replicated: RMSNorm has no column/row layout" in text
    plain = str(jtp.explain(model, jtp.make_mesh(1, 8), jtp.plans.llama()))
    assert "jtp.infer_plan" not in plain and "-> ColwiseParallel |" in plain.replace("  ", "")
