#!/usr/bin/env python
"""Benchmark refengine's dequantization kernels the way a matmul uses them.

For every ggml type that has a kernel in refengine.kernels.DEQUANTIZERS and that
gguf.quants can also dequantize, this prints:

  GB/s in       quantized bytes consumed per second, streaming a tensor larger
                than the last-level cache, tile by tile into one small reused
                float32 buffer (compile time excluded: every kernel is warmed up);
  % of read BW  that figure over this machine's memory read bandwidth, measured
                in the same run by refengine.kernels.membw.read_bandwidth;
  x gguf.quants elements per second over gguf.quants.dequantize's, which is
                timed on a small sample because it is slow;
  bit-exact     whether our output equals gguf.quants' bit for bit on a sample.
                A kernel that is not exact is reported FAIL and never timed.

Exit status: 0 when every kernel is bit-exact (missed speed targets are only
reported), 1 when some kernel is not, 2 for bad arguments.

    .venv/bin/python scripts/bench_dequant.py
    .venv/bin/python scripts/bench_dequant.py --types Q4_K,Q6_K --json
    .venv/bin/python scripts/bench_dequant.py --sweep-tiles --types Q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T
from refengine.kernels import DEQUANTIZERS, dequantize_rows
from refengine.kernels.membw import read_bandwidth

# Row length of the benchmark tensor: a typical hidden size, and a multiple of
# every block size (1, 32, 64, 256), so every type gets the same geometry.
N_COLS = 4096

# Output tile per dequantize_rows call: 1 MB of float32 (64 rows of 4096).
# Measured with --sweep-tiles on the 2-core development VM (2 MB L2 per core),
# GB/s in for Q4_K, 2 threads: 64 KB 1.7, 256 KB 4.1, 512 KB 5.3, 1 MB 6.2,
# 2 MB 6.5, 4 MB 5.8 (Q6_K and F32 alike). Small tiles lose to the fixed cost of
# a call, ~4 us (argument checks, numba dispatch, waking the worker threads),
# since 64 KB of output is only ~10-20 KB of quantized input. From 1 MB the curve
# is flat (2 MB is within the noise); at 4 MB a core's share of the tile no longer
# fits its L2, so the writes spill, and a matmul reading the tile back would miss
# L2 too. With one thread the peak is at 1 MB (Q4_K: 3.5 GB/s, 3.1 at 2 MB). So
# 1 MB: the smallest size on the plateau, and half of it per core leaves room in
# L2 for the activations a matmul streams alongside.
DEFAULT_TILE_KB = 1024
SWEEP_TILE_KB = (64, 128, 256, 512, 1024, 2048, 4096)

# The quantized tensor streamed per type. It must not fit in the last-level
# cache, or the benchmark measures the cache: this VM reports a 480 MiB L3
# (a share of a large host L3), so the default is above that. Fast kernels run
# a 512 MB pass in tens of milliseconds, so the size costs little time.
DEFAULT_SIZE_MB = 512
DEFAULT_REF_MB = 2  # gguf.quants sample: it runs at 10-200 MB/s, a few MB is enough
READ_BW_BYTES = 1 << 30  # the read probe's array: twice the L3, like the tensor
TARGET_READ_BW_FRACTION = 0.5
TARGET_READ_BW_TYPES = ("Q4_K", "Q6_K", "Q8_0")
TARGET_SPEEDUP = 100.0
TIME_BUDGET_S = 3.0  # per type and tile size: passes stop (even midway) after this
MIN_TILES = 16  # a pass cut short by TIME_BUDGET_S still covers at least this many tiles
REF_BUDGET_S = 1.0  # repeat the gguf.quants timing only while under this
UNSTABLE_SPREAD = 1.5  # flag a type whose slowest pass took this many times its best
OTHERS_WARNING = 0.05  # share of the CPUs used by other processes above which a figure is flagged

# Where each block keeps the fields that scale its values, and how they are
# encoded. Random bytes there would give NaN, inf and subnormal scales, which
# take slow paths on one side or the other; random bytes everywhere else are
# valid quants. Offsets follow the C structs (block_q4_K etc.), which
# gguf.quants splits the same way.
F16, BF16, F32, E8M0, UE4M3, IQ1M_F16 = "f16", "bf16", "f32", "e8m0", "ue4m3", "iq1m_f16"
SCALE_FIELDS: dict[T, list[tuple[int, str]]] = {
    # One element per "block": every value is a float and has to be sane.
    T.F32: [(0, F32)],
    T.F16: [(0, F16)],
    T.BF16: [(0, BF16)],
    # Legacy blocks start with d (and m for the _1 types).
    T.Q4_0: [(0, F16)],
    T.Q4_1: [(0, F16), (2, F16)],
    T.Q5_0: [(0, F16)],
    T.Q5_1: [(0, F16), (2, F16)],
    T.Q8_0: [(0, F16)],
    # K-quants: Q2_K is scales[16] qs[64] d dmin; Q3_K hmask[32] qs[64] scales[12] d;
    # Q4_K and Q5_K start with d dmin; Q6_K is ql[128] qh[64] scales[16] d.
    T.Q2_K: [(80, F16), (82, F16)],
    T.Q3_K: [(108, F16)],
    T.Q4_K: [(0, F16), (2, F16)],
    T.Q5_K: [(0, F16), (2, F16)],
    T.Q6_K: [(208, F16)],
    # I-quants start with d, except IQ1_M, whose d is spread over the top nibbles
    # of the four uint16 sub-block scales at the end of the block (qs[32] qh[16] scales[8]).
    T.IQ2_XXS: [(0, F16)],
    T.IQ2_XS: [(0, F16)],
    T.IQ2_S: [(0, F16)],
    T.IQ3_XXS: [(0, F16)],
    T.IQ3_S: [(0, F16)],
    T.IQ1_S: [(0, F16)],
    T.IQ1_M: [(48, IQ1M_F16)],
    T.IQ4_NL: [(0, F16)],
    T.IQ4_XS: [(0, F16)],
    # Ternary: TQ1_0 is qs[48] qh[4] d; TQ2_0 is qs[64] d.
    T.TQ1_0: [(52, F16)],
    T.TQ2_0: [(64, F16)],
    # FP4: MXFP4 starts with one e8m0 exponent; NVFP4 with four ue4m3 sub-block scales.
    T.MXFP4: [(0, E8M0)],
    T.NVFP4: [(0, UE4M3), (1, UE4M3), (2, UE4M3), (3, UE4M3)],
}

# Sane values are drawn into a pool and repeated over the tensor: drawing one
# per block would need gigabytes of temporaries for F16, and the period (a prime,
# so it does not line up with rows or tiles) is far longer than any cache line
# pattern a kernel could exploit.
POOL_SIZE = 65521


@dataclass
class Result:
    """One row of the table (and one record of --json)."""

    type: str
    bit_exact: bool | None  # None: not checked (skipped)
    gbps_in: float | None = None  # quantized GB/s, streaming, tiled
    read_bw_fraction: float | None = None
    speedup_vs_gguf: float | None = None  # per element
    ns_per_element: float | None = None
    gguf_ns_per_element: float | None = None
    input_mb: float | None = None
    tile_kb: int | None = None
    passes: int | None = None  # the last may be partial (TIME_BUDGET_S)
    other_cpu_share: float | None = None  # CPU taken by other processes while timed (OtherProcesses)
    note: str = ""


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo; the logical count if absent."""
    cores, package = set(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                package = value.strip()
            elif key == "core id":
                cores.add((package, value.strip()))
    except OSError:
        pass
    return len(cores) or (os.cpu_count() or 1)


def l3_bytes() -> int | None:
    """Size of the largest cache of CPU 0, from sysfs (what the OS, or the hypervisor, reports)."""
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=None)


class OtherProcesses:
    """Share of the machine's CPU time that other processes took while this one measured.

    Parallel kernels end every call at a barrier, so one worker thread that loses
    its CPU to another process stalls the whole call: a few percent of outside
    load can halve GB/s, and a busy machine makes the figures noise. Busy time
    comes from /proc/stat (all processes), ours from getrusage (all our threads).
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return time.perf_counter(), 0.0, 0.0
        # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, usage.ru_utime + usage.ru_stime

    def share(self) -> float:
        """Others' CPU time since construction, as a fraction of (wall time x CPUs)."""
        wall, busy, ours = (end - start for end, start in zip(self._sample(), self.start, strict=True))
        return max(0.0, busy - ours) / max(wall * (os.cpu_count() or 1), 1e-9)


def machine_header(threads: int, probes: list[float], others: float) -> str:
    l3 = l3_bytes()
    l3_text = f", L3 {l3 >> 20} MiB" if l3 else ""
    return (
        f"Machine: {cpu_model()}, {physical_cores()} cores / {os.cpu_count()} logical CPUs{l3_text}; "
        f"{threads} numba threads ({numba.threading_layer()}); "
        f"numpy {np.__version__}, numba {numba.__version__}; "
        f"memory read bandwidth {max(probes):.1f} GB/s ({READ_BW_BYTES >> 20} MB uint64 sum, best of 5, "
        f"better of {' and '.join(f'{p:.1f}' for p in probes)} before and after); "
        f"other processes used {others:.0%} of the CPUs during the run"
    )


# ---------------------------------------------------------------- types


def gguf_can_dequantize(ggml_type: T) -> bool:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    try:
        quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


def parse_type_names(names: str) -> list[T]:
    """'Q4_K,q6_k' -> [T.Q4_K, T.Q6_K]; ValueError naming the first unknown type."""
    wanted = []
    for name in filter(None, (part.strip().upper() for part in names.split(","))):
        if name not in T.__members__:
            raise ValueError(f"unknown ggml type {name!r}")
        wanted.append(T[name])
    return wanted


def select_types(wanted: list[T] | None) -> tuple[list[T], list[Result]]:
    """The types to benchmark, in DEQUANTIZERS' order (kernel families together), and a
    skipped row for each requested type that cannot be run."""
    order = {ggml_type: i for i, ggml_type in enumerate(DEQUANTIZERS)}
    wanted = sorted(set(wanted or DEQUANTIZERS), key=lambda t: (order.get(t, len(order)), t.value))
    chosen, skipped = [], []
    for ggml_type in wanted:
        if ggml_type not in DEQUANTIZERS:
            skipped.append(Result(ggml_type.name, None, note="skipped: no refengine kernel yet"))
        elif not gguf_can_dequantize(ggml_type):
            skipped.append(Result(ggml_type.name, None, note="skipped: gguf.quants cannot dequantize it"))
        elif ggml_type not in SCALE_FIELDS:
            skipped.append(Result(ggml_type.name, None, note="skipped: scale layout unknown to this script"))
        else:
            chosen.append(ggml_type)
    return chosen, skipped


# ---------------------------------------------------------------- input data


def sane_pool(kind: str, rng: np.random.Generator) -> np.ndarray:
    """POOL_SIZE encoded scales of one kind, as a (POOL_SIZE, width) uint8 array."""
    # Normal numbers of both signs, magnitudes 2^-10..2^-2 like real weight scales:
    # far from f16's subnormal range and from overflow in either library.
    magnitude = np.exp2(rng.uniform(-10, -2, POOL_SIZE)).astype(np.float32)
    values = np.where(rng.random(POOL_SIZE) < 0.5, -magnitude, magnitude).astype(np.float32)
    if kind in (F16, IQ1M_F16):
        return values.astype(np.float16).view(np.uint8).reshape(POOL_SIZE, 2)
    if kind == BF16:  # the top half of the float32
        return (values.view(np.uint32) >> np.uint32(16)).astype("<u2").view(np.uint8).reshape(POOL_SIZE, 2)
    if kind == F32:
        return values.astype("<f4").view(np.uint8).reshape(POOL_SIZE, 4)
    if kind == E8M0:  # a power-of-two exponent with bias 127: 2^-10..2^10
        return rng.integers(117, 138, (POOL_SIZE, 1), dtype=np.uint8)
    if kind == UE4M3:  # unsigned e4m3: exponent 3..11 (normal, never 0x7F), any mantissa
        exponent = rng.integers(3, 12, POOL_SIZE, dtype=np.uint8)
        mantissa = rng.integers(0, 8, POOL_SIZE, dtype=np.uint8)
        return ((exponent << 3) | mantissa).reshape(POOL_SIZE, 1)
    raise ValueError(f"unknown scale kind {kind}")


def write_sane_scales(blocks: np.ndarray, ggml_type: T, rng: np.random.Generator) -> None:
    """Overwrite, in place, every scale field of (n_blocks, type_size) `blocks` with sane values."""
    n_blocks = blocks.shape[0]
    for offset, kind in SCALE_FIELDS[ggml_type]:
        pool = sane_pool(kind, rng)
        values = np.resize(pool, (n_blocks, pool.shape[1]))
        if kind == IQ1M_F16:
            # Nibble k of d is the top nibble of the k-th little-endian uint16, i.e.
            # the high nibble of byte offset + 2k + 1; the low 12 bits stay random.
            bits = values.view("<u2")[:, 0]
            for k in range(4):
                column = blocks[:, offset + 2 * k + 1]
                nibble = ((bits >> np.uint16(4 * k)) & np.uint16(0xF)).astype(np.uint8)
                blocks[:, offset + 2 * k + 1] = (column & np.uint8(0x0F)) | (nibble << np.uint8(4))
        else:
            blocks[:, offset : offset + pool.shape[1]] = values


def random_bytes(n_bytes: int, rng: np.random.Generator) -> np.ndarray:
    # uint64 draws are ~3x faster than uint8 ones and give the same uniform bytes.
    words = rng.integers(0, np.iinfo(np.uint64).max, (n_bytes + 7) // 8, dtype=np.uint64, endpoint=True)
    return words.view(np.uint8)[:n_bytes]


def row_bytes(ggml_type: T) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    return N_COLS // block_size * type_size


def as_rows(buffer: np.ndarray, ggml_type: T, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """The first n_rows whole rows of `buffer` as (n_rows, row_bytes), with sane scales written in."""
    rows = buffer[: n_rows * row_bytes(ggml_type)].reshape(n_rows, row_bytes(ggml_type))
    write_sane_scales(rows.reshape(-1, GGML_QUANT_SIZES[ggml_type][1]), ggml_type, rng)
    return rows


# ---------------------------------------------------------------- measurement


def reference(ggml_type: T, rows: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return quants.dequantize(rows, ggml_type).reshape(rows.shape[0], N_COLS)


def time_reference(ggml_type: T, rows: np.ndarray) -> tuple[np.ndarray, float | None]:
    """gguf.quants' output for `rows`, and its best time per element.

    Runs up to three times while under REF_BUDGET_S (the slow I-quants get one
    run). The time is None when gguf.quants returns a view of the input (F32):
    there is no work to compare with.
    """
    times = []
    while not times or (len(times) < 3 and sum(times) < REF_BUDGET_S):
        start = time.perf_counter()
        ref = reference(ggml_type, rows)
        times.append(time.perf_counter() - start)
    if np.shares_memory(ref, rows):
        return ref, None
    return ref, min(times) / (rows.shape[0] * N_COLS)


def first_mismatch(ours: np.ndarray, ref: np.ndarray) -> str | None:
    """None if the two float32 arrays are equal bit for bit, else where they first differ."""
    differ = ours.view(np.uint32) != ref.view(np.uint32)
    if not differ.any():
        return None
    r, c = np.argwhere(differ)[0]
    where = f"first at [{r},{c}]: ours {ours[r, c]!r}, gguf.quants {ref[r, c]!r}"
    return f"{differ.sum()} of {differ.size} values differ, {where}"


def one_pass(ggml_type: T, rows: np.ndarray, tile: np.ndarray, deadline: float) -> float:
    """Dequantize `rows` tile by tile into the same buffer, as a matmul would; GB/s of input.

    Stops early, after at least MIN_TILES tiles, once `deadline` (perf_counter) has
    passed, so a slow kernel or a busy machine cannot stretch the run without
    bound. A partial pass still streams from DRAM: the tensor is larger than the
    cache, so nothing of it survives from the previous pass.
    """
    tile_rows = tile.shape[0]
    done, start = 0, time.perf_counter()
    for first in range(0, rows.shape[0], tile_rows):
        chunk = rows[first : first + tile_rows]
        dequantize_rows(ggml_type, chunk, out=tile[: chunk.shape[0]])
        done += chunk.shape[0]
        if done >= MIN_TILES * tile_rows and time.perf_counter() > deadline:
            break
    return done * rows.shape[1] / (time.perf_counter() - start) / 1e9


def pass_rates(ggml_type: T, rows: np.ndarray, tile_kb: int, repeats: int) -> list[float]:
    """GB/s in of up to `repeats` passes over `rows`, with a tile of `tile_kb` KB of float32 output,
    all within TIME_BUDGET_S. The caller takes the best: noise only ever slows a pass down."""
    tile_rows = max(1, (tile_kb << 10) // (N_COLS * 4))
    tile = np.empty((tile_rows, N_COLS), dtype=np.float32)
    one_pass(ggml_type, rows[: 4 * tile_rows], tile, deadline=0.0)  # warm: threads awake, code resident
    deadline = time.perf_counter() + TIME_BUDGET_S
    rates = []
    while len(rates) < repeats and (not rates or time.perf_counter() < deadline):
        rates.append(one_pass(ggml_type, rows, tile, deadline))
    return rates


def bench_type_progress(ggml_type: T, buffer: np.ndarray, args, rng) -> Result:
    progress(f"  {ggml_type.name}...")
    return bench_type(ggml_type, buffer, args, rng)


def bench_type(ggml_type: T, buffer: np.ndarray, args, rng) -> Result:
    """Check one type against gguf.quants, then time it; read_bw_fraction is filled in by the caller."""
    result = Result(ggml_type.name, bit_exact=None)
    # Bit-exactness first, on a sample gguf.quants can digest: a wrong kernel is never timed.
    n_sample_rows = (args.ref_mb << 20) // row_bytes(ggml_type)
    sample = as_rows(random_bytes(args.ref_mb << 20, rng), ggml_type, n_sample_rows, rng)
    ours = dequantize_rows(ggml_type, sample)  # also compiles our kernel (or loads it from cache)
    ref, gguf_seconds = time_reference(ggml_type, sample)
    mismatch = first_mismatch(ours, ref)
    result.bit_exact = mismatch is None
    if mismatch:
        result.note = f"FAIL: {mismatch}"
        return result

    rows = as_rows(buffer, ggml_type, len(buffer) // row_bytes(ggml_type), rng)
    watch = OtherProcesses()
    rates = pass_rates(ggml_type, rows, args.tile_kb, args.repeats)
    result.other_cpu_share = watch.share()
    result.gbps_in, result.passes = max(rates), len(rates)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    our_seconds = type_size / block_size / (result.gbps_in * 1e9)
    result.input_mb = rows.nbytes / 1e6
    result.tile_kb = args.tile_kb
    result.ns_per_element = our_seconds * 1e9
    notes = []
    if result.other_cpu_share > OTHERS_WARNING:
        notes.append(f"disturbed: other processes used {result.other_cpu_share:.0%} of the CPUs while timed")
    if max(rates) > UNSTABLE_SPREAD * min(rates):
        notes.append(f"unstable: slowest pass ran {max(rates) / min(rates):.1f}x slower than the best")
    if gguf_seconds is None:
        notes.append("gguf.quants returns a view of F32 data: no speedup to measure")
    else:
        result.gguf_ns_per_element = gguf_seconds * 1e9
        result.speedup_vs_gguf = gguf_seconds / our_seconds
    result.note = "; ".join(notes)
    return result


def sweep_tiles(types: list[T], buffer: np.ndarray, args, rng) -> list[dict]:
    """GB/s in for each tile size in SWEEP_TILE_KB: the data behind DEFAULT_TILE_KB."""
    records = []
    for ggml_type in types:
        sample = as_rows(buffer, ggml_type, 64, rng)
        if first_mismatch(dequantize_rows(ggml_type, sample), reference(ggml_type, sample)) is not None:
            continue  # reported FAIL in the main table
        rows = as_rows(buffer, ggml_type, len(buffer) // row_bytes(ggml_type), rng)
        record = {"type": ggml_type.name}
        watch = OtherProcesses()
        for tile_kb in SWEEP_TILE_KB:
            record[f"{tile_kb} KB"] = max(pass_rates(ggml_type, rows, tile_kb, args.repeats))
        record["other_cpu_share"] = watch.share()
        records.append(record)
        progress(f"  swept {ggml_type.name}")
    return records


# ---------------------------------------------------------------- output


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def fmt_speedup(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}x" if value >= 10 else f"{value:.1f}x"


def markdown_table(results: list[Result]) -> str:
    lines = ["| type | GB/s in | % of read BW | x gguf.quants | bit-exact |", "|---|---:|---:|---:|:---:|"]
    for r in results:
        exact = {True: "yes", False: "**FAIL**", None: "—"}[r.bit_exact]
        lines.append(
            f"| {r.type} | {fmt(r.gbps_in, '{:.2f}')} | {fmt(r.read_bw_fraction, '{:.0%}')} "
            f"| {fmt_speedup(r.speedup_vs_gguf)} | {exact} |"
        )
    return "\n".join(lines)


def notes(results: list[Result]) -> list[str]:
    return [f"- {r.type}: {r.note}" for r in results if r.note]


def target_checks(results: list[Result]) -> list[str]:
    """One line per target: which types pass, which miss, and which could not be measured."""
    by_name = {r.type: r for r in results}
    lines = []
    bw = [by_name[name] for name in TARGET_READ_BW_TYPES if name in by_name]
    bw = [r for r in bw if r.read_bw_fraction is not None]
    passed = [r.type for r in bw if r.read_bw_fraction >= TARGET_READ_BW_FRACTION]
    missed = [f"{r.type} ({r.read_bw_fraction:.0%})" for r in bw if r.read_bw_fraction < TARGET_READ_BW_FRACTION]
    absent = [name for name in TARGET_READ_BW_TYPES if name not in {r.type for r in bw}]
    lines.append(target_line(f">= {TARGET_READ_BW_FRACTION:.0%} of read bandwidth", passed, missed, absent))
    timed = [r for r in results if r.speedup_vs_gguf is not None]
    passed = [r.type for r in timed if r.speedup_vs_gguf >= TARGET_SPEEDUP]
    missed = [f"{r.type} ({fmt_speedup(r.speedup_vs_gguf)})" for r in timed if r.speedup_vs_gguf < TARGET_SPEEDUP]
    absent = [r.type for r in results if r.speedup_vs_gguf is None]
    lines.append(target_line(f">= {TARGET_SPEEDUP:.0f}x gguf.quants", passed, missed, absent))
    return lines


def target_line(target: str, passed: list[str], missed: list[str], absent: list[str]) -> str:
    line = f"- {target}: pass {', '.join(passed) or 'none'}; miss {', '.join(missed) or 'none'}"
    return line + (f"; not measured {', '.join(absent)}" if absent else "")


def sweep_table(records: list[dict]) -> str:
    header = "| type | " + " | ".join(f"{kb} KB" for kb in SWEEP_TILE_KB) + " | others' CPU |"
    lines = [header, "|---|" + "---:|" * (len(SWEEP_TILE_KB) + 1)]
    for record in records:
        cells = " | ".join(f"{record[f'{kb} KB']:.2f}" for kb in SWEEP_TILE_KB)
        lines.append(f"| {record['type']} | {cells} | {record['other_cpu_share']:.0%} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark refengine dequantization kernels against memory bandwidth and gguf.quants.",
    )
    add = parser.add_argument
    add("--types", help="comma-separated ggml types, e.g. Q4_K,Q6_K (default: every type with a kernel)")
    add(
        "--size-mb",
        type=int,
        default=DEFAULT_SIZE_MB,
        help=f"quantized input streamed per type, MB (default {DEFAULT_SIZE_MB}; keep it above the L3)",
    )
    add(
        "--threads",
        type=int,
        default=numba.config.NUMBA_NUM_THREADS,
        help=f"numba threads (default {numba.config.NUMBA_NUM_THREADS}, numba's default)",
    )
    add(
        "--tile-kb",
        type=int,
        default=DEFAULT_TILE_KB,
        help=f"float32 output per dequantize_rows call, KB (default {DEFAULT_TILE_KB})",
    )
    add(
        "--ref-mb",
        type=int,
        default=DEFAULT_REF_MB,
        help=f"sample for the bit-exact check and the gguf.quants timing, MB (default {DEFAULT_REF_MB})",
    )
    add("--repeats", type=int, default=3, help="passes over the tensor; the best one counts (default 3)")
    add(
        "--sweep-tiles",
        action="store_true",
        help=f"also time every tile size in {', '.join(map(str, SWEEP_TILE_KB))} KB",
    )
    add("--json", action="store_true", help="print a JSON list of records instead of markdown")
    args = parser.parse_args(argv)
    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads must be 1..{numba.config.NUMBA_NUM_THREADS}")
    try:
        args.types = parse_type_names(args.types) if args.types else None
    except ValueError as e:
        parser.error(str(e))
    if args.size_mb < 1 or args.ref_mb < 1 or args.tile_kb < 16 or args.repeats < 1:
        parser.error("--size-mb, --ref-mb and --repeats must be >= 1, --tile-kb >= 16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    whole_run = OtherProcesses()
    numba.set_num_threads(args.threads)
    types, skipped = select_types(args.types)
    l3 = l3_bytes()
    if l3 and args.size_mb << 20 <= l3:
        progress(f"warning: --size-mb {args.size_mb} fits in the {l3 >> 20} MiB L3; GB/s may be cache speed")

    progress(f"measuring read bandwidth ({READ_BW_BYTES >> 20} MB, {args.threads} threads)...")
    # Probed before and after the kernels and the better one kept: the ceiling is
    # what the memory can do, and a probe that overlapped other work understates it.
    probes = [read_bandwidth(READ_BW_BYTES, repeats=5)]
    rng = np.random.default_rng(20250101)
    progress(f"generating {args.size_mb} MB of random blocks...")
    buffer = random_bytes(args.size_mb << 20, rng)  # one buffer, re-labelled per type

    results = [bench_type_progress(ggml_type, buffer, args, rng) for ggml_type in types]
    probes.append(read_bandwidth(READ_BW_BYTES, repeats=5))
    read_gbps = max(probes)
    for result in results:
        if result.gbps_in is not None:
            result.read_bw_fraction = result.gbps_in / read_gbps
    results += skipped
    sweep = sweep_tiles(types, buffer, args, rng) if args.sweep_tiles else []
    elapsed = time.perf_counter() - started

    others = whole_run.share()
    header = machine_header(args.threads, probes, others)
    if args.json:
        context = {
            "machine": header,
            "read_bw_gbps": read_gbps,
            "threads": args.threads,
            "run_other_cpu_share": others,
        }
        records = [{**asdict(r), **context} for r in results]
        for s in sweep:
            by_tile = {key: value for key, value in s.items() if key != "type"}
            records.append({"type": s["type"], "tile_sweep_gbps_in": by_tile, **context})
        print(json.dumps(records, indent=1))
    else:
        print(header)
        if others > OTHERS_WARNING:
            print(
                f"WARNING: other processes used {others:.0%} of the CPUs while this ran; parallel kernels "
                "stall at every call when a worker loses its CPU, so these figures understate the kernels."
            )
        print(
            f"Input: {args.size_mb} MB of quantized rows of {N_COLS} per type, dequantized "
            f"{args.tile_kb} KB of float32 at a time into one reused buffer; best of up to "
            f"{args.repeats} passes within {TIME_BUDGET_S:.0f} s; compile time excluded (each kernel is "
            f"warmed up first). x gguf.quants: per element, gguf.quants timed on {args.ref_mb} MB, ours "
            f"on the streaming run. Bit-exact checked on the same {args.ref_mb} MB.\n"
        )
        print(markdown_table(results))
        print("\nTargets:")
        print("\n".join(target_checks(results)))
        if notes(results):
            print("\nNotes:")
            print("\n".join(notes(results)))
        if sweep:
            print("\nTile sweep, GB/s of quantized input by float32 output per call:\n")
            print(sweep_table(sweep))
        print(f"\nTotal run time {elapsed:.1f} s.")
    return 1 if any(r.bit_exact is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
