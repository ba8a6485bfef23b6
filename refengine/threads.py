"""Who owns the cores: one thread policy for the whole process.

Two libraries keep pools of threads: BLAS (numpy's OpenBLAS, for the matrix products of a batch) and
numba (its OpenMP pool, for the kernels). Each pool's idle threads spin-wait for their next job, so
when both are busy in turn their threads fight for the same cores and stall each other for whole
scheduler ticks. Measured on the 2-core development VM: 6 prompt tokens of gemma3-270m took 3.5 s
instead of 0.12 s with numba's tile decoding parallel between BLAS calls, and a decode step at depth
2,500 took 301 ms instead of 55 ms with OpenBLAS's threads waking for the attention's matmul.

So exactly one pool is parallel at any time:

    a batch (prefill, n_tok > 1)    BLAS on every core; numba's kernels (tile decoding) on one thread,
                                    except a batch's integer kernels (numerics "ggml", no BLAS call),
                                    which take every core inside `integer_kernels`
    one token (decoding)            numba's kernels (matvec, attention) on every core; BLAS on one
                                    thread (no BLAS call is left in a float32 decode step; the float64
                                    path's products then run on the calling thread)

NUMA pools (refengine.numa) run each task's kernels on their own thread (kernel_threads(1)) and no
BLAS of their own. BLAS's thread count is set through threadpoolctl, which finds the BLAS that numpy
actually loaded (OpenBLAS, MKL or BLIS) and calls its own setter: a few microseconds per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache

from refengine.kernels import kernel_threads


@cache
def _blas() -> tuple[list, int]:
    """The BLAS libraries numpy loaded (threadpoolctl controllers) and their thread count at start."""
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl then finds)
    from threadpoolctl import ThreadpoolController

    libraries = ThreadpoolController().select(user_api="blas").lib_controllers
    return libraries, max((lib.num_threads for lib in libraries), default=1)


def blas_threads() -> int:
    """How many threads BLAS uses now (the largest, if numpy loaded more than one BLAS)."""
    libraries, _ = _blas()
    return max((lib.get_num_threads() for lib in libraries), default=1)


def set_blas_threads(n: int) -> None:
    for lib in _blas()[0]:
        lib.set_num_threads(n)


def cores() -> int:
    """The threads a pool may use: numba's NUMBA_NUM_THREADS (the CPUs this process may run on)."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


# True on a thread inside a batch's step, where numba was left one thread because BLAS holds the cores.
_BLAS_HOLDS_CORES: ContextVar[bool] = ContextVar("blas_holds_cores", default=False)


@contextmanager
def step_threads(n_tok: int) -> Iterator[None]:
    """The policy for one forward step of n_tok tokens (see the module docstring); BLAS's setting is
    restored afterwards, for whatever else the process multiplies."""
    batch = n_tok > 1
    before = blas_threads()
    set_blas_threads(min(_blas()[1], cores()) if batch else 1)
    token = _BLAS_HOLDS_CORES.set(batch)
    try:
        with kernel_threads(1 if batch else cores()):
            yield
    finally:
        _BLAS_HOLDS_CORES.reset(token)
        set_blas_threads(before)


@contextmanager
def integer_kernels() -> Iterator[None]:
    """Numba's kernels on every core inside the block when a batch's step gave the cores to BLAS: numerics "ggml"
    (nn.Linear's integer matmuls, its attention, ops_ggml's batch ops) calls no BLAS, so BLAS's idle threads
    have nothing to spin against. Elsewhere the count stays: a NUMA pool's worker keeps its one thread."""
    if not _BLAS_HOLDS_CORES.get():
        yield
        return
    with kernel_threads(cores()):
        yield
