"""``python -m jtp.generate``: text (or token ids) in, a model's continuation out.

    python -m jtp.generate --hf DIR --prompt "The capital of France is" --max-new-tokens 32
    python -m jtp.generate --checkpoint runs/ck --prompt-ids 1,17,99 --max-new-tokens 16
    python -m jtp.generate --devices 8 --tensor-parallel 8 --hf DIR --prompt "..." \\
        --temperature 0.7 --top-p 0.9 --seed 1

The model is a Hugging Face checkpoint (``jtp.hf.load_pretrained``; its
``tokenizer.json`` by default) or a ``python -m jtp.train --checkpoint-dir`` directory
(parameters restored onto this mesh; give ``--tokenizer`` or ``--prompt-ids``). It prints
each continuation, then prefill and decode tokens/s apart, measured on a second run of the
same buckets, so compiling is not counted (its time is printed too). ``main(argv)`` returns
what it writes as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from jtp.bench.results import machine
from jtp.checkpoint.outputs import check_output_file, write_json
from jtp.cli.devices import add_mesh_flags, init_distributed
from jtp.cli.flags import add_compilation_cache_flags, number
from jtp.cli.output import one_line_errors, program
from jtp.errors import InputError
from jtp.host_memory import retain_host_memory
from jtp.mesh import select_devices
from jtp.training import compilation_cache
from jtp.xla_flags import apply_gpu_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program("python -m jtp.generate"),
        description="Continue prompts with a Hugging Face or jtp training checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf", metavar="DIR", help="a Hugging Face checkpoint directory")
    model.add_argument(
        "--checkpoint", metavar="DIR", help="python -m jtp.train --checkpoint-dir's directory"
    )
    p.add_argument("--step", type=int, default=None, help="with --checkpoint: the step")
    prompts = p.add_argument_group("prompts (one or more; several make one batch)")
    prompts.add_argument("--prompt", action="append", default=[], metavar="TEXT")
    prompts.add_argument(
        "--prompt-ids", action="append", default=[], metavar="IDS", help="e.g. 1,17,99"
    )
    prompts.add_argument(
        "--tokenizer", metavar="PATH", help="tokenizer.json (default: --hf DIR's own)"
    )
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=number(int, low=1), default=32, metavar="N")
    s.add_argument("--temperature", type=number(low=0), default=0.0, help="0: greedy")
    s.add_argument("--top-k", type=number(int, low=1), default=None)
    s.add_argument("--top-p", type=number(above=0, high=1), default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--eos-token-id",
        type=int,
        default=None,
        help="stop a sequence here (default: --hf DIR's config.json eos_token_id)",
    )
    p.add_argument("--fsdp", action="store_true", help="also shard parameters over 'data'")
    add_mesh_flags(p, context=True)  # --context-parallel only to be refused by name
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    add_compilation_cache_flags(p.add_argument_group("compilation (process setup)"))
    return p


def _tokenizer(args: argparse.Namespace) -> Any:
    path = args.tokenizer or (os.path.join(args.hf, "tokenizer.json") if args.hf else None)
    if not args.prompt:
        return None if path is None or not os.path.isfile(path) else _load_tokenizer(path)
    if path is None or not os.path.isfile(path):
        raise ValueError(
            f"--prompt TEXT needs a tokenizer: {path or 'none given'} is not a file; pass "
            "--tokenizer tokenizer.json, or token ids with --prompt-ids 1,17,99"
        )
    return _load_tokenizer(path)


def _load_tokenizer(path: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # an optional dependency
        raise ValueError(
            "--prompt TEXT needs the tokenizers package (pip install jtp[data])"
        ) from e
    return Tokenizer.from_file(path)


def _prompts(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    ids = []
    for text in args.prompt_ids:
        try:
            ids.append([int(x) for x in text.split(",") if x.strip()])
        except ValueError:
            raise ValueError(f"--prompt-ids {text!r}: comma-separated integers") from None
    ids += [tokenizer.encode(text).ids for text in args.prompt]
    if not ids:
        raise ValueError("give at least one --prompt TEXT or --prompt-ids IDS")
    return ids


def _eos(args: argparse.Namespace) -> int | None:
    if args.eos_token_id is not None or args.hf is None:
        return args.eos_token_id
    from jtp.models.hf.config import read_config

    eos = read_config(args.hf).get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos


def load_model(args: argparse.Namespace, mesh: Any, positions: int) -> Any:
    """The model, sharded on ``mesh``: a Hugging Face directory read slice by slice, or a
    training checkpoint's parameters restored (its optimizer state is not read)."""
    from flax import nnx

    from jtp.models.llama import Llama
    from jtp.parallel.abstract import abstract_sharded

    if args.hf is not None:
        from jtp.models.hf.load import load_pretrained

        return load_pretrained(args.hf, mesh, fsdp=args.fsdp, max_seq_len=positions)
    from jtp.checkpoint.model import llama_record, restore_model
    from jtp.recipes import LlamaTaskConfig, resolve
    from jtp.recipes.llama import from_record, model_config_of

    module, _, step = llama_record(args.checkpoint, args.step, "jtp.generate runs")
    # The recorded model fitted to THIS mesh (its kv replicas are the training mesh's) and
    # laid out by the ready plan, as training resolves a task; activations: generate's own.
    trained = from_record(LlamaTaskConfig, module["config"])
    here = dataclasses.replace(
        trained,
        hf=None,
        data=None,
        fsdp=args.fsdp,
        sequence_parallel=False,
        loss_parallel=False,
        plan="ready",
    )
    setup = resolve(here, model_config_of(module["model_config"]), mesh)
    factory = lambda: Llama(setup.model, rngs=nnx.Rngs(0))  # noqa: E731
    abstract = abstract_sharded(nnx.eval_shape(factory), mesh, setup.plan, fsdp=args.fsdp)
    model, _, _ = restore_model(args.checkpoint, abstract, step=step)
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.context_parallel > 1:  # jtp.generate's check_mesh, before jax starts
        raise InputError(
            f"--context-parallel {args.context_parallel}: generation does not split the "
            "sequence over 'context' (each decode step would gather the whole cache): leave "
            "it out, and give those devices to --data-parallel"
        )
    if args.step is not None and args.hf is not None:
        raise ValueError("--step picks a step of --checkpoint DIR; --hf has none")
    if args.json:  # before any work: not a directory, in a writable one
        check_output_file(args.json, flag="--json")
    tokenizer = _tokenizer(args)
    prompts = _prompts(args, tokenizer)  # every refusal before jax starts
    compilation_cache.enable(args.compilation_cache)
    apply_gpu_flags()
    distributed = init_distributed(args.devices)
    devices = None if distributed or args.devices is None else select_devices(args.devices)

    import time

    import jax

    from jtp.generation.generate import Sampling, generate_timed
    from jtp.mesh import ModelParallelStrategy, mesh_shape

    strategy = ModelParallelStrategy(
        args.data_parallel, args.tensor_parallel, fsdp=args.fsdp, devices=devices
    )
    t0 = time.perf_counter()
    model = load_model(args, strategy.mesh, max(map(len, prompts)) + args.max_new_tokens)
    t1 = time.perf_counter()
    run = dict(
        max_new_tokens=args.max_new_tokens,
        eos_token_id=_eos(args),
        seed=args.seed,
        sampling=Sampling(args.temperature, args.top_k, args.top_p),
    )
    _, first = generate_timed(model, prompts, **run)  # compiles prefill and decode
    new, timing = generate_timed(model, prompts, **run)
    n_dev = strategy.mesh.size
    decoded = sum(len(x) - 1 for x in new)
    results = {
        "prompts": prompts,
        "new_tokens": new,
        "text": [tokenizer.decode(x) for x in new] if tokenizer is not None else None,
        "source": {"hf": args.hf} if args.hf else {"checkpoint": args.checkpoint},
        "mesh": mesh_shape(strategy.mesh),
        "fsdp": args.fsdp,
        "platform": strategy.mesh.devices.flat[0].platform,
        "machine": machine(),
        "load_seconds": t1 - t0,
        "compile_seconds": first.prefill_s + first.decode_s - timing.prefill_s - timing.decode_s,
        "prefill_seconds": timing.prefill_s,
        "prefill_tokens_per_s": timing.prompt_tokens / timing.prefill_s,
        "decode_seconds": timing.decode_s,
        "decode_tokens_per_s": decoded / timing.decode_s if timing.decode_s else None,
        "decode_tokens_per_s_per_device": decoded / timing.decode_s / n_dev
        if timing.decode_s
        else None,
        "batch_rows": timing.batch,
        "cache_bytes": timing.cache_bytes,
    }
    if jax.process_index() == 0:
        print(report(results))
    write_json(args.json, results, announce=False)
    return results


def report(r: dict[str, Any]) -> str:
    lines = []
    for i, ids in enumerate(r["new_tokens"]):
        text = r["text"][i] if r["text"] is not None else ",".join(map(str, ids))
        lines.append(f"[{i}] {text}")
    decode = r["decode_tokens_per_s"]
    lines.append(
        f"prefill {r['prefill_tokens_per_s']:,.0f} tokens/s ({r['prefill_seconds']:.3f} s); "
        + (f"decode {decode:,.1f} tokens/s ({r['decode_seconds']:.3f} s)" if decode else "")
        + f"; compile {r['compile_seconds']:.1f} s; mesh {r['mesh']} on {r['platform']}"
    )
    return "\n".join(lines)


def run() -> None:
    """The ``python -m`` entry point: a bad input is one line on stderr and exit status 2."""
    retain_host_memory()  # on CPU, before jax starts: jtp.host_memory says why
    with one_line_errors("jtp.generate", (ValueError,)):
        main(sys.argv[1:])
