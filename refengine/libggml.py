"""ggml's own CPU kernels, called through ctypes on the libggml that llama-cpp-python installs.

The comparison point for refengine's kernels (`refengine bench kernels --vs-ggml`) and the
oracle of the tests (tests/ggml_oracle.py): llama-cpp-python ships ggml as shared libraries
in llama_cpp/lib/, libggml-base.so (types, graphs, reference quantizers, dequantize_row_*)
and libggml-cpu.so (the CPU backend: activation quantizers, ggml_vec_dot_*, graph compute),
built for this machine's CPU. Nothing here imports llama_cpp itself, which would load every
backend. Every entry point raises LibggmlMissing (one line for the CLI) when the libraries
are not there.

What each wrapper calls is what llama.cpp's CPU backend runs:
  * quantize_activations: the from_float of a weight type's vec_dot_type (ggml-cpu.c's
    type_traits_cpu), e.g. quantize_row_q8_K, the arch-specific code, not the _ref one.
  * vec_dot_rows: ggml_vec_dot_<type>_<vec_dot_type> on each row, after that quantization.
  * MulMat: ggml_mul_mat of a weight by one float32 vector, as a one-node graph run by
    ggml_graph_compute on a persistent ggml thread pool; the weight and the vector stay in
    our numpy arrays (the tensors point at them).
  * dequantize_row: dequantize_row_<type> (ggml-quants.c), ggml's to_float.
  * quantize_chunk: ggml_quantize_chunk without an importance matrix, what llama-quantize writes.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from refengine.errors import RefengineError


class LibggmlMissing(RefengineError):
    """libggml (from llama-cpp-python) is not installed, or lacks an entry point."""


# ggml-cpu.c's type_traits_cpu: the type each weight type's activations are quantized to.
VEC_DOT_TYPES = {
    T.Q8_0: T.Q8_0,
    T.Q4_0: T.Q8_0,
    T.Q5_0: T.Q8_0,
    T.Q4_1: T.Q8_1,
    T.Q5_1: T.Q8_1,
    T.Q2_K: T.Q8_K,
    T.Q3_K: T.Q8_K,
    T.Q4_K: T.Q8_K,
    T.Q5_K: T.Q8_K,
    T.Q6_K: T.Q8_K,
}
# (values, bytes) of an activation block, from ggml-common.h. gguf's table still gives Q8_1 the
# 40 bytes of its old float d and s, where block_q8_1 now holds two halves.
ACTIVATION_BLOCKS = {T.Q8_0: (32, 34), T.Q8_1: (32, 36), T.Q8_K: (256, 292)}
ACTIVATION_QUANTIZERS = {T.Q8_0: "quantize_row_q8_0", T.Q8_1: "quantize_row_q8_1", T.Q8_K: "quantize_row_q8_K"}

_FLOAT_P = ctypes.POINTER(ctypes.c_float)
_VOID_P = ctypes.c_void_p


def _c_name(ggml_type: T) -> str:
    """ggml's spelling of a type in function names: q4_K, q8_0, iq2_xs."""
    return ggml_type.name.lower().replace("_k", "_K")


def vec_dot_function(ggml_type: T) -> str:
    return f"ggml_vec_dot_{_c_name(ggml_type)}_{_c_name(VEC_DOT_TYPES[ggml_type])}"


def library_dir() -> Path:
    """llama_cpp/lib, found without importing llama_cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise LibggmlMissing("ggml's kernels come with llama-cpp-python, not installed: pip install -e '.[oracle]'")
    return Path(spec.origin).parent / "lib"


def _open(name: str) -> ctypes.CDLL:
    path = library_dir() / name
    if not path.exists():
        raise LibggmlMissing(f"{path} not found: this llama-cpp-python does not ship ggml as shared libraries")
    return ctypes.CDLL(str(path))  # CDLL releases the GIL during calls, so Python threads can run ggml in parallel


def _declare(lib: ctypes.CDLL, name: str, restype, *argtypes):
    try:
        fn = getattr(lib, name)
    except AttributeError:
        raise LibggmlMissing(f"{lib._name} has no {name}: not the ggml of llama-cpp-python 0.3.36") from None
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


class _InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", _VOID_P), ("no_alloc", ctypes.c_bool)]


class _TensorHead(ctypes.Structure):
    """struct ggml_tensor (ggml.h) up to its `data` pointer, which MulMat points at numpy memory.
    Checked against ggml_get_data on every tensor, so a layout change fails loudly."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", _VOID_P),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", _VOID_P * 10),
        ("view_src", _VOID_P),
        ("view_offs", ctypes.c_size_t),
        ("data", _VOID_P),
    ]


class _ThreadpoolParams(ctypes.Structure):  # struct ggml_threadpool_params
    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class _Cplan(ctypes.Structure):  # struct ggml_cplan (ggml-cpu.h)
    _fields_ = [
        ("work_size", ctypes.c_size_t),
        ("work_data", _VOID_P),
        ("n_threads", ctypes.c_int),
        ("threadpool", _VOID_P),
        ("abort_callback", _VOID_P),
        ("abort_callback_data", _VOID_P),
        ("use_ref", ctypes.c_bool),
    ]


@cache
def base() -> ctypes.CDLL:
    """libggml-base.so with the entry points used here declared."""
    lib = _open("libggml-base.so")
    _declare(lib, "ggml_init", _VOID_P, _InitParams)
    _declare(lib, "ggml_free", None, _VOID_P)
    _declare(lib, "ggml_tensor_overhead", ctypes.c_size_t)
    _declare(lib, "ggml_graph_overhead_custom", ctypes.c_size_t, ctypes.c_size_t, ctypes.c_bool)
    _declare(lib, "ggml_new_tensor_1d", _VOID_P, _VOID_P, ctypes.c_int, ctypes.c_int64)
    _declare(lib, "ggml_new_tensor_2d", _VOID_P, _VOID_P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _declare(lib, "ggml_get_data", _VOID_P, _VOID_P)
    _declare(lib, "ggml_mul_mat", _VOID_P, _VOID_P, _VOID_P, _VOID_P)
    _declare(lib, "ggml_new_graph_custom", _VOID_P, _VOID_P, ctypes.c_size_t, ctypes.c_bool)
    _declare(lib, "ggml_build_forward_expand", None, _VOID_P, _VOID_P)
    _declare(lib, "ggml_threadpool_params_init", None, ctypes.POINTER(_ThreadpoolParams), ctypes.c_int)
    _declare(lib, "ggml_quantize_chunk", ctypes.c_size_t, ctypes.c_int, _FLOAT_P, _VOID_P, ctypes.c_int64,
             ctypes.c_int64, ctypes.c_int64, _FLOAT_P)  # fmt: skip
    return lib


@cache
def cpu() -> ctypes.CDLL:
    """libggml-cpu.so, initialised (ggml_cpu_init), with the entry points used here declared."""
    base()  # loaded first, so that the dynamic loader finds it for libggml-cpu
    lib = _open("libggml-cpu.so")
    _declare(lib, "ggml_cpu_init", None)()
    for name in ACTIVATION_QUANTIZERS.values():
        _declare(lib, name, None, _FLOAT_P, _VOID_P, ctypes.c_int64)
    for ggml_type in VEC_DOT_TYPES:
        # (int n, float *s, size_t bs, const void *vx, size_t bx, const void *vy, size_t by, int nrc)
        _declare(lib, vec_dot_function(ggml_type), None, ctypes.c_int, _FLOAT_P, ctypes.c_size_t, _VOID_P,
                 ctypes.c_size_t, _VOID_P, ctypes.c_size_t, ctypes.c_int)  # fmt: skip
    _declare(lib, "ggml_threadpool_new", _VOID_P, ctypes.POINTER(_ThreadpoolParams))
    _declare(lib, "ggml_threadpool_free", None, _VOID_P)
    _declare(lib, "ggml_graph_plan", _Cplan, _VOID_P, ctypes.c_int, _VOID_P)
    _declare(lib, "ggml_graph_compute", ctypes.c_int, _VOID_P, ctypes.POINTER(_Cplan))
    for name in ("ggml_cpu_has_avx2", "ggml_cpu_has_avx512", "ggml_cpu_has_avx512_vnni", "ggml_cpu_has_avx_vnni"):
        _declare(lib, name, ctypes.c_int)
    return lib


def cpu_features() -> list[str]:
    """The x86 features this libggml-cpu was built to use, as ggml reports them."""
    lib = cpu()
    names = ("avx2", "avx512", "avx512_vnni", "avx_vnni")
    return [name for name in names if getattr(lib, f"ggml_cpu_has_{name}")()]


# ---------------------------------------------------------------- activations and vec_dot


def quantize_activations(vec_dot_type: T, x: np.ndarray) -> np.ndarray:
    """ggml-cpu's quantize_row_q8_0 / _q8_1 / _q8_K over the (n,) float32 x: raw blocks (n_blocks, bytes).

    The buffer starts zeroed: quantize_row_q8_K leaves an all-zero block's bsums unwritten."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    block_size, type_size = ACTIVATION_BLOCKS[vec_dot_type]
    out = np.zeros((x.size // block_size, type_size), dtype=np.uint8)
    getattr(cpu(), ACTIVATION_QUANTIZERS[vec_dot_type])(x.ctypes.data_as(_FLOAT_P), out.ctypes.data, x.size)
    return out


def vec_dot_rows(ggml_type: T, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """W @ x as ggml computes it for one token: x quantized once, then vec_dot on every row (one call
    each, so for tests, not speed)."""
    rows = np.ascontiguousarray(rows)
    activations = quantize_activations(VEC_DOT_TYPES[ggml_type], x)
    fn = getattr(cpu(), vec_dot_function(ggml_type))
    out = np.zeros(rows.shape[0], dtype=np.float32)
    result = ctypes.c_float()
    for r in range(rows.shape[0]):
        fn(x.size, ctypes.byref(result), 0, rows[r].ctypes.data, 0, activations.ctypes.data, 0, 1)
        out[r] = result.value
    return out


# ---------------------------------------------------------------- mul_mat through a graph


class MulMat:
    """ggml_mul_mat(W_i, x) for each of a list of weights, one one-node graph each, run on a
    ggml thread pool of `n_threads` that lives as long as this object.

    weights: raw rows (n_out, row_bytes) uint8 of `ggml_type`, all of one shape; x (n_in,) float32;
    the result of call(i) is in `out`. No data is copied: the tensors point at these arrays.
    """

    def __init__(self, ggml_type: T, weights: list[np.ndarray], x: np.ndarray, n_threads: int):
        lib, lib_cpu = base(), cpu()
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_out, row_bytes = weights[0].shape
        n_in = row_bytes // type_size * block_size
        self._keep = [np.ascontiguousarray(w) for w in weights]
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.out = np.zeros(n_out, dtype=np.float32)
        n_tensors = 2 * len(weights) + 1
        graph_bytes = lib.ggml_graph_overhead_custom(8, False)
        size = n_tensors * lib.ggml_tensor_overhead() + len(weights) * graph_bytes + (1 << 16)
        self._ctx = lib.ggml_init(_InitParams(size, None, True))  # no_alloc: every tensor's data is ours
        if not self._ctx:
            raise LibggmlMissing("ggml_init failed")
        x_tensor = lib.ggml_new_tensor_1d(self._ctx, int(T.F32), n_in)
        self._point(x_tensor, self.x)
        self._graphs, self._plans, self._work = [], [], []
        params = _ThreadpoolParams()
        lib.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        self._pool = lib_cpu.ggml_threadpool_new(ctypes.byref(params))
        for w in self._keep:
            w_tensor = lib.ggml_new_tensor_2d(self._ctx, int(ggml_type), n_in, n_out)
            self._point(w_tensor, w)
            y_tensor = lib.ggml_mul_mat(self._ctx, w_tensor, x_tensor)
            self._point(y_tensor, self.out)
            graph = lib.ggml_new_graph_custom(self._ctx, 8, False)
            lib.ggml_build_forward_expand(graph, y_tensor)
            plan = lib_cpu.ggml_graph_plan(graph, n_threads, self._pool)
            work = np.zeros(max(plan.work_size, 1), dtype=np.uint8)
            plan.work_data = work.ctypes.data
            self._graphs.append(graph)
            self._plans.append(plan)
            self._work.append(work)

    @staticmethod
    def _point(tensor, array: np.ndarray) -> None:
        head = _TensorHead.from_address(tensor)
        head.data = array.ctypes.data
        if base().ggml_get_data(tensor) != array.ctypes.data:
            raise LibggmlMissing("struct ggml_tensor has another layout in this libggml: cannot point it at our data")

    def __call__(self, i: int) -> np.ndarray:
        status = cpu().ggml_graph_compute(self._graphs[i], ctypes.byref(self._plans[i]))
        if status != 0:
            raise LibggmlMissing(f"ggml_graph_compute failed with status {status}")
        return self.out

    def close(self) -> None:
        if self._ctx:
            cpu().ggml_threadpool_free(self._pool)
            base().ggml_free(self._ctx)
            self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- dequantize and quantize


def dequantize_row_function(ggml_type: T):
    fn = _declare(base(), f"dequantize_row_{_c_name(ggml_type)}", None, _VOID_P, _FLOAT_P, ctypes.c_int64)
    return fn


def dequantize_rows(ggml_type: T, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """dequantize_row_<type> over raw rows (n_rows, row_bytes) into float32 out (n_rows, n_cols)."""
    fn = dequantize_row_function(ggml_type)
    fn(np.ascontiguousarray(rows).ctypes.data, out.ctypes.data_as(_FLOAT_P), out.size)
    return out


def quantize_chunk(ggml_type: T, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk without an importance matrix over float32 rows x (n_rows, n_cols)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n_rows, n_cols = x.shape
    if out is None:
        out = np.zeros((n_rows, n_cols // block_size * type_size), dtype=np.uint8)
    written = base().ggml_quantize_chunk(int(ggml_type), x.ctypes.data_as(_FLOAT_P), out.ctypes.data, 0, n_rows,
                                         n_cols, None)  # fmt: skip
    if written != out.nbytes:
        raise LibggmlMissing(f"ggml_quantize_chunk wrote {written} bytes for {ggml_type.name}, expected {out.nbytes}")
    return out


# ---------------------------------------------------------------- small graphs of any op


_NUMPY_TYPES = {np.dtype(np.float32): T.F32, np.dtype(np.float16): T.F16, np.dtype(np.int32): T.I32}


class Graph:
    """A few ggml ops over numpy arrays, computed by ggml's CPU backend: the tests' oracle for the ops
    numerics="ggml" matches (rms_norm, rope, soft_max, swiglu, geglu, mul_mat, cpy, ...).

        with Graph(n_threads=2) as g:
            x = g.input(np.ones((4, 64), np.float32))                 # numpy shape, ggml's ne reversed
            y = g.op("rms_norm", x, ctypes.c_float(1e-6))              # ggml_rms_norm(ctx, x, eps)
            out = g.compute(y)                                         # (4, 64) float32, a copy

    Every tensor lives in the graph's own ggml context (allocated by ggml); inputs are copied in.
    `op(name, *args)` calls ggml_<name>(ctx, *args) with tensors as pointers and other arguments
    as ctypes values, so any op of ggml.h can be built without a declaration here."""

    def __init__(self, n_threads: int = 1, mem_bytes: int = 256 << 20):
        self.n_threads = n_threads
        self._ctx = base().ggml_init(_InitParams(mem_bytes, None, False))
        if not self._ctx:
            raise LibggmlMissing("ggml_init failed")

    def input(self, array: np.ndarray, ggml_type: T | None = None) -> int:
        """A tensor holding a copy of `array`: float32, float16 or int32 values (ggml's F32, F16, I32), or
        raw uint8 rows (n_rows, row_bytes) of a quantized `ggml_type`."""
        array = np.ascontiguousarray(array)
        if ggml_type is None:
            ggml_type = _NUMPY_TYPES[array.dtype]
            ne = list(array.shape[::-1])
        else:  # raw rows: the last axis is bytes
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            ne = [array.shape[-1] // type_size * block_size, *array.shape[-2::-1]]
        dims = (ctypes.c_int64 * 4)(*ne, *[1] * (4 - len(ne)))
        lib = base()
        fn = _declare(
            lib, "ggml_new_tensor", _VOID_P, _VOID_P, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)
        )
        tensor = fn(self._ctx, int(ggml_type), max(len(ne), 1), dims)
        ctypes.memmove(lib.ggml_get_data(tensor), array.ctypes.data, array.nbytes)
        return tensor

    def op(self, name: str, *args) -> int:
        fn = getattr(base(), f"ggml_{name}")
        fn.restype = _VOID_P
        return fn(ctypes.c_void_p(self._ctx), *[ctypes.c_void_p(a) if isinstance(a, int) else a for a in args])

    def compute(self, tensor: int) -> np.ndarray:
        """Run the graph that ends in `tensor` and return its values (numpy shape, a contiguous copy)."""
        lib, lib_cpu = base(), cpu()
        graph = lib.ggml_new_graph_custom(self._ctx, 2048, False)
        lib.ggml_build_forward_expand(graph, tensor)
        plan = lib_cpu.ggml_graph_plan(graph, self.n_threads, None)
        work = np.zeros(max(plan.work_size, 1), dtype=np.uint8)
        plan.work_data = work.ctypes.data
        status = lib_cpu.ggml_graph_compute(graph, ctypes.byref(plan))
        if status != 0:
            raise LibggmlMissing(f"ggml_graph_compute failed with status {status}")
        return self.read(tensor)

    @staticmethod
    def read(tensor: int) -> np.ndarray:
        head = _TensorHead.from_address(tensor)
        dtype = {int(T.F32): np.float32, int(T.F16): np.float16, int(T.I32): np.int32}[head.type]
        ne, nb = list(head.ne), list(head.nb)
        span = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + np.dtype(dtype).itemsize
        raw = np.frombuffer((ctypes.c_char * span).from_address(head.data), dtype=np.uint8)
        view = np.lib.stride_tricks.as_strided(raw.view(dtype), shape=ne[::-1], strides=nb[::-1])
        shape = ne[::-1]
        while len(shape) > 1 and shape[0] == 1:  # numpy's shape: leading ggml dimensions of 1 dropped
            shape = shape[1:]
        return np.array(view).reshape(shape)

    def close(self) -> None:
        if self._ctx:
            base().ggml_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
