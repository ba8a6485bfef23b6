"""ggml's own quantizers, called through ctypes: the oracle for kernels/quantize.py.

llama-cpp-python ships ggml's shared libraries in llama_cpp/lib/; libggml-base.so
exports the reference row quantizers (quantize_row_q4_K_ref, ...) and
ggml_quantize_chunk, the entry point llama_model_quantize calls for every tensor.
Both are plain C over float32 arrays, so they take our input unchanged.

Used by tests/test_quantize.py, scripts/make_golden_quant.py and
scripts/bench_quantize.py (which put this folder on sys.path). Callers skip or
fail with a reason when llama_cpp is not installed: `load()` raises ImportError.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType

# The types our kernels produce, with the name of ggml's reference function for each.
REF_FUNCTIONS = {
    T.Q4_0: "quantize_row_q4_0_ref",
    T.Q4_1: "quantize_row_q4_1_ref",
    T.Q5_0: "quantize_row_q5_0_ref",
    T.Q5_1: "quantize_row_q5_1_ref",
    T.Q8_0: "quantize_row_q8_0_ref",
    T.Q2_K: "quantize_row_q2_K_ref",
    T.Q3_K: "quantize_row_q3_K_ref",
    T.Q4_K: "quantize_row_q4_K_ref",
    T.Q5_K: "quantize_row_q5_K_ref",
    T.Q6_K: "quantize_row_q6_K_ref",
}

_FLOAT_P = ctypes.POINTER(ctypes.c_float)


def library_dir() -> Path:
    """llama_cpp/lib, without importing llama_cpp (which loads every backend)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ImportError("llama_cpp (llama-cpp-python) is not installed; pip install -e '.[oracle]'")
    return Path(spec.origin).parent / "lib"


@cache
def load() -> ctypes.CDLL:
    path = library_dir() / "libggml-base.so"
    if not path.exists():
        raise ImportError(f"{path} not found: this llama-cpp-python does not ship ggml as a shared library")
    lib = ctypes.CDLL(str(path))
    for name in REF_FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = [_FLOAT_P, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        _FLOAT_P,  # src
        ctypes.c_void_p,  # dst
        ctypes.c_int64,  # start (elements)
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        _FLOAT_P,  # imatrix (NULL here)
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_fp32_to_fp16.argtypes = [ctypes.c_float]
    lib.ggml_fp32_to_fp16.restype = ctypes.c_uint16
    return lib


def _rows(ggml_type: T, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n_rows, n_cols = x.shape
    assert n_cols % block_size == 0, (ggml_type.name, n_cols)
    return x, np.zeros((n_rows, n_cols // block_size * type_size), dtype=np.uint8)


def quantize_ref(ggml_type: T, x: np.ndarray) -> np.ndarray:
    """quantize_row_<type>_ref over all of x (n_rows, n_cols): raw rows (n_rows, row_bytes) uint8."""
    x, out = _rows(ggml_type, x)
    fn = getattr(load(), REF_FUNCTIONS[ggml_type])
    fn(x.ctypes.data_as(_FLOAT_P), out.ctypes.data, x.size)
    return out


def quantize_chunk(ggml_type: T, x: np.ndarray) -> np.ndarray:
    """ggml_quantize_chunk without an importance matrix, as llama_model_quantize calls it."""
    x, out = _rows(ggml_type, x)
    n_rows, n_cols = x.shape
    written = load().ggml_quantize_chunk(
        int(ggml_type), x.ctypes.data_as(_FLOAT_P), out.ctypes.data, 0, n_rows, n_cols, None
    )
    assert written == out.nbytes, (ggml_type.name, written, out.nbytes)
    return out


def fp32_to_fp16(values: np.ndarray) -> np.ndarray:
    """ggml_fp32_to_fp16 (GGML_FP32_TO_FP16) on each value: the f16 bits as uint16."""
    fn = load().ggml_fp32_to_fp16
    return np.array([fn(float(v)) for v in np.asarray(values, dtype=np.float32).ravel()], dtype=np.uint16)


# -- inputs the tests and the golden files share ---------------------------------------------------


def corner_rows(n: int = 256) -> dict[str, np.ndarray]:
    """Hand-made rows of n values (one k-quant super-block, eight legacy blocks) that reach the
    quantizers' special cases: all-zero and constant groups, one value dominating, values near
    and below f16's subnormal range, one sign only, exact ties on the quant grid, inf and NaN."""
    rng = np.random.RandomState(1234)
    half_grid = rng.randint(-16, 16, n) / 2.0
    rows = {
        "zeros": np.zeros(n),
        "negative_zeros": -np.zeros(n),
        "constant": np.full(n, 0.37),
        "negative_constant": np.full(n, -2.5),
        "one_huge": np.r_[rng.standard_normal(n - 1) * 0.01, 1e4],
        "one_nonzero": np.r_[np.zeros(n - 1), 0.5],
        "f16_subnormal": rng.standard_normal(n) * 1e-7,
        "below_f16": rng.standard_normal(n) * 1e-12,
        "tiny": rng.standard_normal(n) * 1e-30,
        "negative_only": -np.abs(rng.standard_normal(n)) - 0.1,
        "positive_only": np.abs(rng.standard_normal(n)) + 1.0,
        "integers": rng.randint(-8, 8, n).astype(float),
        "halves": half_grid,
        "above_f16_max": rng.standard_normal(n) * 1e5,
        "huge": rng.standard_normal(n) * 1e30,
        "sparse": np.where(rng.random_sample(n) < 0.9, 0.0, rng.standard_normal(n)),
        "zero_sub_blocks": np.r_[np.zeros(32), rng.standard_normal(n - 64), np.zeros(32)],
        "alternating": np.tile([1.0, -1.0], n // 2),
        "ramp": np.linspace(-1.0, 1.0, n),
        "with_inf": np.r_[rng.standard_normal(n - 1), np.inf],
        "with_nan": np.r_[rng.standard_normal(n - 1), np.nan],
    }
    return {name: row.astype(np.float32) for name, row in rows.items()}


def random_rows(rng: np.random.RandomState, n_rows: int, n_cols: int) -> dict[str, np.ndarray]:
    """(n_rows, n_cols) float32 from several distributions: normal, uniform, heavy-tailed
    (Student t, 3 degrees of freedom), and normal with 1% outliers 50x larger."""
    normal = rng.standard_normal((n_rows, n_cols))
    rows = {
        "normal": normal * 0.02,
        "uniform": rng.uniform(-1.0, 1.0, (n_rows, n_cols)),
        "heavy_tailed": rng.standard_t(3, (n_rows, n_cols)),
        "outliers": np.where(rng.random_sample((n_rows, n_cols)) < 0.01, 50.0, 1.0) * normal,
    }
    return {name: x.astype(np.float32) for name, x in rows.items()}


# -- ggml-cpu's activation quantizers and integer dot products ---------------------------------------
# What llama.cpp's CPU backend runs for a matrix-vector product (refengine.libggml binds them):
# x quantized by the from_float of the weight type's vec_dot_type (the arch-specific
# quantize_row_q8_0 / _q8_1 / _q8_K, not the _ref ones), then ggml_vec_dot_<type>_<vec_dot_type>
# per row. The oracle of kernels/activations.py and kernels/gemv_ggml.py.

from refengine.libggml import (  # noqa: E402, F401  (re-exported for the tests)
    ACTIVATION_BLOCKS,
    VEC_DOT_TYPES,
    LibggmlMissing,
    MulMat,
    cpu_features,
    quantize_activations,
    vec_dot_rows,
)
