#!/usr/bin/env python3
"""Write tests/golden/logits_<model>.npz: llama.cpp's next-token distributions on fixed sequences.

Run by hand, with llama-cpp-python installed (`pip install -e '.[oracle]'`); the files are
committed and tests/test_forward_golden.py checks refengine against them without llama.cpp.
For each prompt of refengine.testing.oracle_utils.PROMPTS, llama.cpp greedily generates N_GENERATE
tokens, then scores the whole sequence in one batch; per scored position the file keeps
  {case}.top_ids       (n_pos, TOP_K) int32    llama.cpp's TOP_K most likely tokens, best first
  {case}.top_logprobs  (n_pos, TOP_K) float32  their log-probs
  {case}.logsumexp     (n_pos,)       float32  logsumexp of the raw logits
and {case}.tokens, the whole sequence. `meta` is a JSON string: versions, and per case
its name, prompt text, prompt length and first scored position.
"""

from __future__ import annotations

import json

import click
import numpy as np

from refengine.models import resolve_model
from refengine.testing.oracle_utils import (
    MODELS,
    N_GENERATE,
    PROMPTS,
    TOP_K,
    golden_path,
    llama_cpp_generate_and_score,
    load_golden,
    log_softmax,
    logsumexp,
    open_llama,
)


def top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row, best first; ties go to the lower id, as argmax does."""
    ids = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    values = np.take_along_axis(logp, ids, axis=-1)
    order = np.lexsort((ids, -values), axis=-1)
    return np.take_along_axis(ids, order, axis=-1), np.take_along_axis(values, order, axis=-1)


def golden(model: str) -> tuple[dict, dict[str, np.ndarray]]:
    import llama_cpp

    llm = open_llama(resolve_model(model))
    meta = {
        "model": model,
        "llama_cpp_python": llama_cpp.__version__,
        "n_generate": N_GENERATE,
        "top_k": TOP_K,
        "cases": [],
    }
    arrays = {}
    for p in PROMPTS[model]:
        n_prompt, tokens, first, logits = llama_cpp_generate_and_score(llm, p)
        logp = log_softmax(logits)
        ids, values = top_k(logp, TOP_K)
        assert (ids[:, 0] == np.argmax(logits, axis=-1)).all()
        arrays[f"{p.name}.tokens"] = np.array(tokens, dtype=np.int32)
        arrays[f"{p.name}.top_ids"] = ids.astype(np.int32)
        arrays[f"{p.name}.top_logprobs"] = values.astype(np.float32)
        arrays[f"{p.name}.logsumexp"] = logsumexp(logits).astype(np.float32)
        meta["cases"].append({"name": p.name, "text": p.text, "n_prompt": n_prompt, "first": first})
        click.echo(
            f"  {p.name}: {n_prompt} prompt + {N_GENERATE} tokens, "
            f"{len(tokens) - first} positions scored: {llm.detokenize(tokens[n_prompt:])!r}"
        )
    return meta, arrays


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1, metavar="[MODEL]...")
def main(models: tuple[str, ...]) -> None:
    """Regenerate the logits goldens for MODELs (default: both test models)."""
    for model in models or MODELS:
        click.echo(model)
        meta, arrays = golden(model)
        path = golden_path(model)
        np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
        load_golden.cache_clear()
        assert len(load_golden(model)[1]) == len(meta["cases"])  # what we wrote must read back
        size_kib = path.stat().st_size / 1024
        click.echo(f"{path}: {size_kib:.0f} KiB, llama-cpp-python {meta['llama_cpp_python']}")


if __name__ == "__main__":
    main()
