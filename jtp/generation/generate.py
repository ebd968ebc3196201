"""``jtp.generate``: token ids in, new token ids out, with a sharded key/value cache.

Prompts of any lengths and any number are left-padded to one length and the batch padded
to a multiple of the mesh's "data" size; each prompt keeps its own positions (RoPE and the
mask follow the sequence: :mod:`jtp.models.cache`). Prompt length, batch and the cache's
length are rounded up to buckets (powers of two; at least 8 tokens), so prefill compiles once per
(batch, prompt) bucket and the decode loop once per (batch, cache) bucket: never per
token. The loop runs inside one compiled program (``jax.lax.while_loop``) and stops when
every sequence has met ``eos_token_id`` or ``max_new_tokens`` are made.

The cache is laid out like attention, by the plan's "heads" rule (kv heads over "tensor",
batch over "data"), on the mesh the model's parameters live on: a model from
``jtp.hf.load_pretrained`` or fresh from ``Trainer.fit`` alike.

Context parallelism (a "context" mesh axis, :mod:`jtp.parallel.context`) is for training
and evaluation: it splits a long sequence into pieces and gathers the keys and values once
per layer. Generation keeps its layout: a decode step attends one new token to every cached
slot, so split slots would be gathered at every token, and prefill would gather the
prompt's keys all the same. A model on a mesh with a context axis is refused before any
compile (:func:`check_mesh`), not silently gathered; its parameters are replicated over that
axis, so ``jtp.parallelize`` onto a mesh without it (or loading there) loses nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from numbers import Integral
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.errors import InputError
from jtp.generation.sampling import sample
from jtp.mesh import CONTEXT, DATA, batch_ranks, context_size, mesh_shape
from jtp.models.cache import init_cache
from jtp.models.plans import llama as llama_plan
from jtp.parallel.activations import activation_rules
from jtp.parallel.batch import shard_batch

MIN_BUCKET = 8
DECODE_MARKS = ("heads", "ffn_hidden", "experts")  # the activation rules generation applies


def bucket(n: int, multiple: int = 1, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum), rounded up to a multiple of ``multiple``."""
    b = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return -(-b // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each next token is chosen: greedy at ``temperature`` 0."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None


def _mesh_of(model: nnx.Module) -> Mesh | None:
    for leaf in jax.tree.leaves(nnx.state(model)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(model: Any, prompts: list[list[int]], max_new_tokens: int, s: Sampling) -> None:
    c = getattr(model, "config", None)
    if c is None or not hasattr(c, "n_kv_heads"):
        raise TypeError(
            "jtp.generate: takes jtp's Llama (jtp.models.Llama, or jtp.hf.load_pretrained)"
        )
    if (
        isinstance(prompts, str)
        or not isinstance(prompts, list | tuple)
        or not all(isinstance(p, list | tuple) and not isinstance(p, str) for p in prompts)
    ):
        raise InputError(
            "jtp.generate: prompts is a list of prompts, each a list of token ids "
            f"([[1, 2, 3]] for one prompt), got {_shown(prompts)}"
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("jtp.generate: give at least one prompt, each at least one token long")
    odd = [t for p in prompts for t in p if isinstance(t, bool) or not isinstance(t, Integral)]
    if odd:
        raise InputError(f"jtp.generate: token ids are ints, got {odd[0]!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral):
        raise InputError(f"jtp.generate: max_new_tokens={max_new_tokens!r} must be an int")
    if max_new_tokens < 1:
        raise InputError(f"jtp.generate: max_new_tokens={max_new_tokens} must be >= 1")
    if not all(math.isfinite(v) for v in (s.temperature, s.top_p or 1.0)):
        raise InputError(f"jtp.generate: temperature and top_p must be finite (got {s})")
    bad = [t for p in prompts for t in p if not 0 <= t < c.vocab_size]
    if bad:
        raise InputError(
            f"jtp.generate: token id {bad[0]} outside the vocabulary [0, {c.vocab_size})"
        )
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > c.max_seq_len:
        raise InputError(
            f"jtp.generate: the longest prompt plus max_new_tokens is {longest} positions, more "
            f"than the model's max_seq_len {c.max_seq_len}; shorten it, or load with a larger "
            "max_seq_len"
        )
    if s.temperature < 0 or (s.top_k is not None and s.top_k < 1):
        raise InputError(f"jtp.generate: temperature >= 0 and top_k >= 1 (got {s})")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise InputError(f"jtp.generate: top_p={s.top_p} must be in (0, 1]")


def check_mesh(mesh: Mesh | None, where: str = "jtp.generate") -> None:
    """Refuse a mesh with a context axis (this module's docstring says why) with an
    :class:`InputError` naming a mesh that works."""
    if mesh is None or context_size(mesh) == 1:
        return
    # The same devices, the context axis' folded into "data" (more rows at once)
    shape = {k: v for k, v in mesh_shape(mesh).items() if k != CONTEXT}
    shape[DATA] = shape.get(DATA, 1) * context_size(mesh)
    sizes = ", ".join(f"{k}={v}" for k, v in shape.items())
    raise InputError(
        f"{where}: the model is on a mesh with a '{CONTEXT}' axis ({mesh_shape(mesh)}); "
        f"generation does not split the sequence over '{CONTEXT}' (context parallelism "
        "splits training and evaluation sequences; a decode step attends one token to the "
        "whole cache, which every device would gather at every token): put the model on a "
        f"mesh without it, e.g. jtp.make_mesh({sizes}) (jtp.parallelize(model, mesh, "
        "jtp.plans.llama(model.config)), or load the checkpoint there)"
    )


def generate(
    model: nnx.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Each prompt's new tokens (up to and including ``eos_token_id``, if met).

    Example::

      model = jtp.hf.load_pretrained("Llama-3.1-8B", mesh)
      new = jtp.generate(model, [[128000, 791, 6864], [128000, 40]], max_new_tokens=32)
    """
    tokens, _ = generate_timed(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=Sampling(temperature, top_k, top_p),
        eos_token_id=eos_token_id,
        seed=seed,
    )
    return tokens


@dataclasses.dataclass(frozen=True)
class Timing:
    """Where a :func:`generate_timed` call spent its time (compiles excluded when warm)."""

    prefill_s: float  # the prompts through the model, the cache written, the first token
    decode_s: float  # the loop that makes the rest
    decode_steps: int  # tokens made per sequence after the first (the loop's trips)
    batch: int  # rows computed (the prompts padded to the batch bucket)
    prompt_tokens: int  # real prompt tokens (padding excluded)
    cache_bytes: int  # the key/value cache, all devices together
    cache_bytes_per_device: int  # what one device holds of it


def generate_timed(
    model: nnx.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_token_id: int | None = None,
    seed: int = 0,
) -> tuple[list[list[int]], Timing]:
    """:func:`generate`, also saying how long prefill and decoding took."""
    _check(model, prompts, max_new_tokens, sampling)
    mesh = _mesh_of(model)
    check_mesh(mesh)
    n_data = batch_ranks(mesh) if mesh is not None else 1
    n, longest = len(prompts), max(len(p) for p in prompts)
    b, t = bucket(n, n_data, minimum=1), bucket(longest)  # rows: no more than needed
    slots = bucket(t + max_new_tokens)
    tokens = np.zeros((b, t), np.int32)
    lengths = np.ones((b,), np.int32)  # padding rows: a one-token prompt, results dropped
    for i, p in enumerate(prompts):
        tokens[i, t - len(p) :] = p
        lengths[i] = len(p)
    if mesh is not None:
        tokens_d, lengths_d = shard_batch(tokens, mesh), shard_batch(lengths, mesh)
    else:
        tokens_d, lengths_d = jnp.asarray(tokens), jnp.asarray(lengths)
    graphdef, state = nnx.split(model)
    prefill, decode = _compiled(graphdef, mesh, sampling, slots, eos_token_id)
    t0 = time.perf_counter()
    carry = jax.block_until_ready(prefill(state, tokens_d, lengths_d, jax.random.key(seed)))
    t1 = time.perf_counter()
    steps, out = jax.block_until_ready(decode(state, carry, lengths_d, jnp.int32(max_new_tokens)))
    t2 = time.perf_counter()
    cache = carry[2]
    per_device = sum(x.addressable_shards[0].data.nbytes for x in (cache.k, cache.v))
    timing = Timing(
        t1 - t0,
        t2 - t1,
        int(steps) - 1,
        b,
        sum(len(p) for p in prompts),
        cache.k.nbytes + cache.v.nbytes,
        per_device,
    )
    result = []
    for row in np.asarray(jax.device_get(out))[:n]:
        row = [int(x) for x in row[:max_new_tokens]]
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        result.append(row)
    return result, timing


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, mesh, sampling, slots, eos):
    """The jitted prefill and decode of one (model structure, mesh, sampling, cache slots,
    eos); jit compiles each once per (batch, prompt) bucket."""
    args = (graphdef, mesh, sampling, slots, eos)
    return jax.jit(functools.partial(_program, _prefill, *args)), jax.jit(
        functools.partial(_program, _decode, *args)
    )


def _program(fn, graphdef, mesh, sampling, slots, eos, state, *args):
    model = nnx.merge(graphdef, state)
    if mesh is None:
        return fn(model, sampling, slots, eos, None, *args)
    # Only attention's heads (and so the cache) and the feed-forward's hidden are laid out
    # as in training; the residual stream and the logits are left where XLA puts them. The
    # logits then stay split over the vocabulary as the output projection leaves them
    # (sampling reduces across the shards; the "logits" rule would gather them), and under
    # fsdp a decode step all-reduces its few (B, 1, D) activations over "data" where the
    # "residual" rule would make XLA all-gather the row-parallel weights every step.
    rules = {
        k: v
        for k, v in llama_plan(model.config, mesh=mesh).activations.items()
        if k in DECODE_MARKS
    }
    with activation_rules(mesh, rules, check_unused=False):
        return fn(model, sampling, slots, eos, mesh, *args)


def _prefill(model, sampling, slots, eos, mesh, tokens_bt, lengths_b, key):
    """The prompts through the model into an empty cache; the first new token."""
    b, t = tokens_bt.shape
    cache = init_cache(model, b, slots)
    if mesh is not None:  # the plan's "heads" layout, behind a leading layer axis
        spec = P(None, *llama_plan(model.config).activations["heads"])
        cache = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)), cache
        )
    pad_b = t - lengths_b  # left padding of each row
    slot_s = jnp.arange(slots)
    valid_bs = (slot_s[None, :] >= pad_b[:, None]) & (slot_s[None, :] < t)  # the prompt
    positions_bt = jnp.maximum(jnp.arange(t)[None, :] - pad_b[:, None], 0)
    logits_btv, cache = model(tokens_bt, cache=cache, positions_bt=positions_bt, valid_bs=valid_bs)
    key, step_key = jax.random.split(key)
    first_b = sample(logits_btv[:, -1], sampling, step_key)
    out_bn = jnp.zeros((b, slots - t), jnp.int32).at[:, 0].set(first_b)
    done_b = first_b == eos if eos is not None else jnp.zeros((b,), bool)
    return jnp.int32(1), first_b, cache, valid_bs, done_b, out_bn, key


def _decode(model, sampling, slots, eos, mesh, carry, lengths_b, n):
    """One token per trip until ``n`` are made or every row has met ``eos``."""
    t = slots - carry[5].shape[1]  # the prompt bucket

    def cond(carry):
        i, _, _, _, done_b, _, _ = carry
        return (i < n) & ~jnp.all(done_b)

    def body(carry):
        i, last_b, cache, valid_bs, done_b, out_bn, key = carry
        slot = t + i - 1  # where the last token goes
        valid_bs = valid_bs.at[:, slot].set(True)
        positions_b1 = (lengths_b + i - 1)[:, None]
        logits_b1v, cache = model(
            last_b[:, None],
            cache=cache,
            positions_bt=positions_b1,
            cache_index=slot,
            valid_bs=valid_bs,
        )
        key, step_key = jax.random.split(key)
        next_b = sample(logits_b1v[:, 0], sampling, step_key)
        next_b = jnp.where(done_b, eos if eos is not None else 0, next_b)
        out_bn = out_bn.at[:, i].set(next_b)
        done_b = done_b | (next_b == eos) if eos is not None else done_b
        return i + 1, next_b, cache, valid_bs, done_b, out_bn, key

    final = jax.lax.while_loop(cond, body, carry)
    return final[0], final[5]
