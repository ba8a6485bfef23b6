#!/usr/bin/env python3
"""refengine beside llama.cpp's own llama-bench on the same models, threads and machine, in one run.

For each model, the cross product of -p, -n and -d as llama-bench makes it: ppN (N prompt tokens) and
tgN (N tokens decoded one at a time), each after DEPTH tokens already in the cache. llama.cpp is
measured by `llama-bench` (built natively by scripts/build_llama_tools.sh; not llama-cpp-python's
per-token eval, which adds Python overhead of its own), refengine by refengine.bench in this process.
The two alternate, a round of repetitions each, so that a busy moment of a shared machine hits both;
the best repetition of each is kept (the least disturbed), and the ratio refengine / llama.cpp is
printed. A depth beyond what a model was trained for (smollm2: 8192) is skipped for that model.
With --startup it also times a whole `refengine generate -n 1` from a fresh process, cold (an empty
numba cache, so every kernel compiles) and warm, and reads the peak RssAnon it reports.

    .venv/bin/python scripts/bench_vs_llamacpp.py [--models gemma3-270m,smollm2-135m] [-p 512] [-n 128]
                                                  [-d 0,4096,16384] [-r 3] [--rounds 2] [--json]
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import click
import numpy as np

from refengine.bench import Context, time_generation, time_prompt
from refengine.models import resolve_model
from refengine.session import Session
from refengine.testing.llama_tools import find_tool

MODELS = ["gemma3-270m", "smollm2-135m"]


def int_list(ctx, param, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


def llama_bench(binary, path, test: str, n: int, depth: int, repetitions: int, n_threads: int) -> list[float]:
    """llama-bench's samples (tokens/s) of one test: pp or tg of n tokens at `depth`."""
    sizes = ["-p", str(n), "-n", "0"] if test == "pp" else ["-p", "0", "-n", str(n)]
    cmd = [str(binary), "-m", str(path), "-t", str(n_threads), *sizes, "-d", str(depth)]
    run = subprocess.run([*cmd, "-r", str(repetitions), "-o", "json"], capture_output=True, text=True)
    if run.returncode != 0:
        raise click.ClickException(f"llama-bench failed: {run.stderr.strip().splitlines()[-1:]}")
    (record,) = json.loads(run.stdout)
    return list(record["samples_ts"])


def ours(session, test: str, n: int, depth: int, repetitions: int, rng) -> list[float]:
    context = Context(session.model, depth + n, depth, rng)
    timed = time_prompt if test == "pp" else time_generation
    timed(context, n, rng)  # warm-up, as llama-bench does
    return [n / timed(context, n, rng) for _ in range(repetitions)]


def compare(model, tests, repetitions: int, rounds: int, n_threads: int, binary, numerics: str = "ggml") -> list[dict]:
    path = resolve_model(model)
    session = Session.load(model, "f32", numerics)
    n_ctx_train = session.model.config.n_ctx_train
    rng = np.random.default_rng(0)
    rows = []
    for test, n, depth in tests:
        if depth + n > n_ctx_train:
            click.echo(f"{model}: {test}{n} @ d{depth} skipped: beyond its {n_ctx_train} trained positions", err=True)
            continue
        ours_ts, theirs_ts = [], []
        for _ in range(rounds):
            theirs_ts += llama_bench(binary, path, test, n, depth, repetitions, n_threads)
            ours_ts += ours(session, test, n, depth, repetitions, rng)
        name = f"{test}{n}" + (f" @ d{depth}" if depth else "")
        rows.append(
            {
                "model": model,
                "numerics": numerics,
                "test": name,
                "n_depth": depth,
                "n_threads": n_threads,
                "refengine_ts": max(ours_ts),
                "llama_cpp_ts": max(theirs_ts),
                "ratio": max(ours_ts) / max(theirs_ts),
                "refengine_samples_ts": ours_ts,
                "llama_cpp_samples_ts": theirs_ts,
            }
        )
        click.echo(f"{model} {numerics} {name}: {max(ours_ts):.1f} vs {max(theirs_ts):.1f} t/s", err=True)
    return rows


def startup(model: str) -> dict:
    """Wall time of `refengine generate -n 1`, cold then warm, and its reported peak RssAnon."""
    result = {"model": model}
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        for kind in ("cold", "warm"):
            cmd = [sys.executable, "-m", "refengine.cli", "generate", "-m", model, "-n", "1", "--temp", "0", "Hi"]
            start = time.perf_counter()
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            result[f"{kind}_first_token_s"] = time.perf_counter() - start
            found = re.search(r"peak RssAnon (\d+) MiB", run.stderr)
            result[f"{kind}_peak_rss_anon_mib"] = int(found.group(1)) if found else None
    return result


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return platform.machine()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--models", default=",".join(MODELS), show_default=True, help="Comma-separated bundled models.")
@click.option("-p", "--n-prompt", default="512", callback=int_list, show_default=True, help="ppN sizes (0: none).")
@click.option("-n", "--n-gen", default="128", callback=int_list, show_default=True, help="tgN sizes (0: none).")
@click.option("-d", "--n-depth", default="0", callback=int_list, show_default=True, help="Depths, as llama-bench's -d.")
@click.option("-r", "--repetitions", default=3, show_default=True, help="Timed runs of a test per engine per round.")
@click.option("--rounds", default=2, show_default=True, help="Rounds of alternating the two engines.")
@click.option("--startup/--no-startup", default=False, show_default=True, help="Also time cold and warm start-up.")
@click.option(
    "--numerics",
    default="ggml",
    show_default=True,
    help="refengine's numerics, comma-separated: ggml (llama.cpp's arithmetic), exact, or both.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def main(models, n_prompt, n_gen, n_depth, repetitions, rounds, startup, numerics, as_json) -> None:
    """Print refengine's and llama-bench's pp/tg tokens/s on the same models, and their ratio."""
    import numba

    binary = find_tool("llama-bench")
    if binary is None:
        raise click.ClickException("llama-bench is not built: run scripts/build_llama_tools.sh first")
    n_threads = numba.get_num_threads()
    tests = [("pp", n, d) for d in n_depth for n in n_prompt if n] + [("tg", n, d) for d in n_depth for n in n_gen if n]
    rows, starts = [], []
    for model in models.split(","):
        for kind in numerics.split(","):
            rows += compare(model, tests, repetitions, rounds, n_threads, binary, kind)
        if startup:
            starts.append(globals()["startup"](model))
    meta = {"llama_bench": str(binary), "cpu": cpu_name(), "n_threads": n_threads, "best_of": repetitions * rounds}
    if as_json:
        click.echo(json.dumps({"meta": meta, "speed": rows, "startup": starts}, indent=2))
        return
    click.echo(f"{meta['cpu']}, {n_threads} threads, best of {meta['best_of']} each, alternating")
    click.echo("| model | numerics | test | refengine t/s | llama.cpp t/s | ratio |")
    click.echo("| ----- | -------- | ---: | ------------: | ------------: | ----: |")
    for r in rows:
        click.echo(
            f"| {r['model']} | {r['numerics']} | {r['test']} | {r['refengine_ts']:.1f} | {r['llama_cpp_ts']:.1f} "
            f"| {r['ratio']:.2f} |"
        )
    for s in starts:
        click.echo(
            f"{s['model']}: first token cold {s['cold_first_token_s']:.1f} s, warm {s['warm_first_token_s']:.1f} s; "
            f"peak RssAnon {s['warm_peak_rss_anon_mib']} MiB"
        )


if __name__ == "__main__":
    main()
