"""Write transformers' greedy generations for the tiny checkpoints under tests/fixtures/hf/.

Run it with torch and transformers (never test dependencies; see make_hf_fixtures.py):

    /tmp/hf/bin/python scripts/make_generate_fixtures.py            # every fixture
    /tmp/hf/bin/python scripts/make_generate_fixtures.py phi3       # only these

For each fixture directory it loads the checkpoint in float32 with
``AutoModelForCausalLM``, and for each prompt (different lengths, run one at a time: no
padding on transformers' side) runs ``generate(do_sample=False)`` with the fixture's
eos id, writing ``generate.json``: the prompts, the new tokens (eos included when met, as
transformers returns them) and, per new token, the gap between the best and the second
best logit, from which the test tells a tie (a gap within float32 rounding, where the two
libraries may pick differently) from a bug.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import transformers

HERE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf")
NAMES = [
    "llama3",
    "llama_tied",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "llama_kv2",
    "mixtral",
    "qwen3_moe",
    "qwen2_moe",
    "olmoe",
]
PROMPTS = [[1, 17, 99, 5], [1, 64], [1, 3, 120, 77, 45, 8, 90, 11, 2, 33], [1]]
NEW_TOKENS = 8
EOS = 2


def main(names: list[str]) -> None:
    for name in names:
        path = os.path.join(HERE, name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        new, gaps = [], []
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=NEW_TOKENS,
                    eos_token_id=EOS,
                    pad_token_id=0,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            tokens = out.sequences[0, len(prompt) :].tolist()
            top2 = [torch.topk(s[0].float(), 2).values.numpy() for s in out.scores]
            new.append(tokens)
            gaps.append([float(a - b) for a, b in top2])
        record = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "eos_token_id": EOS,
            "max_new_tokens": NEW_TOKENS,
            "prompts": PROMPTS,
            "new_tokens": new,
            "top2_gaps": gaps,
        }
        with open(os.path.join(path, "generate.json"), "w") as f:
            json.dump(record, f, indent=1)
        smallest = min(min(g) for g in gaps)
        print(f"{name}: {new}  smallest top-2 gap {smallest:.2e}")
    np.set_printoptions(precision=3)


if __name__ == "__main__":
    main(sys.argv[1:] or NAMES)
