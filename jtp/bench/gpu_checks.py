"""The checks ``python -m jtp.bench gpu`` makes beside its run, which only a GPU can make:
cuDNN's fused attention against XLA's and jtp's blockwise kernel (errors against float32,
time), and the CPU planner's memory for a layout against XLA's figure for the GPU."""

from __future__ import annotations

import statistics
import time
from typing import Any

ATTENTION_SHAPE = {"batch": 1, "seq": 8192, "heads": 32, "kv_heads": 8, "head_dim": 128}
SMOKE_ATTENTION_SHAPE = {"batch": 1, "seq": 64, "heads": 4, "kv_heads": 2, "head_dim": 16}
# bf16 attention against a float32 reference: each bf16 kernel rounds its inputs and its
# probabilities to 8 significant bits, so outputs and gradients differ from the reference by
# a few bf16 ulps (2^-8 relative) of their largest element; 3e-2 leaves room for the sums.
ATTENTION_RTOL = 3e-2


# The cases of ``python -m jtp.bench attention``: the shapes of real models' attention,
# each with the options that select a kernel (window, soft-cap, score scale).
ATTENTION_CASES = {
    "llama3-8b causal": dict(ATTENTION_SHAPE),
    # Gemma 2 9B: a sliding layer's 4096-token window over 8192 tokens, the layer's kind
    # traced (one scanned block for both kinds: jax.lax.cond between two static windows).
    "gemma2-9b sliding (traced kind)": {
        "batch": 1,
        "seq": 8192,
        "heads": 16,
        "kv_heads": 8,
        "head_dim": 256,
        "window": 4096,
    },
    # Gemma 2's soft-capped scores (50): no fused kernel computes them.
    "gemma2-9b soft-capped, sliding": {
        "batch": 1,
        "seq": 8192,
        "heads": 16,
        "kv_heads": 8,
        "head_dim": 256,
        "window": 4096,
        "softcap": 50.0,
    },
    # Gemma 3 4B: a 1024-token window, query_pre_attn_scalar 256 = head dim.
    "gemma3-4b sliding (traced kind)": {
        "batch": 1,
        "seq": 8192,
        "heads": 8,
        "kv_heads": 4,
        "head_dim": 256,
        "window": 1024,
        "scale": 256**-0.5,
    },
}
# The code path at tiny shapes: the two Gemma 2 cases take every branch the others do.
SMOKE_ATTENTION_CASES = {
    name: {**case, **SMOKE_ATTENTION_SHAPE, "window": 16}
    for name, case in ATTENTION_CASES.items()
    if name.startswith("gemma2")
}


def attention_check(case: dict[str, Any], platform: str) -> list[dict[str, Any]]:
    """cuDNN's fused attention (on a GPU), XLA's and jtp's blockwise kernel, on the same bf16
    (B, T, H, E) causal grouped-query inputs of ``case`` (:data:`ATTENTION_SHAPE`, or one of
    :data:`ATTENTION_CASES`): output and q/k/v gradients against XLA's attention in float32
    (max |error| / max |reference|, within :data:`ATTENTION_RTOL`), and the median forward +
    backward time of each. The fused kernel's numbers are what the CPU tests cannot show.
    With a ``window``, through :func:`jtp.models.layer_kinds.layer_attention` with the
    layer's kind traced (as in a scanned model of sliding and global layers), each kind
    timed and checked; with a ``softcap``, the kernels that compute it (no cuDNN: "auto"
    must not take it)."""
    import jax
    import jax.numpy as jnp

    from jtp.models.layer_kinds import layer_attention

    b, t, h, k, e = (case[n] for n in ("batch", "seq", "heads", "kv_heads", "head_dim"))
    window, softcap, scale = case.get("window"), case.get("softcap"), case.get("scale")
    keys = jax.random.split(jax.random.key(0), 4)
    q_bthe = jax.random.normal(keys[0], (b, t, h, e), jnp.float32)
    k_btke, v_btke = (jax.random.normal(x, (b, t, k, e), jnp.float32) for x in keys[1:3])
    cotangent = jax.random.normal(keys[3], (b, t, h, e), jnp.float32)

    def forward_backward(impl: str, dtype: Any):
        def loss(q, k, v, sliding):
            out = layer_attention(
                q,
                k,
                v,
                sliding=sliding,
                window=window,
                implementation=impl,
                scale=scale,
                softcap=softcap,
            )
            return jnp.sum(out.astype(jnp.float32) * cotangent), out

        cast = [x.astype(dtype) for x in (q_bthe, k_btke, v_btke)]
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        return fn, cast

    kinds = (True, False) if window is not None else (True,)  # sliding, global layer
    ref_fn, ref_args = forward_backward("xla", jnp.float32)
    refs = {s: ref_fn(*ref_args, jnp.bool_(s)) for s in kinds}
    impls = ["xla", "blockwise"]
    if platform == "gpu":
        impls.insert(0, "auto" if softcap is not None else "cudnn")
    rows = []
    for impl in impls:
        fn, args = forward_backward(impl, jnp.bfloat16)
        fn = fn.lower(*args, jnp.bool_(True)).compile()  # one compile: run and read
        hlo = fn.as_text()
        for sliding in kinds:
            (_, ref_out), ref_grads = refs[sliding]
            flag = jnp.bool_(sliding)
            (_, out), grads = jax.block_until_ready(fn(*args, flag))
            errors = {
                name: float(
                    jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want))
                )
                for name, got, want in zip(
                    ("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True
                )
            }
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args, flag))
                times.append(time.perf_counter() - t0)
            rows.append(
                {
                    "implementation": impl,
                    "layer": None if window is None else "sliding" if sliding else "global",
                    "relative_error": errors,
                    "within_tolerance": max(errors.values()) <= ATTENTION_RTOL,
                    "fused_kernel_in_program": "__cudnn$fmha" in hlo,
                    "forward_backward_ms": 1e3 * statistics.median(times),
                }
            )
    return rows


def planner_check(
    layout: Any, preset: str, layers: int, seq: int, micro_batch: int, gpu_memory: float
) -> dict[str, Any] | None:
    """What ``python -m jtp.capacity`` would have said about this layout without a GPU: the same
    step compiled for CPU devices as for a GPU (:data:`jtp.capacity.measure.AS_ON_GPU`, the
    blockwise kernel standing in for cuDNN), against the memory XLA compiles for the GPU
    itself. None where jax has fewer CPU devices than the layout needs."""
    import jax

    from jtp.capacity.measure import measure

    cpus = jax.devices("cpu")
    if len(cpus) < layout.data * layout.tensor:
        return None
    planned = measure(layout, preset, layers, seq, micro_batch, "bf16-mixed", cpus)["memory"]
    return {
        "cpu_planned_bytes": planned,
        "gpu_compiled_bytes": gpu_memory,
        "ratio": planned / gpu_memory,
    }


# A Gemma-3-style stack (5 sliding layers : 1 global, a 1024-token window, head dim 256),
# scanned with remat="dots": the cond between two static-window kernels inside the scan and
# its backward, which no CPU run can show with cuDNN's kernel in it.
GEMMA_MODEL = dict(
    vocab_size=32000,
    dim=2560,
    n_layers=6,
    n_heads=8,
    n_kv_heads=4,
    explicit_head_dim=256,
    ffn_hidden=10240,
    max_seq_len=4096,
    sliding_window=1024,
    sliding_layers=(True,) * 5 + (False,),
    local_rope_theta=10000.0,
    rope_theta=1e6,
    activation="gelu_tanh",
    norm_offset=True,
    embed_scale=True,
    sandwich_norms=True,
    query_pre_attn_scalar=256.0,
    qk_norm=True,
    tie_embeddings=True,
    remat="dots",
)
SMOKE_GEMMA_MODEL = {
    **GEMMA_MODEL,
    "vocab_size": 256,
    "dim": 64,
    "n_layers": 2,
    "sliding_layers": (True, False),
    "n_heads": 4,
    "n_kv_heads": 2,
    "explicit_head_dim": 16,
    "ffn_hidden": 128,
    "max_seq_len": 32,
    "sliding_window": 8,
}
# bf16 compute through six blocks against float32: each block rounds its matmuls' inputs
# to 8 significant bits (2^-9 relative), and the loss and the gradients' norm sum many such
# errors; seen a few 1e-3. 5e-2 still tells a wrong window or a wrong branch (O(1)).
MODEL_RTOL = 5e-2


def gemma_model_check(platform: str, smoke: bool = False) -> dict[str, Any]:
    """A Gemma-3-style model's loss and gradients (one sequence of ``max_seq_len`` tokens)
    computed in bf16 with ``attention="auto"`` (cuDNN on a GPU) against float32 with XLA's
    attention: relative errors of the loss and of the gradients' global norm, whether the
    program holds cuDNN's kernel and a conditional, and the median forward + backward time."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jtp.models.llama import Llama, LlamaConfig, cross_entropy

    config = LlamaConfig(**(SMOKE_GEMMA_MODEL if smoke else GEMMA_MODEL))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, config.max_seq_len + 1))
    tokens = jnp.asarray(tokens, jnp.int32)
    params = nnx.state(jax.jit(lambda: Llama(config, rngs=nnx.Rngs(0)))())

    def step(attention: str, dtype: str | None):
        g = nnx.graphdef(
            nnx.eval_shape(
                lambda: Llama(
                    dataclasses.replace(config, attention=attention, dtype=dtype), rngs=nnx.Rngs(0)
                )
            )
        )

        def loss(p):
            return cross_entropy(nnx.merge(g, p)(tokens[:, :-1]), tokens[:, 1:])

        return jax.jit(jax.value_and_grad(loss))

    ref_loss, ref_grads = step("xla", None)(params)
    fn = step("auto", "bfloat16").lower(params).compile()  # one compile: run and read
    loss, grads = jax.block_until_ready(fn(params))
    norm = lambda t: jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t)))  # noqa: E731
    diff = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b, grads, ref_grads)
    errors = {
        "loss": float(abs(loss - ref_loss) / abs(ref_loss)),
        "grad_norm": float(norm(diff) / norm(ref_grads)),
    }
    times = []
    for _ in range(1 if smoke else 5):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params))
        times.append(time.perf_counter() - t0)
    hlo = fn.as_text()
    return {
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k in GEMMA_MODEL},
        "tokens": config.max_seq_len,
        "platform": platform,
        "relative_error": errors,
        "within_tolerance": max(errors.values()) <= MODEL_RTOL,
        "tolerance": MODEL_RTOL,
        "fused_kernel_in_program": "__cudnn$fmha" in hlo,
        "conditional_in_program": " conditional(" in hlo,
        "forward_backward_ms": 1e3 * statistics.median(times),
    }


# The expert-parallel exchange (jtp.parallel.expert_exchange): tokens per device, width,
# expert hidden width, local experts per device, experts per token.
EXCHANGE_SHAPE = {"tokens": 4096, "dim": 1024, "hidden": 2048, "local_experts": 4, "k": 2}
SMOKE_EXCHANGE_SHAPE = {"tokens": 64, "dim": 16, "hidden": 32, "local_experts": 2, "k": 2}
# ragged vs padded: the same rows meet the same experts in the same order (received rows
# are put in expert order, source after source, in both), so only a kernel's tiling of a
# different-length buffer could change a float32 sum (matmuls at "highest" precision).
EXCHANGE_RTOL = 1e-5


def expert_exchange_check(devices: list, platform: str, smoke: bool = False) -> dict[str, Any]:
    """The exchange's two variants on an "expert" axis over ``devices``: ragged
    (``jax.lax.ragged_all_to_all``, only on a GPU or TPU: XLA:CPU has no thunk for it)
    against padded (fixed worst-case buffers), outputs and the gradients of the tokens and
    the experts' weights (max |difference| / max |padded|), the median forward + backward
    time of each, and the bytes each all-to-all sends per device (from the compiled HLO)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from jtp.analysis.collectives import collectives
    from jtp.mesh import EXPERT
    from jtp.models.feedforward import ACTIVATIONS
    from jtp.parallel.expert_exchange import exchange

    shape = SMOKE_EXCHANGE_SHAPE if smoke else EXCHANGE_SHAPE
    x_size = len(devices)
    n, d, f, k = (shape[key] for key in ("tokens", "dim", "hidden", "k"))
    e = shape["local_experts"] * x_size
    mesh = Mesh(np.asarray(devices).reshape(x_size), (EXPERT,))  # an axis even of size 1
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (x_size * n, d), jnp.float32)
    experts = jax.random.randint(keys[1], (x_size * n, k), 0, e, jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (x_size * n, k)), axis=-1)
    w1, w3 = (jax.random.normal(key, (e, d, f)) * d**-0.5 for key in keys[3:5])
    w2 = jax.random.normal(keys[5], (e, f, d)) * f**-0.5

    def swiglu(x_md, sizes, w1, w2, w3):
        h = ACTIVATIONS["silu"](jax.lax.ragged_dot(x_md, w1, sizes))
        return jax.lax.ragged_dot(h * jax.lax.ragged_dot(x_md, w3, sizes), w2, sizes)

    def combine(y_nkd, w_nk):
        return jnp.sum(y_nkd * w_nk[..., None], axis=1)

    def program(ragged: bool):
        def body(x, weights, experts, w1, w2, w3):
            y, _ = exchange(
                *(x, weights, experts, w1, w2, w3),
                grouped=swiglu,
                combine=combine,
                axis=EXPERT,
                n_experts=e,
                ragged=ragged,
            )
            return y

        run = jax.shard_map(
            body, mesh=mesh, in_specs=(P(EXPERT),) * 6, out_specs=P(EXPERT), check_vma=False
        )
        loss = lambda *a: jnp.sum(run(*a) ** 2)  # noqa: E731
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 5)))
        with jax.default_matmul_precision("highest"):
            return fn.lower(x, weights, experts, w1, w2, w3).compile()

    args = (x, weights, experts, w1, w2, w3)
    variants = {"padded": False} | ({"ragged": True} if platform != "cpu" else {})
    results, rows = {}, {}
    for name, ragged in variants.items():
        fn = program(ragged)
        results[name] = jax.block_until_ready(fn(*args))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        a2a = [c for c in collectives(fn, mesh) if c.kind == "all-to-all"]
        rows[name] = {
            "forward_backward_ms": 1e3 * statistics.median(times),
            "all_to_all_buffer_bytes": [c.bytes for c in a2a],  # ragged: moves only its pairs
            "ragged_all_to_all_in_program": "ragged-all-to-all" in fn.as_text(),
        }
    errors = None
    if "ragged" in results:
        (_, want), (_, got) = results["padded"], results["ragged"]
        errors = {
            name: float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
            for name, g, w in zip(("dx", "dw1", "dw2", "dw3"), got, want, strict=True)
        }
        loss_p, loss_r = results["padded"][0], results["ragged"][0]
        errors["loss"] = float(abs(loss_r - loss_p) / abs(loss_p))
    return {
        "shape": {**shape, "experts": e, "expert_axis": x_size},
        "variants": rows,
        "relative_error": errors,  # None where ragged cannot run (CPU)
        "within_tolerance": None if errors is None else max(errors.values()) <= EXCHANGE_RTOL,
    }
