"""Hugging Face checkpoints on meshes with a "context" axis: transformers' logits, the
sequence split into balanced pieces; generation's refusal of such a mesh.

The committed fixtures (``tests/fixtures/hf``, test_hf.py's) are loaded born sharded onto
each mesh; the fixture's 16 tokens go in :func:`~jtp.parallel.context.balanced_order` for
the mesh's C (16 is divisible by 2C for C up to 8: at C 8 every chunk is one token), their
positions given to the model as ``positions_bt`` (B, T), and the logits, which leave the
forward split over "context", are put back in order and compared with transformers'. Mistral
is ``mistral_window`` (``scripts/make_hf_fixtures.py --only mistral_window``, transformers
5.25): the "mistral" fixture's window of 32 masks nothing in 16 tokens; this one's 5 does
(switching it off moves transformers' logits by 1.07 of the largest), and reaches into
other devices' pieces at every C here. Gemma 3 has sliding / global / sliding layers (window
8) with two RoPE bases; Gemma 2 soft-caps the scores (XLA's positioned attention routes
them through ``masked_attention``'s soft-capped path) and the logits.

The cases cover, between them, context alone, with data, tensor, fsdp and sequence
parallelism, and both kernels that attend by position (XLA's masked one and the blockwise
one); each family runs on one or two of them.

Tolerances, as test_hf.py's: max |jtp - transformers| / max |transformers| <= 1e-4 and mean
KL(transformers || jtp) <= 1e-6; seen <= 1.4e-6 and <= 7e-13. Both compute in float32: the
pieces change only the order of sums (the softmax over keys gathered in the batch's order,
or tile by tile with the blockwise kernel's online softmax, and the sums split over
"tensor" / "data"), and a masked key adds exactly 0, so the logits carry the same few
hundred roundings of 6e-8 as on one device (<= 1.4e-6 there too). Anything structural is
O(1): the same tokens in the balanced order without their positions miss transformers' by
0.25-1.5 of the largest logit (RoPE and the mask then read the order as the sequence), a
missing window 1.07.
"""

import importlib

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import pieces_logits
from test_hf import T, errors, fixture, reference

import jtp

# id -> (fixture, mesh sizes, fsdp, sequence parallel, attention kernel). Each case loads
# its fixture onto its own mesh: a load takes 0.1-0.2 s (the compile, ~2 s, is the cost),
# and reading a checkpoint slice by slice onto a context mesh is part of what is checked.
CASES = {
    "llama3-c8": ("llama3", dict(context=8), False, False, "xla"),
    "qwen3-d2c4-blockwise": ("qwen3", dict(data=2, context=4), False, False, "blockwise"),
    "mistral-c8-blockwise": ("mistral_window", dict(context=8), False, False, "blockwise"),
    "mistral-d2c2t2-fsdp-sp": (
        "mistral_window",
        dict(data=2, context=2, tensor=2),
        True,
        True,
        "xla",
    ),
    "gemma3-c4t2-sp-blockwise": ("gemma3", dict(context=4, tensor=2), False, True, "blockwise"),
    "gemma3-d2c2t2-fsdp": ("gemma3", dict(data=2, context=2, tensor=2), True, False, "xla"),
    "gemma2-d2c4-softcap": ("gemma2", dict(data=2, context=4), False, False, "xla"),
}


def context_mesh(sizes):
    n = int(np.prod(list(sizes.values())))
    return jtp.make_mesh(**sizes, devices=jax.devices()[:n])


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_on_context_meshes(case):
    name, sizes, fsdp, sp, attention = CASES[case]
    mesh = context_mesh(sizes)
    model = jtp.hf.load_pretrained(
        fixture(name), mesh, fsdp=fsdp, sequence_parallel=sp, max_seq_len=T, attention=attention
    )
    assert model.config.attention == attention
    tokens, want = reference(name)
    logits, sharding = pieces_logits(model, mesh, tokens, sp)
    rel, kl = errors(logits, want)
    assert rel <= 1e-4 and kl <= 1e-6, (rel, kl)
    assert "context" in jax.tree.leaves(sharding.spec[1])  # the sequence stays split


def test_the_windowed_fixture_masks_within_the_sequence():
    """mistral_window's window (5) is shorter than its 16 tokens, on every layer."""
    config = jtp.hf.config_of(fixture("mistral_window"), max_seq_len=T)
    assert config.sliding_window == 5 < T and all(config.layer_sliding())


# ---------------------------------------------------------------- generation's stance
@pytest.fixture(scope="module")
def on_context_mesh():
    """qwen3 on data 1 x context 2 x tensor 4 (read slice by slice: nothing compiled)."""
    mesh = context_mesh(dict(context=2, tensor=4))
    return jtp.hf.load_pretrained(fixture("qwen3"), mesh, max_seq_len=T), mesh


def test_generate_refuses_a_context_mesh_before_compiling(on_context_mesh, monkeypatch):
    """jtp.generate keeps its layout: a model on a mesh with a context axis is an
    InputError naming a mesh without it (the context devices folded into "data"), raised
    before prefill or decode is built."""
    gen = importlib.import_module("jtp.generation.generate")  # the module, not the function

    def no_compile(*args):
        raise AssertionError("compiled before refusing")

    monkeypatch.setattr(gen, "_compiled", no_compile)
    model, _ = on_context_mesh
    with pytest.raises(jtp.InputError, match=r"generation does not split the sequence over "):
        jtp.generate(model, [[1, 2, 3]], max_new_tokens=2)
    with pytest.raises(jtp.InputError, match=r"jtp.make_mesh\(data=2, tensor=4\)"):
        gen.generate_timed(model, [[1, 2, 3]], max_new_tokens=2)


def test_a_cached_forward_under_context_rules_is_refused(on_context_mesh):
    """The decoder's cached forward (what generation runs) under a context mesh's
    activation rules is refused while tracing (abstract inputs: nothing compiles), where
    it used to gather every piece without a word."""
    from jtp.models.cache import init_cache

    model, mesh = on_context_mesh
    graphdef, state = nnx.split(model)

    def prefill(state, tokens_bt):
        m = nnx.merge(graphdef, state)
        return m(tokens_bt, cache=init_cache(m, tokens_bt.shape[0], T))

    tokens = jax.ShapeDtypeStruct((4, 8), np.int32)
    with jtp.activation_rules(mesh, jtp.plans.llama(model.config, mesh=mesh).activations):
        with pytest.raises(jtp.InputError, match="a key/value cache is not split over 'context'"):
            jax.eval_shape(prefill, state, tokens)
