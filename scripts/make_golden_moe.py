#!/usr/bin/env python3
"""Write tests/golden/logits_tiny_moe_q4_k_m.npz: llama.cpp's next-token distributions on the tiny
MoE models (refengine.testing: qwen3moe, mixtral, deepseek2 in both MLA layouts, deepseek2-lite) as
Q4_K_M, so tests/test_moe.py can hold refengine to llama.cpp without llama.cpp.

Run by hand, with llama-cpp-python installed. Each model is written at seed 0 and quantized by
llama.cpp's own quantizer; the file's sha256 goes into the golden, and the test rebuilds the file
with refengine's quantizer and refuses to compare if the bytes differ (a new spec or seed, or a
quantizer change, would otherwise compare two different models). For each prompt of
refengine.testing.moe_oracle.PROMPTS llama.cpp greedily generates N_GENERATE tokens, then scores the whole
sequence in one batch; per position the file keeps
  {model}.{prompt}.top_ids       (n_pos, TOP_K) int32    llama.cpp's TOP_K most likely tokens, best first
  {model}.{prompt}.top_logprobs  (n_pos, TOP_K) float32  their log-probs
  {model}.{prompt}.logsumexp     (n_pos,)       float32  logsumexp of the raw logits
and {model}.{prompt}.tokens, the sequence. `meta` is a JSON string: versions, and per model the
Q4_K_M file's sha256 and its cases (prompt name and text, prompt length).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np

from refengine.testing import MOE_MODELS, quantize_q4_k_m, write_tiny_model
from refengine.testing.moe_oracle import (
    GOLDEN_PATH,
    N_CTX,
    PROMPTS,
    load_golden_moe,
    make_q4_k_m,
    sha256,
)
from refengine.testing.oracle_utils import N_GENERATE, TOP_K, llama_cpp_generate_and_score, log_softmax, logsumexp


def top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row, best first; ties go to the lower id, as argmax does."""
    ids = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
    return ids, np.take_along_axis(logp, ids, axis=-1)


def golden_model(arch: str, folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from llama_cpp import Llama

    path = quantize_q4_k_m(write_tiny_model(arch, folder / f"{arch}.gguf"), folder / f"{arch}-llama.gguf")
    ours = make_q4_k_m(arch, folder / "refengine")
    if sha256(ours) != sha256(path):
        raise click.ClickException(
            f"{arch}: refengine's Q4_K_M differs from llama.cpp's; the test could not rebuild it"
        )
    entry, arrays = {"sha256": sha256(path), "cases": []}, {}
    llm = Llama(str(path), n_ctx=N_CTX, logits_all=True, n_threads=2, verbose=False)
    try:
        for p in PROMPTS:
            n_prompt, tokens, _, logits = llama_cpp_generate_and_score(llm, p)
            ids, values = top_k(log_softmax(logits), TOP_K)
            key = f"{arch}.{p.name}"
            arrays[f"{key}.tokens"] = np.array(tokens, dtype=np.int32)
            arrays[f"{key}.top_ids"] = ids.astype(np.int32)
            arrays[f"{key}.top_logprobs"] = values.astype(np.float32)
            arrays[f"{key}.logsumexp"] = logsumexp(logits).astype(np.float32)
            entry["cases"].append({"name": p.name, "text": p.text, "n_prompt": n_prompt})
            click.echo(f"  {key}: {n_prompt} prompt + {N_GENERATE} tokens: {llm.detokenize(tokens[n_prompt:])!r}")
    finally:
        llm.close()
    return entry, arrays


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Regenerate the tiny MoE models' logits golden from llama.cpp."""
    import llama_cpp

    meta = {"llama_cpp_python": llama_cpp.__version__, "n_generate": N_GENERATE, "top_k": TOP_K, "models": {}}
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "refengine").mkdir()
        for arch in MOE_MODELS:
            click.echo(arch)
            meta["models"][arch], model_arrays = golden_model(arch, Path(tmp))
            arrays |= model_arrays
    np.savez_compressed(GOLDEN_PATH, meta=np.array(json.dumps(meta)), **arrays)
    load_golden_moe.cache_clear()
    assert len(load_golden_moe()[1]) == len(MOE_MODELS) * len(PROMPTS)  # what we wrote must read back
    size_kib = GOLDEN_PATH.stat().st_size / 1024
    click.echo(f"{GOLDEN_PATH}: {size_kib:.0f} KiB, llama-cpp-python {meta['llama_cpp_python']}")


if __name__ == "__main__":
    main()
