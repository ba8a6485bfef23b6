"""`refengine bench kernels`: how fast the kernels stream, beside the memory's read bandwidth and ggml's own.

Three operations, each on data larger than the last-level cache, so that every byte comes from DRAM:

  matvec    y = W @ x over a sequence of distinct weights of one shape, one call each, as decoding
            calls them layer by layer; numerics "exact" (gemv.py) and "ggml" (gemv_ggml.py).
            GB/s of weight bytes.
  dequant   dequantize_rows over quantized rows, 1 MB of float32 output at a time into one reused
            tile, as a prefill matmul consumes them. GB/s of quantized bytes.
  quantize  quantize_rows over float32 rows, a tile at a time. GB/s of float32 bytes.

For each type, in the same passes (so that a busy machine slows all of them alike):
  * the read bandwidth: a sum of the same bytes as uint64 words (kernels/membw.py), in chunks of
    the same size as one call's input, so the ceiling is measured the way the kernel is;
  * refengine's kernel;
  * with vs_ggml, ggml's own operation through ctypes (refengine.libggml): ggml_mul_mat as a
    one-node graph on a ggml thread pool, dequantize_row_<type> and ggml_quantize_chunk split
    over as many Python threads (ctypes releases the GIL).

Timing. A parallel call waits for its slowest thread, and on a shared machine a thread that
loses its CPU costs the whole call a scheduler tick (milliseconds). So every figure is the sum,
over the calls of a pass, of each call's best time over the passes (`best_per_call`): noise
only ever slows a call down, and a call's best is its time on a quiet machine. Passes alternate
between the probe and the kernels until a time budget is spent. The share of the CPUs other
processes took is reported with the run.

The per-call overhead is the time of a call on one block (the work itself nil): numba's dispatch
and the wake-up of its worker threads for ours, graph compute on the thread pool for ggml's.
"""

from __future__ import annotations

import functools
import os
import platform
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from refengine.errors import RefengineError
from refengine.kernels import (
    DEQUANTIZERS,
    GGML_MATVEC_KERNELS,
    NUMERICS,
    QUANT_TYPES,
    QUANTIZERS,
    bound_matvec,
    dequantize_rows,
    matvec,
    quantize_rows,
)
from refengine.kernels.gemv import MATVEC_KERNELS
from refengine.kernels.membw import sum_words

OPS = ("matvec", "dequant", "quantize")
TILE_BYTES = 1 << 20  # dequant and quantize: float32 per call, 1 MB (see scripts/bench_dequant.py)
N_COLS = 4096  # dequant and quantize rows: a hidden size, a multiple of every block size
DEFAULT_BUDGET_S = 2.0  # per type: passes alternate until this much time has gone (at least MIN_PASSES)
MIN_PASSES = 3
OVERHEAD_CALLS = 5000
OTHERS_WARNING = 0.05  # share of the CPUs other processes may take before the figures are flagged

# Where each block keeps the fields that scale its values, and how they are encoded (the types' records,
# refengine.kernels.QUANT_TYPES). Random bytes there would give NaN, inf and subnormal scales, which take
# slow paths on one side or the other; random bytes everywhere else are valid quants.
F16, BF16, F32, E8M0, UE4M3, IQ1M_F16 = "f16", "bf16", "f32", "e8m0", "ue4m3", "iq1m_f16"
SCALE_FIELDS: dict[T, list[tuple[int, str]]] = {
    t: [(f.start, f.kind) for f in q.scale_fields()] for t, q in QUANT_TYPES.items() if q.scale_fields()
}
# Sane values are drawn into a pool and repeated over the data: drawing one per block would need
# gigabytes of temporaries for F16, and caches hold addresses, not contents.
POOL_SIZE = 65521


class BenchError(RefengineError):
    """A benchmark request that cannot run (unknown type, no kernel, bad size)."""


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def last_level_cache_bytes() -> int | None:
    """Size of the largest cache of CPU 0, from sysfs (what the OS, or the hypervisor, reports)."""
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=None)


def default_size_mb() -> int:
    """Data streamed per type: 512 MB, or 16 times the last-level cache if that is larger."""
    llc = last_level_cache_bytes() or 0
    return max(512, 16 * llc >> 20)


class OtherProcesses:
    """Share of the machine's CPU time that other processes took since construction.

    Busy time of the whole machine comes from /proc/stat, ours from getrusage (all our threads)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
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


# ---------------------------------------------------------------- data


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


def random_rows(ggml_type: T, n_bytes: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """Read-only rows (n_rows, row_bytes) of `ggml_type`, about n_bytes in all: random quants, sane scales.

    A pool of 2^18 random blocks is repeated over the rows (caches hold addresses, not contents,
    and the kernels' speed does not depend on the values)."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    row_bytes = n_cols // block_size * type_size
    n_rows = max(1, n_bytes // row_bytes)
    n_blocks = n_rows * row_bytes // type_size
    pool = random_bytes(min(n_blocks, 1 << 18) * type_size, rng).reshape(-1, type_size)
    write_sane_scales(pool, ggml_type, rng)
    rows = np.resize(pool, (n_blocks, type_size)).reshape(n_rows, row_bytes)
    rows.flags.writeable = False  # like a file mapping
    return rows


def word_chunks(data: np.ndarray, pieces: list[np.ndarray]) -> list[np.ndarray]:
    """For each piece (a view into data's buffer), its bytes as a uint64 array: what the probe reads.

    Each chunk starts on the piece's first 8-byte boundary and covers its whole words."""
    flat = data.reshape(-1).view(np.uint8)
    base = flat.ctypes.data
    chunks = []
    for piece in pieces:
        start = piece.ctypes.data - base
        first = -(-start // 8) * 8
        stop = start + piece.nbytes
        chunks.append(flat[first : first + (stop - first) // 8 * 8].view(np.uint64))
    return chunks


# ---------------------------------------------------------------- timing


def best_per_call(streams: dict[str, list[Callable[[], object]]], budget_s: float) -> dict[str, dict]:
    """Run every stream's calls, pass after pass, the streams alternating, until budget_s has gone
    (and at least MIN_PASSES passes). Per stream: `calls_s`, the sum over its calls of each one's best
    time; `pass_s`, its best whole pass; `passes`."""
    for calls in streams.values():
        calls[0]()  # compile, or load from numba's cache; wake the threads
    best = {name: np.full(len(calls), np.inf) for name, calls in streams.items()}
    best_pass = dict.fromkeys(streams, np.inf)
    start, passes = time.perf_counter(), 0
    while passes < MIN_PASSES or time.perf_counter() - start < budget_s:
        for name, calls in streams.items():
            pass_start = time.perf_counter()
            times = best[name]
            for i, call in enumerate(calls):
                t0 = time.perf_counter()
                call()
                times[i] = min(times[i], time.perf_counter() - t0)
            best_pass[name] = min(best_pass[name], time.perf_counter() - pass_start)
        passes += 1
    return {name: {"calls_s": float(best[name].sum()), "pass_s": best_pass[name], "passes": passes} for name in streams}


def median_call_s(call: Callable[[], object], n: int) -> float:
    call()
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return float(np.median(times))


# ---------------------------------------------------------------- records


@dataclass
class KernelResult:
    """One row of the table (and one record of --json)."""

    op: str
    type: str
    numerics: str  # matvec: exact or ggml; "" for dequant and quantize
    shape: str  # matvec: n_out x n_in of each weight; else rows x columns per call
    mb: float  # MB streamed per pass (quantized bytes; quantize: float32 input)
    gbps: float  # MB / the sum of per-call bests
    read_bw_gbps: float  # the probe over the same bytes in the same passes
    read_bw_fraction: float
    gbps_whole_pass: float
    us_per_call: float  # per call, from the sum of bests
    ggml_gbps: float | None = None
    vs_ggml: float | None = None  # gbps / ggml_gbps
    matches_ggml: bool | None = None  # dequant, quantize: output identical to ggml's on the first call
    passes: int = 0


@dataclass
class KernelBench:
    """A run: the machine, the fixed costs of a call, and the results."""

    op: str
    threads: int
    cpu: str
    simd_level: str
    ggml_features: list[str] | None
    results: list[KernelResult] = field(default_factory=list)
    overhead_us: dict[str, float] = field(default_factory=dict)
    other_cpu_share: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- the three operations


def matvec_shape(ggml_type: T) -> tuple[int, int]:
    """gemma3-270m's layer shapes: 2048 x 640 for the 32-value block types, 640 x 2048 for the others."""
    return (2048, 640) if GGML_QUANT_SIZES[ggml_type][0] <= 32 else (640, 2048)


def bench_matvec(
    ggml_type: T,
    numerics: list[str],
    size_mb: int,
    vs_ggml: bool,
    threads: int,
    budget_s: float,
    shape: tuple[int, int] | None,
    rng: np.random.Generator,
) -> list[KernelResult]:
    """One matvec per weight over size_mb of distinct weights of `shape`, for each numerics."""
    n_out, n_in = shape or matvec_shape(ggml_type)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if n_in % block_size:
        raise BenchError(f"{ggml_type.name}: {n_in} columns are not whole blocks of {block_size}")
    matrix_bytes = n_out * n_in // block_size * type_size
    n_mats = max(1, (size_mb << 20) // matrix_bytes)
    rows = random_rows(ggml_type, n_mats * matrix_bytes, n_in, rng)
    matrices = rows[: n_mats * n_out].reshape(n_mats, n_out, -1)
    x = rng.standard_normal(n_in, dtype=np.float32)
    out = np.empty(n_out, dtype=np.float32)
    probe = word_chunks(rows, list(matrices))
    streams: dict[str, list] = {"read": [lambda c=c: sum_words(c) for c in probe]}
    for name in numerics:
        kernels = [bound_matvec(ggml_type, w, numerics=name) for w in matrices]
        streams[name] = [lambda k=k: k(x, out) for k in kernels]
    mul_mat = None
    if vs_ggml:
        from refengine.libggml import MulMat

        mul_mat = MulMat(ggml_type, list(matrices), x, threads)
        streams["libggml"] = [lambda i=i: mul_mat(i) for i in range(n_mats)]
    try:
        timed = best_per_call(streams, budget_s)
    finally:
        if mul_mat is not None:
            mul_mat.close()
    return [
        _result("matvec", ggml_type, name, f"{n_out} x {n_in}", matrices.nbytes, n_mats, timed, name)
        for name in numerics
    ]


def thread_bounds(n_rows: int, threads: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges splitting n_rows over `threads` Python threads (ggml's single-threaded
    entry points run in parallel from them: ctypes releases the GIL), none empty."""
    edges = np.linspace(0, n_rows, min(threads, n_rows) + 1).astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))


def bench_dequant(
    ggml_type: T,
    size_mb: int,
    vs_ggml: bool,
    threads: int,
    budget_s: float,
    rng: np.random.Generator,
    tile_bytes: int = TILE_BYTES,
) -> KernelResult:
    """dequantize_rows over size_mb of rows, tile_bytes of float32 output a call."""
    rows = random_rows(ggml_type, size_mb << 20, N_COLS, rng)
    tile_rows = max(1, tile_bytes // (N_COLS * 4))
    tiles = [rows[i : i + tile_rows] for i in range(0, rows.shape[0] - tile_rows + 1, tile_rows)]
    out = np.empty((tile_rows, N_COLS), dtype=np.float32)
    ours = functools.partial(dequantize_rows, ggml_type)
    timed, matches = time_tiles(ggml_type, tiles, rows, out, ours, "dequantize_rows", vs_ggml, threads, budget_s)
    n_bytes = sum(t.nbytes for t in tiles)
    result = _result("dequant", ggml_type, "", f"{tile_rows} x {N_COLS}", n_bytes, len(tiles), timed, "ours")
    result.matches_ggml = matches
    return result


def bench_quantize(
    ggml_type: T, size_mb: int, vs_ggml: bool, threads: int, budget_s: float, rng: np.random.Generator
) -> KernelResult:
    """quantize_rows over size_mb of float32 rows, TILE_BYTES of them a call."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    tile_rows = max(1, TILE_BYTES // (N_COLS * 4))
    n_tiles = max(1, (size_mb << 20) // TILE_BYTES)
    x = rng.standard_normal((n_tiles * tile_rows, N_COLS), dtype=np.float32)
    tiles = [x[i * tile_rows : (i + 1) * tile_rows] for i in range(n_tiles)]
    out = np.empty((tile_rows, N_COLS // block_size * type_size), dtype=np.uint8)
    ours = functools.partial(quantize_rows, ggml_type)
    timed, matches = time_tiles(ggml_type, tiles, x, out, ours, "quantize_chunk", vs_ggml, threads, budget_s)
    result = _result("quantize", ggml_type, "", f"{tile_rows} x {N_COLS}", x.nbytes, n_tiles, timed, "ours")
    result.matches_ggml = matches
    return result


def time_tiles(
    ggml_type: T,
    tiles: list,
    source: np.ndarray,
    out: np.ndarray,
    ours,
    ggml_function: str,
    vs_ggml: bool,
    threads: int,
    budget_s: float,
) -> tuple[dict, bool | None]:
    """Time ours(tile, out) over the tiles beside a read of the same bytes of `source` and, with vs_ggml,
    libggml's `ggml_function`(ggml_type, rows, out) cut over `threads` threads. Returns the timings and
    whether both wrote the same bits for the first tile (None without vs_ggml)."""
    streams = {
        "read": [lambda c=c: sum_words(c) for c in word_chunks(source, tiles)],
        "ours": [lambda t=t: ours(t, out) for t in tiles],
    }
    matches = None
    pool = None
    if vs_ggml:
        from refengine import libggml

        theirs = getattr(libggml, ggml_function)
        ggml_out = np.empty_like(out)
        pool = ThreadPoolExecutor(threads)
        bounds = thread_bounds(len(out), threads)

        def ggml_tile(tile):
            jobs = [(tile[start:stop], ggml_out[start:stop]) for start, stop in bounds]
            list(pool.map(lambda job: theirs(ggml_type, *job), jobs))

        streams["libggml"] = [lambda t=t: ggml_tile(t) for t in tiles]
        ggml_tile(tiles[0])
        ours(tiles[0], out)
        matches = bool(np.array_equal(out.view(np.uint8), ggml_out.view(np.uint8)))
    try:
        timed = best_per_call(streams, budget_s)
    finally:
        if pool is not None:
            pool.shutdown()
    return timed, matches


def _result(op, ggml_type, numerics, shape, n_bytes, n_calls, timed, stream) -> KernelResult:
    gbps = n_bytes / timed[stream]["calls_s"] / 1e9
    read_gbps = n_bytes / timed["read"]["calls_s"] / 1e9
    result = KernelResult(
        op=op,
        type=ggml_type.name,
        numerics=numerics,
        shape=shape,
        mb=n_bytes / 1e6,
        gbps=gbps,
        read_bw_gbps=read_gbps,
        read_bw_fraction=gbps / read_gbps,
        gbps_whole_pass=n_bytes / timed[stream]["pass_s"] / 1e9,
        us_per_call=timed[stream]["calls_s"] / n_calls * 1e6,
        passes=timed[stream]["passes"],
    )
    if "libggml" in timed:
        result.ggml_gbps = n_bytes / timed["libggml"]["calls_s"] / 1e9
        result.vs_ggml = gbps / result.ggml_gbps
    return result


def call_overhead(numerics: list[str], vs_ggml: bool, threads: int) -> dict[str, float]:
    """Microseconds of a matvec call on one Q8_0 block: matvec() with its checks, the bound kernel
    alone for each numerics, and ggml's graph compute."""
    rows = np.zeros((1, GGML_QUANT_SIZES[T.Q8_0][1]), dtype=np.uint8)
    x, out = np.zeros(32, dtype=np.float32), np.zeros(1, dtype=np.float32)
    costs = {"matvec() exact": median_call_s(lambda: matvec(T.Q8_0, rows, x, out), OVERHEAD_CALLS) * 1e6}
    for name in numerics:
        kernel = bound_matvec(T.Q8_0, rows, numerics=name)
        costs[f"bound kernel {name}"] = median_call_s(lambda k=kernel: k(x, out), OVERHEAD_CALLS) * 1e6
    if vs_ggml:
        from refengine.libggml import MulMat

        with MulMat(T.Q8_0, [rows], x, threads) as mul_mat:
            costs["ggml graph compute"] = median_call_s(lambda: mul_mat(0), OVERHEAD_CALLS) * 1e6
    return costs


# ---------------------------------------------------------------- the command


def kernel_types(op: str, numerics: list[str] | None = None) -> list[T]:
    """The types `op` has kernels for (matvec: in every numerics asked)."""
    if op == "matvec":
        tables = [{"exact": MATVEC_KERNELS, "ggml": GGML_MATVEC_KERNELS}[n] for n in numerics or NUMERICS]
        return [t for t in MATVEC_KERNELS if all(t in table for table in tables)]
    if op == "dequant":
        return [t for t in DEQUANTIZERS if t in SCALE_FIELDS]
    return list(QUANTIZERS)


def parse_types(op: str, names: str | None, numerics: list[str] | None = None) -> list[T]:
    """'Q4_K,q6_k' -> [T.Q4_K, T.Q6_K], each checked to have a kernel for `op`; None: every such type."""
    available = kernel_types(op, numerics)
    if not names:
        return available
    wanted = []
    for name in filter(None, (part.strip().upper() for part in names.split(","))):
        if name not in T.__members__:
            raise BenchError(f"unknown ggml type {name!r}")
        if T[name] not in available:
            raise BenchError(f"no {op} kernel for {name}; {op} has {', '.join(t.name for t in available)}")
        wanted.append(T[name])
    return wanted


def bench_kernels(
    op: str,
    types: list[T],
    numerics: list[str],
    vs_ggml: bool = False,
    threads: int | None = None,
    size_mb: int | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    shape: tuple[int, int] | None = None,
    on_done: Callable[[int, int], None] | None = None,
) -> KernelBench:
    """Benchmark `op` on each of `types`; on_done(i, n) is called after the i-th of n types."""
    if op not in OPS:
        raise BenchError(f"--op must be one of {', '.join(OPS)}, got {op!r}")
    threads = threads or numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise BenchError(f"--threads must be 1..{numba.config.NUMBA_NUM_THREADS}")
    size_mb = size_mb or (default_size_mb() if op != "quantize" else 64)
    ggml_features = None
    if vs_ggml:
        from refengine import libggml

        ggml_features = libggml.cpu_features()  # fails here, in one line, when libggml is missing
    from refengine.kernels.simd import SIMD_LEVEL

    run = KernelBench(op, threads, cpu_model(), SIMD_LEVEL, ggml_features)
    started, others = time.perf_counter(), OtherProcesses()
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        rng = np.random.default_rng(20250101)
        for i, ggml_type in enumerate(types):
            if op == "matvec":
                run.results += bench_matvec(ggml_type, numerics, size_mb, vs_ggml, threads, budget_s, shape, rng)
            elif op == "dequant":
                run.results.append(bench_dequant(ggml_type, size_mb, vs_ggml, threads, budget_s, rng))
            else:
                run.results.append(bench_quantize(ggml_type, size_mb, vs_ggml, threads, budget_s, rng))
            if on_done is not None:
                on_done(i, len(types))
        if op == "matvec":
            run.overhead_us = call_overhead(numerics, vs_ggml, threads)
    finally:
        numba.set_num_threads(before)
    run.other_cpu_share = others.share()
    run.seconds = time.perf_counter() - started
    return run


def markdown(run: KernelBench) -> str:
    """The results as a markdown table, with the machine and the fixed costs in a header and a footer."""
    with_ggml = any(r.ggml_gbps is not None for r in run.results)
    columns = ["op", "type", "numerics", "shape", "MB", "GB/s", "read BW GB/s", "% of read BW", "us/call"]
    columns += ["ggml GB/s", "vs ggml", "same output"] if with_ggml else []
    lines = [
        f"{run.cpu}, {run.threads} threads, refengine SIMD {run.simd_level}"
        + (f", ggml built for {'+'.join(run.ggml_features)}" if run.ggml_features else ""),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * 4 + "---:|" * (len(columns) - 4),
    ]
    for r in run.results:
        cells = [r.op, r.type, r.numerics or "-", r.shape, f"{r.mb:.0f}", f"{r.gbps:.2f}", f"{r.read_bw_gbps:.1f}"]
        cells += [f"{100 * r.read_bw_fraction:.0f}%", f"{r.us_per_call:.1f}"]
        if with_ggml:
            same = {True: "yes", False: "**no**", None: "-"}[r.matches_ggml]
            cells += [f"{r.ggml_gbps:.2f}", f"{r.vs_ggml:.2f}x", same]
        lines.append("| " + " | ".join(cells) + " |")
    if run.overhead_us:
        costs = ", ".join(f"{name} {us:.2f} us" for name, us in run.overhead_us.items())
        lines += ["", f"Per-call overhead (one Q8_0 block): {costs}."]
    lines += ["", f"Other processes used {run.other_cpu_share:.0%} of the CPUs during the run ({run.seconds:.0f} s)."]
    if run.other_cpu_share > OTHERS_WARNING:
        lines.append("WARNING: the machine was busy; compare figures within this run only.")
    return "\n".join(lines)
