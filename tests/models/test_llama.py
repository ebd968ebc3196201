"""Llama (tiny preset) sharded vs unsharded, for TP, TP+SP, FSDP+TP and loss parallel; its
communication from the compiled HLO; bf16-mixed; remat; plan errors.

Tolerances (why each holds: docs/testing.md, "How tolerances are chosen"): parameters right
after init are equal; logits, loss and gradients within 1e-5 norm-relative (fp32 sums in
another order); one AdamW step compared on what the gradients determine (mu, sqrt(nu), and
the update wherever |g| is far above the gradients' error bound:
``helpers.assert_adamw_step_matches``); two momentum-SGD steps, whose update is linear in the
gradients, within the gradients' 1e-5.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import (
    adamw,
    assert_adamw_step_matches,
    assert_sgd_steps_match,
    grad_fn,
    make_fns,
    momentum_sgd,
    rel_err,
)

import jtp
from jtp.models.llama import PRESETS, Llama, LlamaConfig, cross_entropy
from jtp.recipes import LlamaTask, LlamaTaskConfig

CFG = PRESETS["tiny"]
B, T = 8, 32
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T + 1), dtype=np.int32)


def factory(config=CFG):
    return lambda: Llama(config, rngs=nnx.Rngs(0))


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:]), logits


_REF = {}


def reference():
    if not _REF:
        graphdef, params = nnx.split(factory()(), nnx.Param)
        adamw_step, sgd_steps = make_fns(graphdef, loss_fn)
        loss, logits, grads, new, opt = jax.jit(adamw_step)(params, adamw().init(params), TOKENS)
        sgd_new, sgd_opt = jax.jit(sgd_steps)(params, momentum_sgd().init(params), TOKENS)
        _REF.update(
            params=params,
            loss=loss,
            logits=logits,
            grads=grads,
            new=new,
            adam=opt[0],
            sgd=dict(params=params, new=sgd_new, trace=sgd_opt[0].trace),
        )
    return _REF


CASES = {
    "tp-1x8": ((1, 8), False, False, False),
    "tp-sp-1x8": ((1, 8), True, False, False),
    "fsdp-tp-2x4": ((2, 4), False, False, True),
    "loss-parallel-2x4": ((2, 4), False, True, False),
    "all-2x4": ((2, 4), True, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_unsharded(case):
    shape, sp, lp, fsdp = CASES[case]
    ref = reference()
    mesh = jtp.make_mesh(*shape)
    plan = jtp.plans.llama(sequence_parallel=sp, loss_parallel=lp)
    model = jtp.sharded_init(factory(), mesh, plan, fsdp=fsdp)
    graphdef, params = nnx.split(model, nnx.Param)
    assert rel_err(params, ref["params"]) == 0.0
    adamw_step, sgd_steps = make_fns(graphdef, loss_fn)
    tokens = jtp.shard_batch(TOKENS, mesh)
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    adam_sh = (None, None, None, param_sh, jtp.opt_state_shardings(adamw(), params))
    sgd_sh = (param_sh, jtp.opt_state_shardings(momentum_sgd(), params))
    with jtp.activation_rules(mesh, plan.activations):
        adam_state = jtp.init_opt_state(adamw(), params)
        loss, logits, grads, new, opt = jax.jit(adamw_step, out_shardings=adam_sh)(
            params, adam_state, tokens
        )
        sgd_state = jtp.init_opt_state(momentum_sgd(), params)
        sgd_new, sgd_opt = jax.jit(sgd_steps, out_shardings=sgd_sh)(params, sgd_state, tokens)
    # A mean of 256 positive cross-entropies (no cancellation): the logits' few-ulp error
    # carries over relatively (seen <= 2.2e-7).
    assert abs(float(loss) - float(ref["loss"])) <= 1e-5 * float(ref["loss"])
    assert rel_err(logits, ref["logits"]) < 1e-5  # seen 9e-7: contractions over D reordered
    got = dict(params=params, grads=grads, new=new, adam=opt[0])
    assert_adamw_step_matches(got, ref)  # gradients within GRAD_TOL, then what they determine
    assert_sgd_steps_match(dict(params=params, new=sgd_new, trace=sgd_opt[0].trace), ref["sgd"])
    if lp:  # logits stay split on the vocabulary
        assert logits.sharding.spec[-1] == "tensor"


def _forward_collectives(shape, sp, lp, with_loss=False, config=CFG):
    """The forward's collectives, one record per execution (a scanned layer's op once per
    trip of the loop: ``trips`` records of its per-trip bytes)."""
    mesh = jtp.make_mesh(*shape)
    plan = jtp.plans.llama(sequence_parallel=sp, loss_parallel=lp)
    graphdef, state = nnx.split(jtp.sharded_init(factory(config), mesh, plan))

    def f(state, tokens):
        loss, logits = loss_fn(nnx.merge(graphdef, state), tokens)
        return loss if with_loss else logits

    with jtp.activation_rules(mesh, plan.activations):
        compiled = jax.jit(f).lower(state, jtp.shard_batch(TOKENS, mesh)).compile()
    colls = jtp.collectives(compiled, mesh)
    return [
        dataclasses.replace(c, bytes=c.op_bytes, trips=1) for c in colls for _ in range(c.trips)
    ]


BTD = B * T * CFG.dim * 4
BTV = B * T * CFG.vocab_size * 4


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_tp_forward_two_all_reduces_per_layer(scan):
    config = dataclasses.replace(CFG, scan_layers=scan)
    colls = _forward_collectives((1, 8), sp=False, lp=True, config=config)
    # 2 per block (attention, MLP) + 1 for the vocab-sharded embedding lookup.
    assert [(c.kind, c.axes, c.bytes) for c in colls] == [("all-reduce", ("tensor",), BTD)] * (
        2 * CFG.n_layers + 1
    ), colls
    plain = _forward_collectives((1, 8), sp=False, lp=False, config=config)
    assert not [c for c in plain if c.kind == "all-gather" and "layers" in c.op_name], plain


# The tiny preset made Gemma-like: sliding (window 8 of 32 tokens) and global layers in one
# scan, soft-caps, (1 + w) norms, a norm on each region's output before the residual add.
GEMMA_CFG = dataclasses.replace(
    CFG,
    sliding_window=8,
    sliding_layers=(True, False),
    local_rope_theta=100.0,
    attn_softcap=20.0,
    final_softcap=30.0,
    query_pre_attn_scalar=16.0,
    norm_offset=True,
    sandwich_norms=True,
    embed_scale=True,
    activation="gelu_tanh",
)


@pytest.mark.parametrize("config", [CFG, GEMMA_CFG], ids=["llama", "gemma"])
def test_sequence_parallel_pairs(config):
    """Each all-reduce becomes a reduce-scatter + all-gather pair. XLA's CPU backend has no
    reduce-scatter pass and emits all-reduce + dynamic-slice, so we count by bytes: per TP
    region one (B, T, D) reduction and one (B, T, D) all-gather; no weight is gathered.
    Gemma's norms of each region's output run on the sequence shard, after the reduction:
    they add no collective; nor do the windows (attention sees whole T, split by heads)."""
    colls = _forward_collectives((1, 8), sp=True, lp=True, config=config)
    reductions = [c for c in colls if c.kind in ("all-reduce", "reduce-scatter") and c.bytes == BTD]
    gathers = [c for c in colls if c.kind == "all-gather" and c.bytes == BTD]
    regions = 2 * CFG.n_layers + 1  # + embedding reduction / final-norm gather
    assert len(reductions) == regions and len(gathers) == regions, colls
    assert all(c.axes == ("tensor",) for c in reductions + gathers)
    weights = [c for c in colls if c.kind == "all-gather" and "kernel" in c.op_name]
    assert not weights, weights
    # Nothing else of any size: what is left is bookkeeping under 1 KiB (token slicing).
    assert all(c.bytes <= 1024 for c in colls if c not in reductions + gathers), colls


def test_loss_parallel_never_gathers_logits():
    for shape in [(1, 8), (2, 4)]:
        colls = _forward_collectives(shape, sp=False, lp=True, with_loss=True)
        biggest = max(c.bytes for c in colls)
        assert biggest < BTV // shape[0], colls  # no (B, T, V) tensor crosses devices
        assert not [c for c in colls if "output" in c.op_name], colls  # nor the output weight


def test_bf16_mixed_close_to_fp32_and_keeps_fp32_state():
    """The stored dtypes and the losses' closeness. That the matmuls really run in bf16 is
    asserted from the program, not from losses: tests/training/test_bf16_program.py."""
    losses = {}
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        trainer = jtp.Trainer(
            jtp.ModelParallelStrategy(2, 4),
            max_steps=3,
            precision=precision,
            enable_progress_bar=False,
            logger=None,
            report_memory=False,
        )
        trainer.fit(LlamaTask(LlamaTaskConfig(samples=32)))
        losses[precision] = trainer.losses
        dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(trainer.model, nnx.Param))}
        want = "bfloat16" if precision == "bf16-true" else "float32"
        assert {str(d) for d in dtypes} == {want}
    # bf16 has an 8-bit mantissa: ~0.4% per op; the loss (a mean in fp32) stays within 1%.
    # bf16-true also keeps the parameters in bf16, so every update is rounded to 8 bits: 3%.
    # Seen: 3e-4 for both, on AVX-512, AVX2 and SSE4.2 alike.
    np.testing.assert_allclose(losses["bf16-mixed"], losses["32-true"], rtol=1e-2)
    np.testing.assert_allclose(losses["bf16-true"], losses["32-true"], rtol=3e-2)


def test_remat_same_numbers():
    remat = dataclasses.replace(CFG, remat=True)
    graphdef, params = nnx.split(factory(remat)(), nnx.Param)
    fwd_grad = grad_fn(graphdef, loss_fn)
    loss, _, grads = jax.jit(fwd_grad)(params, TOKENS)
    ref = reference()
    # The same ops on one device, recomputed rather than stored: seen bitwise equal; 1e-6
    # (8 ulps) leaves XLA free to fuse the recomputation differently.
    assert abs(float(loss) - float(ref["loss"])) <= 1e-6 * float(ref["loss"])
    assert rel_err(grads, ref["grads"]) < 1e-6
    jaxpr = str(jax.make_jaxpr(fwd_grad)(params, TOKENS))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def _contractions(jaxpr) -> list[tuple[int, tuple[int, ...]]]:
    """(contracted axes, output shape) of every dot_general in ``jaxpr``, nested ones too."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            found.append((len(contract), eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    found += _contractions(sub)
    return found


def test_weight_gradients_contract_one_token_axis():
    """The projections and the output layer see one token axis (N = B * T:
    jtp.models.feedforward.per_token), so each weight gradient of the backward (a matmul
    with a 2-D result, (n_in, n_out)) contracts one axis, which XLA's CPU dot reads where it
    lies; contracting (B, T) it first copied an operand transposed, the (B, T, V) logits'
    gradient among them (docs/performance.md, "Where a CPU training step's time goes").
    Read from the jaxpr of the gradient, remat and scan included: nothing is compiled.
    (Attention's key and value gradients contract (R, T) under grouped-query attention: no
    weight there.)"""
    model = factory(dataclasses.replace(CFG, remat="full"))()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return loss_fn(nnx.merge(graphdef, p, rest), TOKENS)[0]

    found = [f for f in _contractions(jax.make_jaxpr(jax.grad(loss))(params)) if len(f[1]) == 2]
    # at least the weight gradients of the 7 projections (the scan's body once) and the
    # output layer
    assert len(found) >= 7 + 1
    assert all(n == 1 for n, _ in found), [f for f in found if f[0] != 1]


def test_plan_errors_name_the_numbers():
    mesh = jtp.make_mesh(1, 8)
    bad_heads = LlamaConfig(dim=96, n_heads=12, n_kv_heads=4)
    with pytest.raises(
        ValueError, match=r"n_heads=12 is not divisible by mesh axis 'tensor' of size 8"
    ):
        jtp.plans.check_llama(bad_heads, mesh)
    bad_kv = LlamaConfig(dim=128, n_heads=16, n_kv_heads=4)  # fine with kv_replicas=2
    with pytest.raises(
        ValueError,
        match=r"n_kv_heads=4 \(x kv_replicas=1\) is not divisible by mesh axis 'tensor' of "
        r"size 8; .* set kv_replicas=2",
    ):
        jtp.plans.check_llama(bad_kv, mesh)
    with pytest.raises(
        ValueError, match=r"sequence length 30 is not divisible by mesh axis 'tensor' of size 8"
    ):
        jtp.plans.check_llama(CFG, mesh, seq_len=30, sequence_parallel=True)
    jtp.plans.check_llama(CFG, mesh, seq_len=30, sequence_parallel=False)  # fine without SP
    task = LlamaTask(LlamaTaskConfig(seq_len=30, sequence_parallel=True))
    trainer = jtp.Trainer(jtp.ModelParallelStrategy(1, 8), logger=None)
    with pytest.raises(ValueError, match="sequence length 30"):
        trainer.fit(task)


def test_presets_shapes_abstractly():
    for name, billions in (("llama3-8b", 8.03), ("llama3-70b", 70.55)):
        abstract = nnx.eval_shape(factory(PRESETS[name]))
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        assert n == PRESETS[name].num_params()
        assert abs(n / 1e9 - billions) < 0.01, n


def test_cli_llama_2d(tmp_path):
    from jtp.cli.train import main

    path = tmp_path / "m.json"
    metrics = main(
        [
            "--devices",
            "8",
            "--model",
            "llama",
            "--data-parallel",
            "2",
            "--tensor-parallel",
            "4",
            "--fsdp",
            "--sequence-parallel",
            "--loss-parallel",
            "--remat",
            "--precision",
            "bf16-mixed",
            "--samples",
            "32",
            "--no-progress",
            "--root-dir",
            str(tmp_path),
            "--metrics-json",
            str(path),
        ]
    )
    assert metrics["mesh"] == {"data": 2, "tensor": 4} and metrics["steps"] == 4
    assert all(np.isfinite(metrics["losses"])) and metrics["losses"][0] > 5.0  # ~ln(512)


def test_abstract_step_is_the_trainers_step():
    """jtp.training.compile.abstract_train_step compiles, from shapes alone, the very program
    Trainer.fit runs: same per-device memory, same collectives."""
    from jtp.training.compile import abstract_train_step

    config = LlamaTaskConfig(samples=16, fsdp=True, sequence_parallel=True, loss_parallel=True)
    trainer = jtp.Trainer(
        jtp.ModelParallelStrategy(2, 4),
        max_steps=1,
        enable_progress_bar=False,
        logger=None,
        report_memory=False,
    )
    trainer.fit(LlamaTask(config))
    task = LlamaTask(config)
    compiled = abstract_train_step(
        task,
        jtp.ModelParallelStrategy(2, 4, fsdp=True),
        jax.ShapeDtypeStruct((8, 33), np.int32),
        factory=task.model_factory(),
        plan=task.plan,
    )
    assert jtp.memory_breakdown(compiled) == jtp.memory_breakdown(trainer.compiled_step)
    mesh = trainer.mesh
    key = lambda cs: sorted((c.kind, c.axes, c.bytes) for c in cs)  # noqa: E731
    assert key(jtp.collectives(compiled, mesh)) == key(jtp.collectives(trainer.compiled_step, mesh))


def test_config_and_activation_rule_errors():
    with pytest.raises(ValueError, match="dim 100 not divisible by n_heads 16"):
        LlamaConfig(dim=100)
    with pytest.raises(ValueError, match="n_heads 16 not divisible by n_kv_heads 6"):
        LlamaConfig(n_kv_heads=6)
    with pytest.raises(ValueError, match=r"activation='gelu' must be one of \['silu', 'gelu_t"):
        LlamaConfig(activation="gelu")
    for field in ("sliding_window", "attn_softcap", "final_softcap", "query_pre_attn_scalar"):
        with pytest.raises(ValueError, match=f"{field}=0 must be > 0 \\(or None: off\\)"):
            LlamaConfig(**{field: 0})
    with pytest.raises(ValueError, match="sliding_layers is empty"):
        LlamaConfig(sliding_layers=())
    # a pattern repeated over the layers (a checkpoint's JSON gives a list)
    config = LlamaConfig(n_layers=5, sliding_window=4, sliding_layers=[True, True, False])
    assert config.layer_sliding() == (True, True, False, True, True)
    assert hash(config) and config.sliding_layers == (True, True, False)
    mesh = jtp.make_mesh(1, 8)
    x = jax.numpy.ones((2, 4))
    with jtp.activation_rules(mesh, {"residual": jax.sharding.PartitionSpec("data", None, None)}):
        with pytest.raises(
            ValueError,
            match=r"activation rule 'residual'.*3 dims but the marked array has 2 \(shape",
        ):
            jtp.shard_activation(x, "residual")
    assert jtp.shard_activation(x, "residual") is x  # no rules: a no-op
