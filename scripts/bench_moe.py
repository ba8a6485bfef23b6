#!/usr/bin/env python3
"""Decode speed of the mixture-of-experts forward pass, on tiny DeepSeek-layout models
(refengine.testing.moe_spec: 2 layers, the second with n experts of which 8 are used, as Q4_K_M).

1. Cost follows active parameters, not total ones: moe_spec(8), moe_spec(64) and moe_spec(256)
   use the same 8 experts' worth of weights per token (from 64 experts on, routed through 8
   groups of which 4 are used, as DeepSeek-R1 is), so their tokens/s must be within
   MAX_SPREAD of each other.
2. Against llama.cpp: the same decode through llama-cpp-python with the same 2 threads on one of
   them (--llama-cpp-experts, default 8); the ratio refengine / llama.cpp (the issue's target: 0.7).

Decode speed is llama-bench's tgN: N tokens evaluated one at a time from an empty context, random
ids, one untimed run first; the best of --runs runs is reported, since other processes on a
shared machine only ever slow a run down. llama.cpp is timed through its Python binding, whose
per-token cost (building the batch, copying the logits out) is included, as ours is.

Models are written (seed 0) and quantized by llama.cpp's quantizer when installed, else by
refengine's (the same bytes), into --dir, where they are kept for the next run.

    .venv/bin/python scripts/bench_moe.py
    .venv/bin/python scripts/bench_moe.py --experts 8,64,256 -n 64 --runs 5 --json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dequant import OtherProcesses, cpu_model  # noqa: E402

from refengine.bench import Context, time_generation  # noqa: E402
from refengine.session import Session  # noqa: E402
from refengine.testing import moe_spec, write_tiny_model  # noqa: E402

MAX_SPREAD = 1.2  # fastest / slowest tokens/s across expert counts
TARGET_VS_LLAMA_CPP = 0.7
OTHERS_WARNING = 0.05  # share of the CPUs other processes took while timing, past which figures are noise


def model_file(n_expert: int, folder: Path) -> Path:
    """moe_spec(n_expert) as Q4_K_M in `folder`, made once."""
    path = folder / f"moe{n_expert}-q4_k_m.gguf"
    if path.exists():
        return path
    f32 = write_tiny_model("deepseek2", folder / f"moe{n_expert}-f32.gguf", spec=moe_spec(n_expert))
    try:
        from refengine.testing import quantize_q4_k_m

        quantize_q4_k_m(f32, path)
    except ImportError:
        from refengine.quantize import quantize_file

        quantize_file(f32, path, "Q4_K_M")
    f32.unlink()
    return path


def refengine_tok_s(path: Path, n_tokens: int, runs: int) -> list[float]:
    model = Session.load(str(path)).model
    rng = np.random.default_rng(0)
    context = Context(model, n_tokens, 0, rng)
    time_generation(context, n_tokens, rng)  # warm-up: kernels load, pages fault in, experts are built
    return [n_tokens / time_generation(context, n_tokens, rng) for _ in range(runs)]


def llama_cpp_tok_s(path: Path, n_tokens: int, runs: int) -> list[float]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=n_tokens + 16, n_threads=2, n_threads_batch=2, verbose=False)
    rng = np.random.default_rng(0)

    def run() -> float:
        llm.reset()
        tokens = rng.integers(0, llm.n_vocab() - 2, size=n_tokens).tolist()
        start = time.perf_counter()
        for token in tokens:
            llm.eval([token])
        return n_tokens / (time.perf_counter() - start)

    try:
        run()
        return [run() for _ in range(runs)]
    finally:
        llm.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--experts", default="8,64,256", show_default=True, help="Expert counts of the models compared.")
@click.option("--llama-cpp-experts", default=8, show_default=True, help="The model timed against llama.cpp.")
@click.option("-n", "n_tokens", default=64, show_default=True, help="Tokens decoded per run.")
@click.option("--runs", default=5, show_default=True, help="Timed runs per engine and model; the best counts.")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), help="Where the models are kept.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def main(experts: str, llama_cpp_experts: int, n_tokens: int, runs: int, folder: Path | None, as_json: bool) -> None:
    """Decode tokens/s on tiny MoE models of 8, 64 and 256 experts, and against llama.cpp."""
    counts = [int(n) for n in experts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {n: model_file(n, folder) for n in sorted(set(counts) | {llama_cpp_experts})}
        watch = OtherProcesses()
        ours = {n: refengine_tok_s(paths[n], n_tokens, runs) for n in counts}
        try:
            theirs = llama_cpp_tok_s(paths[llama_cpp_experts], n_tokens, runs)
        except ImportError:
            theirs = None
        others = watch.share()
    best = {n: max(speeds) for n, speeds in ours.items()}
    spread = max(best.values()) / min(best.values())
    ours_vs = best.get(llama_cpp_experts) or max(refengine_tok_s(paths[llama_cpp_experts], n_tokens, runs))
    result = {
        "cpu": cpu_model(),
        "threads": numba.config.NUMBA_NUM_THREADS,
        "n_tokens": n_tokens,
        "runs": runs,
        "other_cpu_share": round(others, 3),
        "refengine_tok_s": {str(n): round(best[n], 1) for n in counts},
        "refengine_samples_tok_s": {str(n): [round(s, 1) for s in ours[n]] for n in counts},
        "spread": round(spread, 3),
        "spread_ok": spread <= MAX_SPREAD,
        "llama_cpp_experts": llama_cpp_experts,
        "llama_cpp_tok_s": None if theirs is None else round(max(theirs), 1),
        "ratio_vs_llama_cpp": None if theirs is None else round(ours_vs / max(theirs), 3),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['cpu']}, {result['threads']} threads; tg{n_tokens}, best of {runs} runs")
    for n in counts:
        click.echo(f"  {n:4d} experts, 8 used: refengine {best[n]:8.1f} tok/s")
    verdict = "ok" if result["spread_ok"] else f"over {MAX_SPREAD}"
    click.echo(f"  spread fastest / slowest: {spread:.3f} ({verdict})")
    if theirs is None:
        click.echo("  llama.cpp: llama-cpp-python is not installed")
    else:
        click.echo(
            f"  {llama_cpp_experts} experts: llama.cpp {max(theirs):.1f} tok/s; refengine / llama.cpp "
            f"{result['ratio_vs_llama_cpp']:.2f} (target {TARGET_VS_LLAMA_CPP})"
        )
    if others > OTHERS_WARNING:
        click.echo(f"  warning: other processes took {others:.0%} of the CPUs while timing; figures are noisy")


if __name__ == "__main__":
    main()
