#!/usr/bin/env python3
"""Mixture-of-experts speed beside llama.cpp's llama-bench, on models the tiny-model writer makes
(refengine.testing), quantized Q4_K_M: ratios from one run, each beside its target ratio.

    qwen3moe-bigger    hidden 1024, 4 layers, 16 experts, 4 used              tg128
    mixtral-bigger     hidden 1024, 4 layers, 8 experts, 2 used               tg128
    deepseek2-bigger   MLA, hidden 1024, 4 layers, 16 experts, 4 used, shared  tg128
    qwen3moe-1.3b      hidden 1024, 12 layers, 64 experts, 8 used (1.34 B)    tg128, pp16, pp64, pp512

Each test alternates the two engines a round of --repetitions at a time (a busy moment of a shared
machine hits both) and keeps each one's best; refengine runs in this process through refengine.bench
as `refengine bench model` does, llama.cpp through llama-bench (scripts/build_llama_tools.sh) on the
same threads. The models are written (seed 0) and quantized by refengine's quantizer, whose files are
llama.cpp's byte for byte, into --dir, where they are kept for the next run (the 1.3B F32 source, 5.4 GB,
is deleted once quantized).

    .venv/bin/python scripts/bench_moe.py [--models qwen3moe-bigger,...] [--tests pp16,...] [--numerics ggml,exact]
                                          [--json]
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import click
import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_llamacpp import cpu_name, llama_bench, ours  # noqa: E402

from refengine.session import Session  # noqa: E402
from refengine.testing import spec_for, write_tiny_model  # noqa: E402
from refengine.testing.llama_tools import find_tool  # noqa: E402
from refengine.testing.tiny import quantize_q4_k_m  # noqa: E402

# name -> (architecture, spec, tests: (kind, n) of llama-bench's pp/tg, target ratio of each)
MODELS = {
    "qwen3moe-bigger": ("qwen3moe", spec_for("qwen3moe", "bigger"), {("tg", 128): 0.6}),
    "mixtral-bigger": ("mixtral", spec_for("mixtral", "bigger"), {("tg", 128): 0.6}),
    "deepseek2-bigger": ("deepseek2", spec_for("deepseek2", "bigger"), {("tg", 128): 0.6}),
    "qwen3moe-1.3b": (
        "qwen3moe",
        replace(
            spec_for("qwen3moe", "bigger"),
            n_vocab=32000,
            n_layer=12,
            n_expert=64,
            n_expert_used=8,
            n_ff_exp=512,
            n_ctx_train=4096,
        ),
        {("tg", 128): 0.6, ("pp", 16): 0.6, ("pp", 64): 0.6, ("pp", 512): 0.8},
    ),
}


def model_file(name: str, folder: Path) -> Path:
    """MODELS[name] as Q4_K_M in `folder`, made once."""
    path = folder / f"{name}-q4_k_m.gguf"
    if not path.exists():
        arch, spec, _ = MODELS[name]
        f32 = write_tiny_model(arch, folder / f"{name}-f32.gguf", spec=spec)
        quantize_q4_k_m(f32, path)
        f32.unlink()
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--models", default=",".join(MODELS), show_default=True, help="Comma-separated, of: " + ", ".join(MODELS))
@click.option("--numerics", default="ggml", show_default=True, help="refengine's numerics, comma-separated.")
@click.option("--tests", default="", help="Only these of each model's tests, comma-separated (e.g. pp16,pp512).")
@click.option("-r", "--repetitions", default=3, show_default=True, help="Timed runs per engine per round.")
@click.option("--rounds", default=2, show_default=True, help="Rounds of alternating the two engines.")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path.home() / ".cache" / "refengine" / "bench-moe",
    show_default=True,
    help="Where the models are kept.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def main(models, numerics, tests, repetitions, rounds, folder, as_json) -> None:
    """refengine's MoE tg/pp tokens/s beside llama-bench's, their ratio and the target ratio for it."""
    binary = find_tool("llama-bench")
    if binary is None:
        raise click.ClickException("llama-bench is not built: run scripts/build_llama_tools.sh first")
    unknown = [m for m in models.split(",") if m not in MODELS]
    if unknown:
        raise click.BadParameter(f"unknown model {unknown[0]!r}", param_hint="--models")
    wanted = set(tests.split(",")) - {""}
    known = {f"{test}{n}" for name in models.split(",") for test, n in MODELS[name][2]}
    if wanted - known:
        raise click.BadParameter(f"no test {sorted(wanted - known)[0]!r} for these models", param_hint="--tests")
    folder.mkdir(parents=True, exist_ok=True)
    n_threads = numba.get_num_threads()
    load_before = os.getloadavg()[0]  # a shared machine's other work, which slows both engines unevenly
    rows = []
    for name in models.split(","):
        path = model_file(name, folder)
        for kind in numerics.split(","):
            session = Session.load(str(path), "f32", kind)
            rng = np.random.default_rng(0)
            for (test, n), target in MODELS[name][2].items():
                if wanted and f"{test}{n}" not in wanted:
                    continue
                ours_ts, theirs_ts = [], []
                for _ in range(rounds):
                    theirs_ts += llama_bench(binary, path, test, n, 0, repetitions, n_threads)
                    ours_ts += ours(session, test, n, 0, repetitions, rng)
                row = {
                    "model": name,
                    "numerics": kind,
                    "test": f"{test}{n}",
                    "refengine_ts": max(ours_ts),
                    "llama_cpp_ts": max(theirs_ts),
                    "ratio": max(ours_ts) / max(theirs_ts),
                    "target": target,
                    "refengine_samples_ts": ours_ts,
                    "llama_cpp_samples_ts": theirs_ts,
                }
                rows.append(row)
                speeds = f"{row['refengine_ts']:.1f} vs {row['llama_cpp_ts']:.1f} t/s"
                click.echo(f"{name} {kind} {test}{n}: {speeds}", err=True)
    meta = {
        "cpu": cpu_name(),
        "n_threads": n_threads,
        "best_of": repetitions * rounds,
        "llama_bench": str(binary),
        "load_average": [load_before, os.getloadavg()[0]],  # 1-minute, before and after
    }
    if as_json:
        click.echo(json.dumps({"meta": meta, "speed": rows}, indent=2))
        return
    load = "load average {:.2f} before, {:.2f} after".format(*meta["load_average"])
    click.echo(f"{meta['cpu']}, {n_threads} threads, best of {meta['best_of']} each, alternating, {load}")
    click.echo("| model | numerics | test | refengine t/s | llama-bench t/s | ratio | target |")
    click.echo("| ----- | -------- | ---: | ------------: | --------------: | ----: | -----: |")
    for r in rows:
        met = "met" if r["ratio"] >= r["target"] else "missed"
        click.echo(
            f"| {r['model']} | {r['numerics']} | {r['test']} | {r['refengine_ts']:.1f} | {r['llama_cpp_ts']:.1f} "
            f"| {r['ratio']:.2f} | {r['target']} ({met}) |"
        )


if __name__ == "__main__":
    main()
