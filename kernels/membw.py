"""A memory read-bandwidth probe: the ceiling a streaming dequantizer is judged against.

Dequantizing a tensor that does not fit in cache can go no faster than DRAM can
deliver its bytes, so benchmarks report kernels as a fraction of this figure.
The probe is the simplest loop that is bound by reads alone: a parallel sum over
a large uint64 array. Integer addition is exact and associative, so LLVM
vectorises it without fastmath, and the one-word result keeps the loads alive.
"""

import time

import numpy as np

from ._jit import kernel, prange


@kernel(parallel=True)
def sum_words(words):  # (n,) uint64 -> uint64, wrapping on overflow
    """The probe: every word read once. refengine.benchkernels calls it on the same bytes a kernel
    streams, in chunks of one call's input, to measure the ceiling the way the kernel is measured."""
    total = np.uint64(0)
    for i in prange(words.shape[0]):
        total += words[i]
    return total


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth in GB/s (1e9 bytes/s) over an `n_bytes` array.

    Uses numba's current thread count (numba.set_num_threads). `n_bytes` should
    be well above the last-level cache, or this measures the cache instead.
    """
    n_words = max(n_bytes // 8, 1)
    # Written, not just allocated: untouched pages all map to the kernel's one
    # zero page, which would be read from cache at an impossible speed.
    words = np.ones(n_words, dtype=np.uint64)
    sum_words(words[:1024])  # compile (or load from cache) outside the timing
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        total = sum_words(words)
        best = min(best, time.perf_counter() - start)
    if total != n_words:  # cheap guard that the loop really read every word
        raise RuntimeError(f"read probe summed {total}, expected {n_words}")
    return n_words * 8 / best / 1e9
