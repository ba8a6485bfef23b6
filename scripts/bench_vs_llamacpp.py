#!/usr/bin/env python3
"""refengine beside llama.cpp on the same model, threads and machine, in one run.

For each model: llama-bench's pp512 (one batch of 512 tokens in an empty context) and tg128
(128 tokens decoded one at a time), by refengine (refengine.bench) and by llama.cpp through
llama-cpp-python with the same number of threads, alternating the two so that a busy moment of
a shared machine hits both; the best of the repetitions is kept (the least disturbed), and the
ratio refengine / llama.cpp is printed. With --startup it also times a whole
`refengine generate -n 1` from a fresh process, cold (an empty numba cache, so every kernel
compiles) and warm (the cache the cold run wrote), and reads the peak RssAnon it reports.

    .venv/bin/python scripts/bench_vs_llamacpp.py [--models gemma3-270m,smollm2-135m] [--json]
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

from refengine.bench import time_generation, time_prompt
from refengine.models import resolve_model
from refengine.session import Session

MODELS = ["gemma3-270m", "smollm2-135m"]


def llama_cpp_model(path, n_threads: int, n_ctx: int):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=n_threads, verbose=False)


def llama_prompt(llm, n: int, rng) -> float:
    tokens = rng.integers(0, llm.n_vocab(), size=n).tolist()
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - start


def llama_generation(llm, n: int, rng) -> float:
    tokens = rng.integers(0, llm.n_vocab(), size=n).tolist()
    llm.reset()
    start = time.perf_counter()
    for token in tokens:
        llm.eval([token])
    return time.perf_counter() - start


def compare(model: str, n_prompt: int, n_gen: int, repetitions: int, n_threads: int) -> list[dict]:
    ours = Session.load(model).model
    theirs = llama_cpp_model(resolve_model(model), n_threads, max(n_prompt, n_gen) + 16)
    rng = np.random.default_rng(0)
    rows = []
    for test, n, ours_run, theirs_run in (
        (
            f"pp{n_prompt}",
            n_prompt,
            lambda: time_prompt(ours, n_prompt, rng),
            lambda: llama_prompt(theirs, n_prompt, rng),
        ),
        (f"tg{n_gen}", n_gen, lambda: time_generation(ours, n_gen, rng), lambda: llama_generation(theirs, n_gen, rng)),
    ):
        ours_run(), theirs_run()  # warm-up: kernels load, pages fault in
        ours_s, theirs_s = [], []
        for _ in range(repetitions):
            ours_s.append(ours_run())
            theirs_s.append(theirs_run())
        ours_ts, theirs_ts = n / min(ours_s), n / min(theirs_s)
        rows.append(
            {
                "model": model,
                "test": test,
                "n_threads": n_threads,
                "refengine_ts": ours_ts,
                "llama_cpp_ts": theirs_ts,
                "ratio": ours_ts / theirs_ts,
                "refengine_samples_ts": [n / s for s in ours_s],
                "llama_cpp_samples_ts": [n / s for s in theirs_s],
            }
        )
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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--models", default=",".join(MODELS), show_default=True, help="Comma-separated bundled models.")
@click.option("-p", "--n-prompt", default=512, show_default=True, help="Prompt tokens (ppN).")
@click.option("-n", "--n-gen", default=128, show_default=True, help="Generated tokens (tgN).")
@click.option("-r", "--repetitions", default=3, show_default=True, help="Timed runs of each test and engine.")
@click.option("--startup/--no-startup", default=True, show_default=True, help="Also time cold and warm start-up.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def main(models: str, n_prompt: int, n_gen: int, repetitions: int, startup: bool, as_json: bool) -> None:
    """Print refengine's and llama.cpp's pp/tg tokens/s on the same models, and their ratio."""
    import llama_cpp
    import numba

    n_threads = numba.get_num_threads()
    rows, starts = [], []
    for model in models.split(","):
        rows += compare(model, n_prompt, n_gen, repetitions, n_threads)
        if startup:
            starts.append(globals()["startup"](model))
    machine = {"cpu": platform.processor() or platform.machine(), "n_threads": n_threads}
    meta = {"llama_cpp_python": llama_cpp.__version__, "machine": machine}
    if as_json:
        click.echo(json.dumps({"meta": meta, "speed": rows, "startup": starts}, indent=2))
        return
    click.echo(f"llama-cpp-python {llama_cpp.__version__}, {n_threads} threads, best of {repetitions}")
    click.echo("| model | test | refengine t/s | llama.cpp t/s | ratio |")
    click.echo("| ----- | ---: | ------------: | ------------: | ----: |")
    for r in rows:
        click.echo(
            f"| {r['model']} | {r['test']} | {r['refengine_ts']:.1f} | {r['llama_cpp_ts']:.1f} | {r['ratio']:.2f} |"
        )
    for s in starts:
        click.echo(
            f"{s['model']}: first token cold {s['cold_first_token_s']:.1f} s, warm {s['warm_first_token_s']:.1f} s; "
            f"peak RssAnon {s['warm_peak_rss_anon_mib']} MiB"
        )


if __name__ == "__main__":
    main()
