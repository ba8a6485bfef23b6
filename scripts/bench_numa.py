"""The cost of running experts on the NUMA pools, measured on whatever machine this is.

On a one-node machine `--numa shard` and `--numa split` place the pages and then leave the experts to the
calling thread (a pool would add hand-offs and bring nothing: every page is local already). This script
forces the pools on anyway, to measure that hand-off: in one process per model, the same session runs
prompt (ppN) and generation (tgN) tests with its MoE blocks' dispatch set to None (as --numa off), to
shard's ExpertDispatch and to split's SplitDispatch, alternating the three in every round; each figure is
the best over the rounds, so that noise from other processes only ever slows a run down.

    .venv/bin/python scripts/bench_numa.py                  # tiny "bigger" qwen3moe and deepseek2, Q4_K_M
    .venv/bin/python scripts/bench_numa.py --rounds 8 --json

--end-to-end measures the modes as a user runs them instead: `refengine bench model MODEL --numa off` and
`--numa split` as separate processes (nothing forced), one after the other in every round, the order
swapped each round; beside each mode's best it reports the median over the rounds of split/off, each
round's pair having run back to back, so that a busy spell of the machine hits both, and the ratio of the
processes' CPU time (load and page placement included), which waiting for the CPU does not inflate.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from refengine import numa
from refengine.bench import Context, time_generation, time_prompt
from refengine.session import Session
from refengine.system import read_system
from refengine.testing import quantize_q4_k_m, spec_for, write_tiny_model

MODES = ("off", "shard", "split")


def tiny(arch: str, folder: Path) -> Path:
    f32 = write_tiny_model(arch, folder / f"{arch}-bigger-f32.gguf", spec_for(arch, "bigger"))
    return quantize_q4_k_m(f32, folder / f"{arch}-bigger-q4_k_m.gguf")


def bench(path: Path, n_prompt: int, n_gen: int, rounds: int) -> dict:
    session = Session.load(str(path))
    system = read_system()
    runtimes = {mode: numa.NumaRuntime(mode, system) for mode in ("shard", "split")}
    dispatches = {"off": {}}
    try:
        for mode, runtime in runtimes.items():
            runtime.attach(session.gguf, session.model, dispatch=True)  # places the pages, sets the dispatch
            dispatches[mode] = {il: b.dispatch for il, b in session.model.moe_blocks()}
        rng = np.random.default_rng(0)
        prompt_ctx = Context(session.model, n_prompt, 0, rng)
        gen_ctx = Context(session.model, n_gen, 0, rng)
        best = {mode: {"pp": 0.0, "tg": 0.0} for mode in MODES}
        for _ in range(rounds + 1):  # the first round warms up (kernels load, pages fault in) and is not kept
            for mode in MODES:
                for il, block in session.model.moe_blocks():
                    block.dispatch = dispatches[mode].get(il)
                pp = n_prompt / time_prompt(prompt_ctx, n_prompt, rng)
                tg = n_gen / time_generation(gen_ctx, n_gen, rng)
                if _ > 0:
                    best[mode]["pp"] = max(best[mode]["pp"], pp)
                    best[mode]["tg"] = max(best[mode]["tg"], tg)
    finally:
        for runtime in runtimes.values():
            runtime.close()
    return {"model": path.name, "rounds": rounds, "tok_s": best}


def bench_model(path: Path, mode: str, n_prompt: int, n_gen: int) -> dict[str, float]:
    """One `refengine bench model --numa mode` process: {"pp": tok/s, "tg": tok/s}, each the best of 3, and
    "cpu": the process's user + system seconds."""
    command = [sys.executable, "-m", "refengine.cli", "bench", "model", str(path), "-p", str(n_prompt)]
    command += ["-n", str(n_gen), "-r", "3", "--numa", mode, "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    records = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {("pp" if r["n_prompt"] else "tg"): max(r["samples_ts"]) for r in records} | {"cpu": cpu}


def end_to_end(path: Path, n_prompt: int, n_gen: int, rounds: int) -> dict:
    """--numa split against --numa off as separate processes, alternating: each mode's best, and the median
    and range over the rounds of the split/off ratio of the pair run back to back."""
    bench_model(path, "off", n_prompt, n_gen)  # warms the numba cache and the page cache
    runs = {"off": [], "split": []}
    for i in range(rounds):
        for mode in ("off", "split") if i % 2 == 0 else ("split", "off"):
            runs[mode].append(bench_model(path, mode, n_prompt, n_gen))
    result = {"model": path.name, "rounds": rounds, "best": {}, "split_over_off": {}}
    for test in ("pp", "tg", "cpu"):
        ratios = [s[test] / o[test] for s, o in zip(runs["split"], runs["off"], strict=True)]
        best = min if test == "cpu" else max
        result["best"][test] = {mode: best(r[test] for r in runs[mode]) for mode in runs}
        result["split_over_off"][test] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, help="GGUF files (default: tiny bigger qwen3moe, deepseek2)")
    parser.add_argument("-p", "--n-prompt", type=int, default=32)
    parser.add_argument("-n", "--n-gen", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--end-to-end", action="store_true", help="--numa split against off, separate processes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        models = args.models or [tiny(arch, Path(folder)) for arch in ("qwen3moe", "deepseek2")]
        measure = end_to_end if args.end_to_end else bench
        results = [measure(path, args.n_prompt, args.n_gen, args.rounds) for path in models]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    if args.end_to_end:
        print(f"| model | rounds | pp{args.n_prompt} off | pp split | split/off median (range) "
              f"| tg{args.n_gen} off | tg split | split/off median (range) "
              "| CPU s split/off median (range) |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            cells = [r["model"], str(r["rounds"])]
            for test in ("pp", "tg", "cpu"):
                best, ratio = r["best"][test], r["split_over_off"][test]
                if test != "cpu":
                    cells += [f"{best['off']:.1f}", f"{best['split']:.1f}"]
                cells.append(f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})")
            print("| " + " | ".join(cells) + " |")
        return
    print(f"| model | pp{args.n_prompt} off | shard/off | split/off | tg{args.n_gen} off | shard/off | split/off |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        t = r["tok_s"]
        print(
            f"| {r['model']} | {t['off']['pp']:.1f} | {t['shard']['pp'] / t['off']['pp']:.3f} | "
            f"{t['split']['pp'] / t['off']['pp']:.3f} | {t['off']['tg']:.1f} | "
            f"{t['shard']['tg'] / t['off']['tg']:.3f} | {t['split']['tg'] / t['off']['tg']:.3f} |"
        )


if __name__ == "__main__":
    main()
