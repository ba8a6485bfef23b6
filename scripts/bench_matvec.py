#!/usr/bin/env python
"""Benchmark refengine's fused matvec kernels (refengine.kernels.matvec) the way decoding uses them.

Decoding one token multiplies every weight matrix by one vector, so it reads
every weight byte once per token and is bound by memory bandwidth. For every
type with a matvec kernel this prints:

  shape            the matrices streamed: gemma3-270m's layer shapes (2048 x 640
                   for the 32-value block types, 640 x 2048 for the others);
  GB/s             weight bytes read per second over a sequence of distinct
                   matrices of that shape, larger in total than the last-level
                   cache, one matvec() call each, as a decode pass calls them
                   layer by layer: the sum over the calls of each one's best
                   time over the passes (robust to other processes: best_calls);
  read BW GB/s     the machine's memory read bandwidth, measured by
                   refengine.kernels.membw.read_bandwidth right before the type;
  % of read BW     the ratio of the two;
  GB/s whole pass  GB/s from the best time of a whole pass instead;
  us/call          the median time of one call on one of those matrices, held in cache.

then the same for Q8_0 at the shape of gemma's output head (262144 x 640, 171 MB
a call, us/call from DRAM), and the fixed cost of a call: matvec() on a one-block
matrix, split into the wrapper's checks and numba's dispatch plus the wake-up of
its worker threads.

Figures on a busy machine are noise: a parallel call waits for its slowest
thread, and a worker that lost its CPU to another process costs a scheduler
tick (milliseconds). The share of CPU other processes took during the run is
printed, and the figures are flagged when it passes OTHERS_WARNING.

    .venv/bin/python scripts/bench_matvec.py
    .venv/bin/python scripts/bench_matvec.py --types Q8_0,Q4_K --size-mb 256 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from refengine.kernels import MATVEC_KERNELS, matvec
from refengine.kernels.membw import read_bandwidth

# Each type's sequence: distinct matrices totalling this much, four times the
# 480 MiB L3 this VM reports (the host's, shared), so that little of a pass can
# come from cache; the read probe's array is as large, so that both read alike.
DEFAULT_SIZE_MB = 2048
HEAD = "Q8_0 head"
HEAD_SHAPE = (262144, 640)  # gemma3-270m's output head (tied embeddings), Q8_0
READ_BW_BYTES = DEFAULT_SIZE_MB << 20
POOL_BLOCKS = 1 << 18  # distinct random blocks, repeated to fill a sequence
TIME_BUDGET_S = 2.0  # per type: repeat passes until this much time has gone
OVERHEAD_CALLS = 20000
OTHERS_WARNING = 0.05

# Byte offsets of the f16 scales in each block type, given sane values (random
# bytes there would give NaN and inf, which take slow paths).
F16_SCALES = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}  # fmt: skip
FLOATS = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.float32}


class OtherProcesses:
    """Share of all CPUs' time that other processes took since construction.

    Busy time of the whole machine comes from /proc/stat, ours from getrusage.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        ticks = 100.0  # USER_HZ
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            fields = [0] * 8
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks  # all but idle and iowait
        total = sum(fields[:8]) / ticks
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return busy, total, usage.ru_utime + usage.ru_stime

    def share(self) -> float:
        busy, total, ours = (b - a for a, b in zip(self.start, self._sample(), strict=True))
        return max(busy - ours, 0.0) / total if total > 0 else 0.0


def matrix_shape(ggml_type: T) -> tuple[int, int]:
    return (2048, 640) if GGML_QUANT_SIZES[ggml_type][0] == 32 else (640, 2048)


def random_blocks(ggml_type: T, n_blocks: int, rng) -> np.ndarray:
    """(n_blocks, type_size) uint8: random quants, sane scales (or plain normal floats)."""
    type_size = GGML_QUANT_SIZES[ggml_type][1]
    if ggml_type in FLOATS:
        values = rng.standard_normal(n_blocks, dtype=np.float32).astype(FLOATS[ggml_type])
        raw = (values.view(np.uint32) >> np.uint32(16)).astype(np.uint16) if ggml_type == T.BF16 else values
        return raw.view(np.uint8).reshape(n_blocks, type_size)
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in F16_SCALES[ggml_type]:
        scales = np.exp2(rng.uniform(-10, -2, n_blocks)).astype("<f2")
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks


def random_matrices(ggml_type: T, n_mats: int, shape: tuple[int, int], rng) -> np.ndarray:
    """(n_mats, n_out, row_bytes) read-only raw weights, a pool of random blocks repeated.

    Repeating the pool costs nothing in realism: caches hold addresses, not
    contents, and the kernels' speed does not depend on the values.
    """
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n_out, n_in = shape
    n_blocks = n_mats * n_out * n_in // block_size
    blocks = np.resize(random_blocks(ggml_type, min(n_blocks, POOL_BLOCKS), rng), (n_blocks, type_size))
    matrices = blocks.reshape(n_mats, n_out, n_in // block_size * type_size)
    matrices.flags.writeable = False  # like a file mapping
    return matrices


def best_calls(calls: list, budget_s: float = TIME_BUDGET_S, min_passes: int = 3) -> tuple[float, float]:
    """Seconds of (the best pass over all calls, the sum of each call's best over the passes).

    Every pass makes all the calls in order, so each call reads its matrix from
    DRAM (the whole sequence does not fit in cache). On a busy machine a pass of
    hundreds of calls always meets some that waited for a descheduled worker
    thread; the sum of per-call bests leaves those out.
    """
    for call in calls[:1]:
        call()  # compile or load from cache
    best_pass_s, best = float("inf"), np.full(len(calls), np.inf)
    start, passes = time.perf_counter(), 0
    while passes < min_passes or time.perf_counter() - start < budget_s:
        pass_start = time.perf_counter()
        for i, call in enumerate(calls):
            t0 = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - t0)
        best_pass_s = min(best_pass_s, time.perf_counter() - pass_start)
        passes += 1
    return best_pass_s, float(best.sum())


def median_call_s(call, n: int) -> float:
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return float(np.median(times))


def bench_type(ggml_type: T, size_mb: int, read_bw: float, rng) -> dict:
    shape = matrix_shape(ggml_type)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    matrix_bytes = shape[0] * shape[1] // block_size * type_size
    matrices = random_matrices(ggml_type, max(1, (size_mb << 20) // matrix_bytes), shape, rng)
    x = rng.standard_normal(shape[1], dtype=np.float32)
    out = np.empty(shape[0], dtype=np.float32)

    calls = [lambda w=w: matvec(ggml_type, w, x, out) for w in matrices]
    pass_s, calls_s = best_calls(calls)
    call_s = median_call_s(calls[0], 2000)
    return {
        "type": ggml_type.name,
        "shape": f"{shape[0]} x {shape[1]}",
        "streamed_mb": matrices.nbytes / 1e6,
        "gbps": matrices.nbytes / calls_s / 1e9,
        "read_bw_fraction": matrices.nbytes / calls_s / 1e9 / read_bw,
        "gbps_whole_pass": matrices.nbytes / pass_s / 1e9,
        "us_per_call": call_s * 1e6,
    }


def bench_head(size_mb: int, read_bw: float, rng) -> dict:
    """Q8_0 at the shape of gemma's output head, 171 MB a call.

    Copies enough to fill size_mb are called in turn: one head alone would stay
    in this VM's L3 from one call to the next.
    """
    head_bytes = HEAD_SHAPE[0] * HEAD_SHAPE[1] // 32 * 34
    heads = random_matrices(T.Q8_0, max(1, (size_mb << 20) // head_bytes), HEAD_SHAPE, rng)
    x = rng.standard_normal(HEAD_SHAPE[1], dtype=np.float32)
    out = np.empty(HEAD_SHAPE[0], dtype=np.float32)
    pass_s, calls_s = best_calls([lambda w=w: matvec(T.Q8_0, w, x, out) for w in heads])
    return {
        "type": HEAD,
        "shape": f"{HEAD_SHAPE[0]} x {HEAD_SHAPE[1]}",
        "streamed_mb": heads.nbytes / 1e6,
        "gbps": heads.nbytes / calls_s / 1e9,
        "read_bw_fraction": heads.nbytes / calls_s / 1e9 / read_bw,
        "gbps_whole_pass": heads.nbytes / pass_s / 1e9,
        "us_per_call": calls_s / len(heads) * 1e6,
    }


def call_overhead() -> dict:
    """Fixed cost of one call: a one-block Q8_0 matrix, so the work itself is nil."""
    kernel = MATVEC_KERNELS[T.Q8_0]
    rows = np.zeros((1, GGML_QUANT_SIZES[T.Q8_0][1]), dtype=np.uint8)
    rows.flags.writeable = False
    x, out = np.zeros(32, dtype=np.float32), np.zeros(1, dtype=np.float32)
    kernel(rows, x, out)
    whole = median_call_s(lambda: matvec(T.Q8_0, rows, x, out), OVERHEAD_CALLS)
    dispatch = median_call_s(lambda: kernel(rows, x, out), OVERHEAD_CALLS)
    return {"call_us": whole * 1e6, "wrapper_us": (whole - dispatch) * 1e6, "dispatch_us": dispatch * 1e6}


COLUMNS = [
    "type",
    "shape",
    "MB streamed",
    "GB/s",
    "read BW GB/s",
    "% of read BW",
    "GB/s whole pass",
    "us/call",
]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
    for r in results:
        cells = [
            r["type"],
            r["shape"],
            f"{r['streamed_mb']:.0f}",
            f"{r['gbps']:.2f}",
            f"{r['read_bw_gbps']:.1f}",
            f"{100 * r['read_bw_fraction']:.0f}%",
            f"{r['gbps_whole_pass']:.2f}",
            f"{r['us_per_call']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", help="comma-separated ggml type names (default: every matvec kernel)")
    parser.add_argument("--size-mb", type=int, default=DEFAULT_SIZE_MB, help="MB streamed per type")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    try:
        args.types = [T[name.strip()] for name in args.types.split(",")] if args.types else list(MATVEC_KERNELS)
    except KeyError as e:
        parser.error(f"unknown ggml type {e}")
    missing = [t.name for t in args.types if t not in MATVEC_KERNELS]
    if missing:
        parser.error(f"no matvec kernel for {', '.join(missing)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    others = OtherProcesses()
    results = []
    for ggml_type in args.types + ([HEAD] if T.Q8_0 in args.types else []):
        print(f"  {getattr(ggml_type, 'name', ggml_type)} ...", file=sys.stderr, flush=True)
        # Probed right before each type: on a shared host the bandwidth left to
        # this VM drifts by a factor of two within minutes.
        read_bw = read_bandwidth(READ_BW_BYTES, repeats=3)
        if ggml_type == HEAD:
            results.append(bench_head(args.size_mb, read_bw, rng))
        else:
            results.append(bench_type(ggml_type, args.size_mb, read_bw, rng))
        results[-1]["read_bw_gbps"] = read_bw
    overhead = call_overhead()
    share = others.share()
    if args.json:
        record = {"threads": args.threads, "other_cpu_share": share, "overhead": overhead, "results": results}
        print(json.dumps(record, indent=1))
        return 0
    probes = [r["read_bw_gbps"] for r in results]
    print(f"{args.threads} threads; read bandwidth {min(probes):.1f} to {max(probes):.1f} GB/s over the run")
    print(table(results))
    print(
        f"\nFixed cost of a call: {overhead['call_us']:.2f} us = {overhead['wrapper_us']:.2f} us of checks "
        f"in matvec() + {overhead['dispatch_us']:.2f} us of numba dispatch and thread wake-up."
    )
    print(f"Other processes used {share:.0%} of the CPUs during the run.")
    if share > OTHERS_WARNING:
        print("WARNING: the machine was busy; these figures understate the kernels.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
