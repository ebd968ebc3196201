"""The oracle's side of ``make test-oracle``: transformers and PEFT, run on what jtp writes.

It runs under the oracle interpreter (``.venv-oracle``: Python 3.11, CPU torch,
transformers, peft), never under jtp's; ``tests/oracle/test_oracle.py`` calls it twice:

    python oracle_worker.py build SPEC.json   # source checkpoints, from configs
    python oracle_worker.py run JOBS.json     # logits and parsed configs of directories

``build``: SPEC.json is ``{"out": DIR, "cases": {name: {"cls": "Qwen2Config", "config":
{...}, "seed": n}}}``; each case is a transformers config class and its arguments. The model
is made from it with random weights that make mistakes show (no norm scale 1, no bias 0,
projections scaled for peaked attention, as scripts/make_hf_fixtures.py does) and saved in
float32 at ``DIR/name``.

``run``: JOBS.json is ``{"tokens": NPY, "out": DIR, "jobs": [{"id": ..., "model": PATH,
"adapter": PATH or null}]}``. For each job: ``AutoConfig.from_pretrained(model).to_dict()``
to ``DIR/id.json``, and the float32 logits (eager attention) of the model, or of
``PeftModel.from_pretrained(model, adapter)``, on the tokens to ``DIR/id.npy``; a job with
``"loss": true`` (a MoE model) also writes ``DIR/id.loss.json``: ``{"loss", "aux_loss"}`` of
``model(tokens, labels=tokens, output_router_logits=True)`` (the cross-entropy plus
``router_aux_loss_coef`` times the load-balancing loss, as training computes it). A job that
fails records its error in ``DIR/results.json`` and the others go on: the test of that
export then fails with transformers' own message.

Written for Python 3.11 (the only CPU torch wheel here); it imports nothing from jtp.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np
import torch
import transformers

# The fixtures' own weights: no norm is 1, no bias 0 (scripts/make_hf_fixtures.py).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
from make_hf_fixtures import randomize  # noqa: E402


def build(spec: dict) -> None:
    for name, case in spec["cases"].items():
        config = getattr(transformers, case["cls"])(**case["config"])
        torch.manual_seed(case["seed"])
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize(model, case["seed"])
        model.save_pretrained(os.path.join(spec["out"], name))


def logits_of(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def run_job(job: dict, tokens: np.ndarray, out: str) -> None:
    config = transformers.AutoConfig.from_pretrained(job["model"])
    with open(os.path.join(out, job["id"] + ".json"), "w") as f:
        json.dump(config.to_dict(), f, indent=1, sort_keys=True, default=str)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        job["model"], dtype=torch.float32, attn_implementation="eager"
    )
    if job.get("adapter"):
        import peft

        model = peft.PeftModel.from_pretrained(model, job["adapter"])
    np.save(os.path.join(out, job["id"] + ".npy"), logits_of(model, tokens))
    if job.get("loss"):
        ids = torch.from_numpy(tokens).long()
        with torch.no_grad():
            result = model(ids, labels=ids, output_router_logits=True)
        losses = {"loss": float(result.loss), "aux_loss": float(result.aux_loss)}
        with open(os.path.join(out, job["id"] + ".loss.json"), "w") as f:
            json.dump(losses, f)


def run(jobs: dict) -> None:
    tokens = np.load(jobs["tokens"])
    results = {}
    for job in jobs["jobs"]:
        try:
            run_job(job, tokens, jobs["out"])
            results[job["id"]] = {"error": None}
        except Exception as e:  # recorded: that export's test fails with this message
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            results[job["id"]] = {"error": tb}
    results["_versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": __import__("peft").__version__,
    }
    with open(os.path.join(jobs["out"], "results.json"), "w") as f:
        json.dump(results, f, indent=1)


def main(argv: list[str]) -> None:
    mode, path = argv
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # the tests' tiny models; the machine's cores run jtp beside
    with open(path) as f:
        spec = json.load(f)
    {"build": build, "run": run}[mode](spec)


if __name__ == "__main__":
    main(sys.argv[1:])
