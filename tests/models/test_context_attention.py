"""Attention by position and across context pieces: the kernels against attention in order.

Every case compares with ``softcapped_attention`` / ``jax.nn.dot_product_attention`` on the
sequence in order (float32): the only differences are the order in which the softmax sums
its terms (by tile, by ring step, by piece), so outputs and gradients agree to float32
rounding of sums of O(T) terms, 1e-5 relative with margin at these sizes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err
from jax.sharding import PartitionSpec as P

import jtp
from jtp.errors import InputError
from jtp.models.attention import positioned_attention, softcapped_attention
from jtp.models.blockwise import blockwise_attention
from jtp.models.llama import PRESETS, Llama
from jtp.models.ring import ring_attention
from jtp.parallel.activations import activation_rules
from jtp.parallel.context import attend_pieces, balanced_order, next_token_pieces

TOL = 1e-5
B, T, H, K, E = 2, 32, 4, 2, 8


def _qkv(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (B, T, H, E)),
        jax.random.normal(keys[1], (B, T, K, E)),
        jax.random.normal(keys[2], (B, T, K, E)),
    )


def _reference(q, k, v, *, window=None, softcap=None):
    """Attention in order: keys ``t - window < s <= t`` (None: all earlier)."""
    local = None if window is None else (window - 1, 0)
    if softcap is not None:
        return softcapped_attention(q, k, v, softcap=softcap, local_window_size=local)
    rep = H // K
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local)


def _loss_and_grads(fn, q, k, v):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)


def test_balanced_order_gives_each_piece_an_early_and_a_late_chunk():
    order = balanced_order(16, 4)  # 8 chunks of 2: pieces (0, 7), (1, 6), (2, 5), (3, 4)
    np.testing.assert_array_equal(np.sort(order), np.arange(16))
    np.testing.assert_array_equal(order[:4], [0, 1, 14, 15])
    np.testing.assert_array_equal(order[12:], [6, 7, 8, 9])
    np.testing.assert_array_equal(balanced_order(8, 1), np.arange(8))
    with pytest.raises(InputError, match="not divisible by 8"):
        balanced_order(12, 4)


def test_next_token_pieces_keep_each_label_with_its_input():
    tokens = np.arange(17) * 10
    pieces = next_token_pieces(tokens, 2)
    np.testing.assert_array_equal(pieces["inputs"], pieces["positions"] * 10)
    np.testing.assert_array_equal(pieces["labels"], pieces["positions"] * 10 + 10)


@pytest.mark.parametrize(
    "implementation, window, softcap",
    [("xla", None, None), ("xla", 5, 30.0), ("blockwise", None, None), ("blockwise", 5, 30.0)],
)
def test_attention_by_position_equals_attention_in_order(implementation, window, softcap):
    """Queries and keys in a shuffled order, masked by position: the outputs (and
    gradients) of the sequence in order, shuffled alike."""
    q, k, v = _qkv()
    perm = np.random.default_rng(0).permutation(T)
    pos = jnp.asarray(perm, jnp.int32)
    block = {"block_q": 8, "block_k": 8} if implementation == "blockwise" else {}

    def shuffled(q, k, v):
        if implementation == "blockwise":
            local = None if window is None else (window - 1, 0)
            out = blockwise_attention(
                q[:, perm],
                k[:, perm],
                v[:, perm],
                local_window_size=local,
                softcap=softcap,
                q_positions=pos,
                k_positions=pos,
                **block,
            )
        else:
            out = positioned_attention(
                q[:, perm],
                k[:, perm],
                v[:, perm],
                pos,
                pos,
                implementation=implementation,
                window=window,
                softcap=softcap,
            )
        return out[:, np.argsort(perm)]

    ref_loss, ref_grads = _loss_and_grads(
        lambda *a: _reference(*a, window=window, softcap=softcap), q, k, v
    )
    loss, grads = _loss_and_grads(shuffled, q, k, v)
    assert abs(float(loss) - float(ref_loss)) <= TOL * abs(float(ref_loss))
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(np.asarray(g), np.asarray(ref)) <= TOL


def test_cudnn_is_refused_by_position():
    q, k, v = _qkv()
    pos = jnp.arange(T)
    with pytest.raises(ValueError, match="cuDNN's causal mask compares indices"):
        positioned_attention(q, k, v, pos, pos, implementation="cudnn")


@pytest.mark.parametrize(
    "strategy, tiles", [("all-gather", "one"), ("ring", "blocks"), ("all-gather", "blocks")]
)
def test_attention_across_four_pieces_equals_one_device(strategy, tiles):
    """q, k, v split over context=4 x tensor=2 (heads), batch in the balanced order, a
    window and soft-capping on: the strategies' outputs and gradients against attention in
    order on one device."""
    mesh = jtp.make_mesh(data=1, context=4, tensor=2)
    order = balanced_order(T, 4)
    pos_bt = jnp.broadcast_to(jnp.asarray(order), (B, T))
    window, softcap = 9, 30.0
    block = {"block_q": T, "block_k": T} if tiles == "one" else {"block_q": 4, "block_k": 4}

    def by_position(q, k, v, qp, kp):
        local = (window - 1, 0)
        return blockwise_attention(
            q,
            k,
            v,
            local_window_size=local,
            softcap=softcap,
            q_positions=qp,
            k_positions=kp,
            **block,
        )

    def by_ring(q, k, v, qp, kp, **axis):
        return ring_attention(q, k, v, qp, kp, window=window, softcap=softcap, **block, **axis)

    def pieces(q, k, v):
        out = attend_pieces(
            by_position,
            q[:, order],
            k[:, order],
            v[:, order],
            pos_bt,
            strategy=strategy,
            ring=by_ring,
        )
        return out[:, np.argsort(order)]

    q, k, v = _qkv(1)
    ref_loss, ref_grads = _loss_and_grads(
        lambda *a: _reference(*a, window=window, softcap=softcap), q, k, v
    )
    rules = {"heads": P("data", None, "tensor", None)}
    with activation_rules(mesh, rules, check_unused=False):
        loss, grads = _loss_and_grads(pieces, q, k, v)
    assert abs(float(loss) - float(ref_loss)) <= TOL * abs(float(ref_loss))
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(np.asarray(g), np.asarray(ref)) <= TOL


def test_a_model_given_positions_computes_the_sequence_in_order():
    """One device, no mesh: the tiny Llama on a balanced batch with its positions gives the
    logits of the batch in order, permuted alike (RoPE at the positions, masks by them)."""
    config = dataclasses.replace(PRESETS["tiny"], n_layers=2)
    model = jtp.sharded_init(
        lambda: Llama(config, rngs=nnx.Rngs(0)), jtp.make_mesh(1, 1, devices=jax.devices()[:1]), {}
    )  # initialised in one compiled program, not op by op
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, T), dtype=np.int32)
    order = balanced_order(T, 4)
    forward = nnx.jit(lambda model, tokens, positions: model(tokens, positions_bt=positions))
    ref = np.asarray(nnx.jit(lambda model, tokens: model(tokens))(model, jnp.asarray(tokens)))
    got = forward(model, jnp.asarray(tokens[:, order]), jnp.broadcast_to(order, (2, T)))
    assert rel_err(np.asarray(got), ref[:, order]) <= TOL


def test_a_config_refuses_an_unknown_context_attention():
    with pytest.raises(ValueError, match="context_attention='rings' must be one of"):
        dataclasses.replace(PRESETS["tiny"], context_attention="rings")
