#!/usr/bin/env python
"""Benchmark refengine's matvec kernels the way decoding uses them: `refengine bench kernels --op matvec`.

Decoding one token multiplies every weight matrix by one vector, so it reads every weight byte
once per token and is bound by memory bandwidth if the kernel keeps up. The measuring code is
refengine.benchkernels (see its docstring): a sequence of distinct weights larger than the
last-level cache, one call each, every call's best time over the passes, the read bandwidth
measured over the same bytes in the same passes; both numerics (exact float32, ggml integer)
and, with --vs-ggml, ggml's own mul_mat through ctypes. This script adds nothing but its
defaults: every type with a kernel in both numerics, and ggml beside them when llama-cpp-python
is installed.

    .venv/bin/python scripts/bench_matvec.py
    .venv/bin/python scripts/bench_matvec.py --types Q8_0,Q4_K --json
    .venv/bin/python scripts/bench_matvec.py --types Q8_0 --shape 262144x640   # gemma3's output head
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import numba

from refengine.benchkernels import DEFAULT_BUDGET_S, BenchError, bench_kernels, markdown, parse_types


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", help="comma-separated ggml type names (default: every matvec kernel)")
    parser.add_argument("--numerics", choices=["exact", "ggml", "both"], default="both")
    parser.add_argument("--size-mb", type=int, default=None, help="MB streamed per type (default: >= 16 x L3)")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds of passes per type")
    parser.add_argument("--shape", help="N_OUTxN_IN of every weight (default: gemma3-270m's layer shapes)")
    parser.add_argument("--no-ggml", action="store_true", help="leave out ggml's own mul_mat")
    parser.add_argument("--json", action="store_true", help="print the run as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    numerics = ["exact", "ggml"] if args.numerics == "both" else [args.numerics]
    vs_ggml = not args.no_ggml and importlib.util.find_spec("llama_cpp") is not None
    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x")) if args.shape else None
        types = parse_types("matvec", args.types, numerics)
        run = bench_kernels("matvec", types, numerics, vs_ggml, args.threads, args.size_mb, args.budget, shape)
    except (BenchError, ValueError) as e:
        print(f"bench_matvec: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(run.as_dict(), indent=1) if args.json else markdown(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
