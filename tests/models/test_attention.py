"""Which attention kernel runs. cuDNN's fused kernel needs an NVIDIA GPU, so this CPU suite
tests the choice itself, that the choice reaches ``jax.nn.dot_product_attention``, and what
lowering for CUDA without a GPU can show; ``python -m jtp.bench gpu`` checks on a GPU that
the compiled program holds cuDNN's fused attention call."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtp.models import attention as attention_module
from jtp.models.attention import choose_attention
from jtp.models.llama import Llama, LlamaConfig

GPU = {"platform": "gpu", "compute_capability": "9.0"}


@pytest.mark.parametrize(
    "requested,facts,expected",
    [
        ("auto", dict(GPU, dtype=jnp.bfloat16, head_dim=128), "cudnn"),
        ("auto", dict(GPU, dtype=jnp.float16, head_dim=64), "cudnn"),
        ("auto", dict(GPU, dtype=jnp.bfloat16, head_dim=256), "cudnn"),  # Hopper: up to 256
        ("auto", dict(GPU, dtype=jnp.float32, head_dim=128), "xla"),  # cuDNN refuses fp32
        ("auto", dict(GPU, dtype=jnp.bfloat16, head_dim=100), "xla"),  # not a multiple of 8
        (
            "auto",
            dict(platform="gpu", compute_capability="8.0", dtype=jnp.bfloat16, head_dim=256),
            "xla",
        ),  # Ampere: up to 128
        ("auto", dict(platform="cpu", dtype=jnp.bfloat16, head_dim=128), "xla"),
        ("xla", dict(GPU, dtype=jnp.bfloat16, head_dim=128), "xla"),
        ("cudnn", dict(GPU, dtype=jnp.bfloat16, head_dim=128), "cudnn"),
        # Gemma 2's soft-capped scores: cuDNN's kernel has no cap, auto never takes it
        ("auto", dict(GPU, dtype=jnp.bfloat16, head_dim=128, softcap=50.0), "xla"),
        ("blockwise", dict(GPU, dtype=jnp.bfloat16, head_dim=128, softcap=50.0), "blockwise"),
    ],
)
def test_choice(requested, facts, expected):
    impl, why = choose_attention(requested, **facts)
    assert impl == expected and why


@pytest.mark.parametrize(
    "facts,reason",
    [
        (dict(platform="cpu", dtype=jnp.bfloat16, head_dim=64), "no GPU"),
        (dict(GPU, dtype=jnp.float32, head_dim=64), "float32 inputs"),
        (dict(GPU, dtype=jnp.bfloat16, head_dim=12), "head dim 12"),
        (dict(GPU, dtype=jnp.bfloat16, head_dim=64, softcap=30.0), "scores soft-capped"),
    ],
)
def test_cudnn_where_it_cannot_run_is_a_clear_error(facts, reason):
    with pytest.raises(ValueError, match=f"attention='cudnn' cannot run here: {reason}"):
        choose_attention("cudnn", **facts)


def test_a_bad_name_fails_at_config_time():
    with pytest.raises(ValueError, match="attention='flash'"):
        LlamaConfig(attention="flash")


def _tiny(**kw):
    return Llama(LlamaConfig(n_layers=1, **kw), rngs=nnx.Rngs(0))


def test_the_choice_reaches_jax_and_is_logged_once(monkeypatch, caplog):
    """On a (pretended) Hopper GPU with bf16 inputs the Llama asks jax for cuDNN; with
    float32 inputs for XLA; each choice is logged once with its reason."""
    seen = []
    monkeypatch.setattr(attention_module, "_device_facts", lambda: ("gpu", "9.0"))
    monkeypatch.setattr(attention_module, "_announced", set())
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kw):
        seen.append(implementation)
        return real(*args, implementation="xla", **kw)  # this machine has no cuDNN

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    tokens = jnp.zeros((2, 8), jnp.int32)
    with caplog.at_level(logging.INFO, logger="jtp.models.attention"):
        _tiny(dtype="bfloat16")(tokens)
        _tiny(dtype="bfloat16")(tokens)
        _tiny()(tokens)
    assert seen == ["cudnn", "cudnn", "xla"]
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and "cudnn" in logged[0] and "float32 inputs" in logged[1]


def test_soft_capped_scores_never_reach_jax_kernels(monkeypatch):
    """A model with soft-capped scores (Gemma 2) on a (pretended) Hopper GPU with bf16
    inputs, where "auto" would otherwise ask jax for cuDNN: jax's attention, which has no
    cap, is never called (jtp's XLA path with the cap runs), and the logits are those of
    ``attention="xla"``."""
    monkeypatch.setattr(attention_module, "_device_facts", lambda: ("gpu", "9.0"))
    calls = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(k))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 8)), jnp.int32)
    auto = _tiny(dtype="bfloat16", attn_softcap=20.0)(tokens)
    assert calls == []
    np.testing.assert_array_equal(
        auto, _tiny(dtype="bfloat16", attn_softcap=20.0, attention="xla")(tokens)
    )


def test_lowering_for_cuda_without_a_gpu():
    """``jax.export(..., platforms=["cuda"])`` lowers the XLA path for CUDA on this
    CPU-only machine: the whole bf16 Llama forward is valid CUDA StableHLO. It cannot lower
    the cuDNN path: jax's cuDNN rule asks the local backend for cuDNN's version and the
    GPU's compute capability, which a CPU machine does not have, so it fails before any
    HLO exists (that is what python -m jtp.bench gpu checks on a GPU)."""
    model = _tiny(dtype="bfloat16", attention="xla")
    graphdef, state = nnx.split(model)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    exported = jax.export.export(jax.jit(forward), platforms=["cuda"])(state, tokens)
    assert exported.platforms == ("cuda",)
    assert "bf16" in exported.mlir_module()
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    cudnn = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, implementation="cudnn"))
    with pytest.raises(Exception):  # noqa: B017 - any refusal: there is no cuDNN here
        jax.export.export(cudnn, platforms=["cuda"])(q)


def test_xla_and_auto_agree_on_cpu():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 8)), jnp.int32)
    np.testing.assert_array_equal(_tiny(attention="xla")(tokens), _tiny()(tokens))
