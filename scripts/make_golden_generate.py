#!/usr/bin/env python3
"""Write tests/golden/generate_<model>.json: the exact greedy continuation of a fixed prompt.

The continuation comes from transformers (CPU torch) in float64 with its float32 islands
recomputed in float64 (refengine/testing/hf_oracle.py), which loads the same GGUF file: an exact
reference for the model's arithmetic, which llama.cpp, with its 8-bit activations, is not
(on smollm2 its greedy text leaves the exact one within a few tokens). The file also
records, per generated token, the margin between the reference's top two logits, so a
reader sees how decisive each step was, and llama.cpp's own greedy tokens for comparison
when llama-cpp-python is installed.

Run by hand (`pip install -e '.[oracle]'`); tests/test_generate_golden.py checks
`refengine generate --temp 0` against the committed files.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from refengine.models import resolve_model
from refengine.session import Session

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"
N_GENERATE = 32
# Chosen among a few candidates for the widest smallest top-2 margin along the reference's
# path (gemma 0.22, smollm 0.07 nats; prose prompts went down to 0.005), so that float32
# rounding, about 1e-3 on a logit, cannot flip a step.
PROMPTS = {
    "gemma3-270m": "def fibonacci(n):",
    "smollm2-135m": "def fibonacci(n):",
}


def golden_path(model: str) -> Path:
    return GOLDEN_DIR / f"generate_{model}.json"


def reference_greedy(model: str, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    """transformers' float64 greedy tokens and, per step, the top-2 logit margin."""
    import torch
    from transformers import AutoModelForCausalLM

    from refengine.testing.hf_oracle import float64_islands

    path = resolve_model(model)
    # Loaded in float32 and then converted: asked for float64 directly, transformers keeps the
    # weights packed and its kernels compute in float32.
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).double().eval()
    tokens, margins = list(prompt_ids), []
    with torch.no_grad(), float64_islands(hf, everything=True):
        for _ in range(N_GENERATE):
            logits = hf(input_ids=torch.tensor([tokens]), logits_to_keep=1).logits[0, -1].numpy()
            top2 = np.sort(logits)[-2:]
            margins.append(float(top2[1] - top2[0]))
            tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt_ids) :], margins


def llama_cpp_greedy(model: str, prompt_ids: list[int]) -> list[int] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(resolve_model(model)), n_ctx=256, n_threads=2, verbose=False)
    llm.eval(prompt_ids)
    out = []
    for _ in range(N_GENERATE):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "models", multiple=True, type=click.Choice(list(PROMPTS)), help="Only these models.")
def main(models: tuple[str, ...]) -> None:
    """Write the golden greedy continuations (needs torch and transformers)."""
    for model in models or PROMPTS:
        tokenizer = Session.load(model).tokenizer
        prompt = PROMPTS[model]
        prompt_ids = tokenizer.encode(prompt)
        tokens, margins = reference_greedy(model, prompt_ids)
        record = {
            "model": model,
            "prompt": prompt,
            "prompt_tokens": prompt_ids,
            "tokens": tokens,
            "text": tokenizer.decode(tokens),
            "reference": "transformers float64 (float64 islands), greedy",
            "top2_margins": [round(m, 4) for m in margins],
            "llama_cpp_tokens": llama_cpp_greedy(model, prompt_ids),
        }
        golden_path(model).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        same = record["llama_cpp_tokens"] == tokens if record["llama_cpp_tokens"] is not None else "n/a"
        print(f"{model}: {record['text']!r}; smallest margin {min(margins):.3f}; llama.cpp identical: {same}")


if __name__ == "__main__":
    main()
