#!/usr/bin/env python
"""Benchmark refengine's dequantization kernels the way a matmul uses them, and check them against gguf.quants.

The speed is `refengine bench kernels --op dequant` (refengine.benchkernels): quantized rows larger
than the last-level cache, dequantized 1 MB of float32 at a time into one reused tile, GB/s of
quantized input, as a percentage of the read bandwidth measured over the same bytes in the same
passes. This script adds, for every type that gguf.quants can also dequantize:

  bit-exact      whether our output equals gguf.quants' bit for bit on a sample (a kernel that is
                 not is reported FAIL and never timed);
  x gguf.quants  elements per second over gguf.quants.dequantize's, timed on that sample;
  --sweep-tiles  GB/s for each tile size in SWEEP_TILE_KB, the data behind the 1 MB tile.

Exit status: 0 when every kernel is bit-exact (missed speed targets are only reported), 1 when
some kernel is not, 2 for bad arguments.

    .venv/bin/python scripts/bench_dequant.py
    .venv/bin/python scripts/bench_dequant.py --types Q4_K,Q6_K --json
    .venv/bin/python scripts/bench_dequant.py --sweep-tiles --types Q8_0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T
from refengine.kernels import dequantize_rows

from refengine import benchkernels
from refengine.benchkernels import (  # noqa: F401  (OtherProcesses, cpu_model: also used by the other bench scripts)
    N_COLS,
    BenchError,
    OtherProcesses,
    bench_kernels,
    cpu_model,
    markdown,
    parse_types,
    random_rows,
)

# Output tile per dequantize_rows call: 1 MB of float32 (64 rows of 4096), benchkernels.TILE_BYTES.
# Measured with --sweep-tiles on the 2-core development VM (2 MB L2 per core), GB/s in for Q4_K,
# 2 threads: 64 KB 1.7, 256 KB 4.1, 512 KB 5.3, 1 MB 6.2, 2 MB 6.5, 4 MB 5.8 (Q6_K and F32 alike).
# Small tiles lose to the fixed cost of a call, ~4 us (argument checks, numba dispatch, waking the
# worker threads), since 64 KB of output is only ~10-20 KB of quantized input. From 1 MB the curve
# is flat; at 4 MB a core's share of the tile no longer fits its L2, so the writes spill, and a
# matmul reading the tile back would miss L2 too. So 1 MB: the smallest size on the plateau.
SWEEP_TILE_KB = (64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_REF_MB = 2  # gguf.quants sample: it runs at 10-200 MB/s, a few MB is enough
REF_BUDGET_S = 1.0  # repeat the gguf.quants timing only while under this
TARGET_READ_BW_FRACTION = 0.5
TARGET_READ_BW_TYPES = ("Q4_K", "Q6_K", "Q8_0")
TARGET_SPEEDUP = 100.0


def gguf_can_dequantize(ggml_type: T) -> bool:
    try:
        quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[ggml_type][1]), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


def check_against_gguf(ggml_type: T, ref_mb: int, rng) -> dict:
    """Our output against gguf.quants' on ref_mb of random rows: bit-exact, and gguf.quants' best
    time per element (None for F32, which gguf.quants returns as a view: nothing to compare)."""
    sample = random_rows(ggml_type, ref_mb << 20, N_COLS, rng)
    ours = dequantize_rows(ggml_type, sample)
    times = []
    while not times or (len(times) < 3 and sum(times) < REF_BUDGET_S):
        start = time.perf_counter()
        with np.errstate(all="ignore"):
            ref = quants.dequantize(sample, ggml_type).reshape(sample.shape[0], N_COLS)
        times.append(time.perf_counter() - start)
    differ = ours.view(np.uint32) != ref.view(np.uint32)
    record = {"type": ggml_type.name, "bit_exact": not differ.any(), "note": ""}
    if differ.any():
        r, c = np.argwhere(differ)[0]
        record["note"] = f"FAIL: {differ.sum()} values differ, first [{r},{c}]: ours {ours[r, c]!r}, gguf {ref[r, c]!r}"
    record["gguf_ns_per_element"] = None if np.shares_memory(ref, sample) else min(times) / ref.size * 1e9
    return record


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--types", help="comma-separated ggml types, e.g. Q4_K,Q6_K (default: every type with a kernel)")
    add("--size-mb", type=int, default=None, help="quantized input streamed per type, MB (default: >= 16 x L3)")
    add("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS, help="numba threads")
    add("--budget", type=float, default=benchkernels.DEFAULT_BUDGET_S, help="seconds of passes per type")
    add("--ref-mb", type=int, default=DEFAULT_REF_MB, help="sample for the gguf.quants check and timing, MB")
    add("--sweep-tiles", action="store_true", help=f"also time every tile size in {SWEEP_TILE_KB} KB")
    add("--vs-ggml", action="store_true", help="also run ggml's dequantize_row_* through ctypes")
    add("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args(argv)
    if args.ref_mb < 1:
        parser.error("--ref-mb must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        types = [t for t in parse_types("dequant", args.types) if gguf_can_dequantize(t)]
    except BenchError as e:
        print(f"bench_dequant: error: {e}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(20250101)
    checks = {t: check_against_gguf(t, args.ref_mb, rng) for t in types}
    exact = [t for t in types if checks[t]["bit_exact"]]  # a wrong kernel is never timed
    vs_ggml = args.vs_ggml and importlib.util.find_spec("llama_cpp") is not None
    run = bench_kernels("dequant", exact, [], vs_ggml, args.threads, args.size_mb, args.budget)
    for result in run.results:
        gguf_ns = checks[T[result.type]]["gguf_ns_per_element"]
        block_size, type_size = GGML_QUANT_SIZES[T[result.type]]
        ours_ns = type_size / block_size / result.gbps
        checks[T[result.type]]["speedup_vs_gguf"] = None if gguf_ns is None else gguf_ns / ours_ns
    sweep = []
    if args.sweep_tiles:
        numba.set_num_threads(args.threads)
        for ggml_type in exact:
            size_mb = args.size_mb or benchkernels.default_size_mb()
            sweep.append({"type": ggml_type.name})
            for tile_kb in SWEEP_TILE_KB:
                result = benchkernels.bench_dequant(
                    ggml_type, size_mb, False, args.threads, args.budget, rng, tile_kb << 10
                )
                sweep[-1][f"{tile_kb} KB"] = result.gbps
    if args.json:
        print(json.dumps({"run": run.as_dict(), "checks": list(checks.values()), "tile_sweep": sweep}, indent=1))
    else:
        print(markdown(run))
        print("\n| type | bit-exact | x gguf.quants | note |\n|---|:---:|---:|---|")
        for check in checks.values():
            speedup = check.get("speedup_vs_gguf")
            cells = ["yes" if check["bit_exact"] else "**FAIL**", "-" if speedup is None else f"{speedup:.0f}x"]
            print(f"| {check['type']} | {cells[0]} | {cells[1]} | {check['note']} |")
        by_type = {r.type: r for r in run.results}
        passed = [
            t for t in TARGET_READ_BW_TYPES if t in by_type and by_type[t].read_bw_fraction >= TARGET_READ_BW_FRACTION
        ]
        fast = [c["type"] for c in checks.values() if (c.get("speedup_vs_gguf") or 0) >= TARGET_SPEEDUP]
        print(
            f"\nTargets: >= {TARGET_READ_BW_FRACTION:.0%} of read BW: {', '.join(passed) or 'none'} "
            f"of {', '.join(TARGET_READ_BW_TYPES)}; >= {TARGET_SPEEDUP:.0f}x gguf.quants: {', '.join(fast) or 'none'}."
        )
        if sweep:
            print("\nTile sweep, GB/s of quantized input by float32 output per call:\n")
            print("| type | " + " | ".join(f"{kb} KB" for kb in SWEEP_TILE_KB) + " |")
            print("|---|" + "---:|" * len(SWEEP_TILE_KB))
            for record in sweep:
                print(f"| {record['type']} | " + " | ".join(f"{record[f'{kb} KB']:.2f}" for kb in SWEEP_TILE_KB) + " |")
    return 1 if any(not c["bit_exact"] for c in checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
