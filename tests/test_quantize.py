"""The quantize kernels (kernels/quantize.py) against ggml's own quantizers, byte for byte.

Live: ggml's quantize_row_*_ref and ggml_quantize_chunk (what llama_model_quantize
calls) through ctypes from llama-cpp-python's libggml-base.so, on random rows of
several distributions and on hand-made corner cases; skipped without llama_cpp.
Golden: the same comparison against tests/golden/quantize_<TYPE>.npz, which
scripts/make_golden_quant.py wrote from ggml, so it runs without llama.cpp.
Round trip: our dequantizers (bit-exact with gguf.quants) bring the values back
within a bound per type. The f32 -> f16 rounding is checked against numpy's cast.
"""

from pathlib import Path

import ggml_oracle
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from refengine.kernels import KernelError, dequantize_rows, quantize_rows

GOLDEN_DIR = Path(__file__).parent / "golden"
TYPES = list(ggml_oracle.REF_FUNCTIONS)  # Q4_0 ... Q6_K


@pytest.fixture(scope="module")
def ggml():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the oracle extra) is not installed")
    try:
        return ggml_oracle.load()
    except (ImportError, OSError, AttributeError) as e:
        pytest.skip(f"ggml's quantizers cannot be loaded from llama_cpp/lib: {e}")


def differing_rows(ours: np.ndarray, theirs: np.ndarray, names) -> list:
    return [names[i] for i in np.nonzero((ours != theirs).any(axis=1))[0]]


@pytest.mark.oracle
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_random_rows_match_ggml(ggml, ggml_type):
    rng = np.random.RandomState(ggml_type.value)
    for name, x in ggml_oracle.random_rows(rng, 8, 1024).items():
        ours = quantize_rows(ggml_type, x)
        assert np.array_equal(ours, ggml_oracle.quantize_ref(ggml_type, x)), f"{name}: rows differ from _ref"
        assert np.array_equal(ours, ggml_oracle.quantize_chunk(ggml_type, x)), f"{name}: rows differ from chunk"


@pytest.mark.oracle
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_corner_cases_match_ggml(ggml, ggml_type):
    cases = ggml_oracle.corner_rows(256)
    x = np.stack(list(cases.values()))  # (n_cases, 256): each row exactly one super-block
    with np.errstate(all="ignore"):
        ours = quantize_rows(ggml_type, x)
        theirs = ggml_oracle.quantize_chunk(ggml_type, x)
    assert differing_rows(ours, theirs, list(cases)) == []


@pytest.mark.oracle
def test_row_lengths_match_ggml(ggml):
    """One-block rows and odd numbers of blocks, every type; the row split must not matter."""
    rng = np.random.RandomState(3)
    for ggml_type in TYPES:
        block = 256 if ggml_type.name.endswith("_K") else 32
        for n_blocks in (1, 3, 7):
            x = rng.standard_normal((5, n_blocks * block)).astype(np.float32)
            assert np.array_equal(quantize_rows(ggml_type, x), ggml_oracle.quantize_chunk(ggml_type, x)), (
                ggml_type.name,
                n_blocks,
            )


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_golden(ggml_type):
    golden = np.load(GOLDEN_DIR / f"quantize_{ggml_type.name}.npz")
    x, expected = golden["x"], golden["expected"]
    with np.errstate(all="ignore"):
        ours = quantize_rows(ggml_type, x)
    assert ours.shape == expected.shape
    assert differing_rows(ours, expected, range(len(x))) == []


# RMS error of dequantize(quantize(x)) over RMS(x), on normal rows: the measured value
# (1024 x 256 values) with about 20% headroom. A broken bit layout lands far above these.
ROUND_TRIP_BOUND = {
    T.Q8_0: 0.0065,  # measured 0.0054
    T.Q6_K: 0.021,  # 0.0178
    T.Q5_1: 0.046,  # 0.0380
    T.Q5_0: 0.051,  # 0.0428
    T.Q5_K: 0.043,  # 0.0362
    T.Q4_1: 0.094,  # 0.0783
    T.Q4_0: 0.10,  # 0.0862
    T.Q4_K: 0.086,  # 0.0715
    T.Q3_K: 0.18,  # 0.151
    T.Q2_K: 0.36,  # 0.297
}


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_round_trip_error(ggml_type):
    x = np.random.RandomState(11).standard_normal((1024, 256)).astype(np.float32)
    back = dequantize_rows(ggml_type, quantize_rows(ggml_type, x))
    rel = np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x**2))
    assert rel < ROUND_TRIP_BOUND[ggml_type], rel
    assert rel > ROUND_TRIP_BOUND[ggml_type] / 4, f"{rel}: far better than the type allows, the bound is stale"


def test_f16_rounding_matches_numpy():
    """GGML_FP32_TO_FP16 rounds to nearest even, as numpy's cast does (NaN payloads aside)."""
    bits = np.random.RandomState(5).randint(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001, 0x387FC000, 0x387FE000], np.uint32)
    x = np.r_[bits, edges].view(np.float32)
    x = x[~np.isnan(x)].reshape(-1, 1)
    ours = quantize_rows(T.F16, x).view(np.uint16).ravel()
    with np.errstate(over="ignore"):
        assert np.array_equal(ours, x.ravel().astype(np.float16).view(np.uint16))


def test_quantize_rows_rejects_bad_arrays():
    with pytest.raises(KernelError, match="not whole blocks of 256"):
        quantize_rows(T.Q4_K, np.zeros((2, 100), np.float32))
    with pytest.raises(KernelError, match="2-D float32"):
        quantize_rows(T.Q4_K, np.zeros((2, 256), np.float64))
    with pytest.raises(KernelError, match="no quantization kernel for ggml type IQ2_XXS"):
        quantize_rows(T.IQ2_XXS, np.zeros((2, 256), np.float32))
    with pytest.raises(KernelError, match="out must be"):
        quantize_rows(T.Q8_0, np.zeros((2, 32), np.float32), out=np.zeros((2, 33), np.uint8))
    assert quantize_rows(T.Q8_0, np.zeros((0, 64), np.float32)).shape == (0, 68)
