"""Every dequantization kernel against gguf.quants, bit for bit.

gguf.quants is the reference (written by the ggml authors, independently of us).
Equality is exact: we compare the float32 bit patterns, so even NaN payloads
and signed zeros must agree.
"""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T
from refengine.kernels import DEQUANTIZERS, KernelError, dequantize_rows

# Every type gguf.quants can turn into float32.
REFERENCE_TYPES = [T.F32, T.F16, T.BF16] + sorted(
    (t for t in quants._type_traits if hasattr(quants._type_traits[t], "dequantize_blocks")),
    key=lambda t: t.value,
)

# Byte offsets of each f16 scale inside one block, for the corner cases below.
F16_SCALES = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ2_XXS: [0],
    T.IQ2_XS: [0],
    T.IQ2_S: [0],
    T.IQ3_XXS: [0],
    T.IQ3_S: [0],
    T.IQ1_S: [0],
    T.IQ4_NL: [0],
    T.IQ4_XS: [0],
    T.TQ1_0: [52],
    T.TQ2_0: [64],
}
EXTREME_F16 = [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x3C00]
# One-byte scales: MXFP4's e8m0 exponent and NVFP4's four ue4m3 sub-block scales.
BYTE_SCALES = {T.MXFP4: [0], T.NVFP4: [0, 1, 2, 3]}
EXTREME_BYTES = [0x00, 0x01, 0x02, 0x7E, 0x7F, 0x80, 0xFE, 0xFF]


def reference(ggml_type, raw: np.ndarray) -> np.ndarray:
    if ggml_type == T.F32:
        return raw.view(np.float32).copy()
    return quants.dequantize(raw, ggml_type)


def assert_bit_exact(ggml_type, raw: np.ndarray):
    ours = dequantize_rows(ggml_type, raw)
    with np.errstate(all="ignore"):
        ref = reference(ggml_type, raw).reshape(ours.shape)
    # Bit for bit, except that a NaN equals any NaN: which operand's payload d * q + m passes on depends on
    # the instructions LLVM picked (IEEE 754 leaves it open), and it did differ between two compiles.
    mismatch = (ours.view(np.uint32) != ref.view(np.uint32)) & ~(np.isnan(ours) & np.isnan(ref))
    if mismatch.any():
        r, c = np.argwhere(mismatch)[0]
        block_size = GGML_QUANT_SIZES[ggml_type][0]
        pytest.fail(
            f"{ggml_type.name}: {mismatch.sum()} of {mismatch.size} values differ; first at row {r}, "
            f"column {c} (block {c // block_size}): ours {ours[r, c]!r}, gguf.quants {ref[r, c]!r}"
        )


def random_rows(ggml_type, n_rows, blocks_per_row, rng):
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    return rng.integers(0, 256, size=(n_rows, blocks_per_row * type_size), dtype=np.uint8)


def test_every_reference_type_has_a_kernel():
    missing = [t.name for t in REFERENCE_TYPES if t not in DEQUANTIZERS]
    assert not missing, f"no kernel for {missing}"


@pytest.mark.parametrize("ggml_type", REFERENCE_TYPES, ids=lambda t: t.name)
def test_random_blocks(ggml_type):
    # Random bytes everywhere, scales included, so NaN, inf and subnormal scales all occur.
    rng = np.random.default_rng(ggml_type.value)
    n_blocks = 4 if GGML_QUANT_SIZES[ggml_type][0] == 1 else 1
    assert_bit_exact(
        ggml_type, random_rows(ggml_type, 37, 3 * n_blocks * 64 // GGML_QUANT_SIZES[ggml_type][0] + 1, rng)
    )


@pytest.mark.parametrize("ggml_type", REFERENCE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x55, 0xAA])
def test_constant_blocks(ggml_type, fill):
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    assert_bit_exact(ggml_type, np.full((3, 2 * type_size), fill, dtype=np.uint8))


@pytest.mark.parametrize("ggml_type", sorted(F16_SCALES, key=lambda t: t.value), ids=lambda t: t.name)
def test_extreme_f16_scales(ggml_type):
    rng = np.random.default_rng(1000 + ggml_type.value)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n = len(EXTREME_F16)
    raw = random_rows(ggml_type, n * n, 1, rng)
    for i, a in enumerate(EXTREME_F16):
        for j, b in enumerate(EXTREME_F16):
            for k, offset in enumerate(F16_SCALES[ggml_type]):
                value = (a, b)[k % 2]
                raw[i * n + j, offset : offset + 2] = np.frombuffer(np.uint16(value).tobytes(), np.uint8)
    assert_bit_exact(ggml_type, raw)


@pytest.mark.parametrize("ggml_type", sorted(BYTE_SCALES, key=lambda t: t.value), ids=lambda t: t.name)
def test_extreme_byte_scales(ggml_type):
    rng = np.random.default_rng(2000 + ggml_type.value)
    raw = random_rows(ggml_type, len(EXTREME_BYTES), 4, rng)
    type_size = GGML_QUANT_SIZES[ggml_type][1]
    for i, value in enumerate(EXTREME_BYTES):
        for block in range(4):
            for offset in BYTE_SCALES[ggml_type]:
                raw[i, block * type_size + offset] = value
    assert_bit_exact(ggml_type, raw)


@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q4_K, T.F16], ids=lambda t: t.name)
def test_rows_into_callers_tile(ggml_type):
    """A range of rows lands in a caller's buffer, the same as slicing the whole result."""
    rng = np.random.default_rng(7)
    raw = random_rows(ggml_type, 50, 256 // GGML_QUANT_SIZES[ggml_type][0] * 2, rng)
    whole = dequantize_rows(ggml_type, raw)
    tile = np.full((16, whole.shape[1]), -1.0, dtype=np.float32)
    for start in range(0, 50, 16):
        stop = min(start + 16, 50)
        got = dequantize_rows(ggml_type, raw[start:stop], out=tile[: stop - start])
        assert got.base is tile or got is tile
        np.testing.assert_array_equal(tile[: stop - start].view(np.uint32), whole[start:stop].view(np.uint32))


def test_wrapper_rejects_bad_arguments():
    raw = np.zeros((2, 34), dtype=np.uint8)
    with pytest.raises(KernelError, match="2-D uint8"):
        dequantize_rows(T.Q8_0, raw.astype(np.int16))
    with pytest.raises(KernelError, match="whole blocks"):
        dequantize_rows(T.Q8_0, raw[:, :33])
    with pytest.raises(KernelError, match="out must be"):
        dequantize_rows(T.Q8_0, raw, out=np.empty((2, 31), np.float32))
    with pytest.raises(KernelError, match="no dequantization kernel"):
        dequantize_rows(9999, raw)


def test_numba_cache_is_keyed_by_every_kernel_source(tmp_path):
    """numba only notices edits to a kernel's own file; the cache folder is named by all of them, so
    an edit to a helper another file calls (here simd.py) starts a new cache."""
    import shutil
    from pathlib import Path

    import numba
    from refengine.kernels import _jit

    folder = Path(_jit.__file__).parent
    copy = shutil.copytree(folder, tmp_path / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    assert _jit.source_digest(copy) == _jit.source_digest(folder)
    with open(copy / "simd.py", "a") as fh:
        fh.write("\n# an edit\n")
    assert _jit.source_digest(copy) != _jit.source_digest(folder)
    assert numba.config.CACHE_DIR.endswith(f"numba-{_jit.source_digest()}")
