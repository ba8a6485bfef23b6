"""The fused matrix-vector kernels against a slow, obviously right reference.

The reference dequantizes W with gguf.quants (independent of us) and multiplies
in float64: ref = float64(W) @ float64(x). Our kernels sum in float32 in an order
of their choosing (vectorised, scales factored out of block sums), so they agree
with it up to float32 rounding, not bit for bit. The tolerance,

    |ours - ref| <= RTOL * (|W| @ |x|) + ATOL,

comes from the standard bound on a float32 sum: each addition on the path from
a product to the result rounds by at most u = 2^-24 of what it adds, so the
error is at most depth * u * sum|w x|. Our sums are trees: per block a few
additions in each vector lane and a 3-level reduction across lanes, then one
addition per block along the row, so the depth is about n_blocks + 16, at most
~80 for the rows here (64 Q8_0 blocks of 2048 columns): 80 u = 5e-6. Factoring
a scale out of a block adds a rounding or two, and a min makes the weight a
difference d*sc*q - dmin*m whose terms can exceed |w| a few times (so can their
rounding errors), hence RTOL = 1e-5: room for that, while a wrong element, sign
or scale misses it by orders of magnitude. Errors observed are at most 1.3e-7
of |W| @ |x| (real smollm2 Q4_1 rows), most below 5e-8.
ATOL only lets an exact zero match an exact zero.
"""

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T
from refengine.kernels import MATVEC_KERNELS, KernelError, matvec

from refengine import kernels
from refengine.gguf import open_gguf

RTOL = 1e-5
ATOL = 1e-30

FLOAT_TYPES = [T.F32, T.F16, T.BF16]
QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
ALL_TYPES = FLOAT_TYPES + QUANT_TYPES

# Byte offsets of each f16 scale (d, and m or dmin) inside one block, from the types' records. Random
# bytes there would give NaN, inf and huge scales; sane ones are written instead.
F16_SCALES = {t: [f.start for f in q.scale_fields() if f.kind == "f16"] for t, q in kernels.QUANT_TYPES.items()}


def dequantized(ggml_type, rows: np.ndarray) -> np.ndarray:
    """W as float64 (n_out, n_in), decoded by the reference."""
    if ggml_type == T.F32:
        w = rows.view(np.float32)
    elif ggml_type == T.BF16:
        w = (rows.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        w = quants.dequantize(rows, ggml_type)
    return w.reshape(rows.shape[0], -1).astype(np.float64)


def assert_close(ggml_type, rows: np.ndarray, x: np.ndarray, ours: np.ndarray):
    w = dequantized(ggml_type, rows)
    x64 = x.astype(np.float64)
    ref, magnitude = w @ x64, np.abs(w) @ np.abs(x64)
    error = np.abs(ours.astype(np.float64) - ref)
    bad = ~(error <= RTOL * magnitude + ATOL)  # also catches NaN
    if bad.any():
        r = int(np.argmax(bad))
        pytest.fail(
            f"{ggml_type.name}: {bad.sum()} of {bad.size} outputs off; first row {r}: ours {ours[r]!r}, "
            f"reference {ref[r]!r}, error {error[r]:.3g} > {RTOL:g} * |W| @ |x| = {RTOL * magnitude[r]:.3g}"
        )


def random_rows(ggml_type, n_rows: int, n_blocks: int, rng) -> np.ndarray:
    """(n_rows, n_blocks * type_size) read-only raw rows: random quants, sane scales."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if ggml_type in FLOAT_TYPES:
        values = rng.standard_normal((n_rows, n_blocks)).astype(np.float32)
        if ggml_type == T.F16:
            values = values.astype(np.float16)
        elif ggml_type == T.BF16:
            values = (values.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
        rows = values.view(np.uint8)
    else:
        blocks = rng.integers(0, 256, (n_rows * n_blocks, type_size), dtype=np.uint8)
        for offset in F16_SCALES[ggml_type]:
            # Both signs, magnitudes 2^-10..2^-2, like real weight scales.
            scale = np.exp2(rng.uniform(-10, -2, len(blocks))) * rng.choice([-1.0, 1.0], len(blocks))
            blocks[:, offset : offset + 2] = scale.astype("<f2").view(np.uint8).reshape(-1, 2)
        rows = blocks.reshape(n_rows, n_blocks * type_size)
    rows.flags.writeable = False  # as weights are: read-only views of the file mapping
    return rows


def random_x(n: int, rng) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32)


def test_every_type_has_a_kernel():
    assert sorted(MATVEC_KERNELS) == sorted(ALL_TYPES)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [1, 3, 7])
@pytest.mark.parametrize("n_blocks_of_256", [1, 3])
def test_random_blocks(ggml_type, n_rows, n_blocks_of_256):
    """Odd row counts (no thread gets an even share) and rows of one or several super-blocks."""
    rng = np.random.default_rng([ggml_type.value, n_rows, n_blocks_of_256])
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    rows = random_rows(ggml_type, n_rows, n_blocks_of_256 * 256 // block_size, rng)
    x = random_x(n_blocks_of_256 * 256, rng)
    assert_close(ggml_type, rows, x, matvec(ggml_type, rows, x))


@pytest.mark.parametrize("ggml_type", [t for t in ALL_TYPES if GGML_QUANT_SIZES[t][0] < 256], ids=lambda t: t.name)
@pytest.mark.parametrize("n_blocks", [1, 3, 7])
def test_short_odd_rows(ggml_type, n_blocks):
    """Rows of an odd number of 32-value blocks (or of single values for float types)."""
    rng = np.random.default_rng([ggml_type.value, n_blocks])
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    rows = random_rows(ggml_type, 5, n_blocks, rng)
    x = random_x(n_blocks * block_size, rng)
    assert_close(ggml_type, rows, x, matvec(ggml_type, rows, x))


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_all_zero_blocks_give_exact_zeros(ggml_type):
    rows = np.zeros((3, 2 * 256 // GGML_QUANT_SIZES[ggml_type][0] * GGML_QUANT_SIZES[ggml_type][1]), np.uint8)
    x = random_x(512, np.random.default_rng(0))
    out = matvec(ggml_type, rows, x)
    np.testing.assert_array_equal(out, np.zeros(3, np.float32))


@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
def test_nan_scale_gives_nan(ggml_type):
    """Reassociation is the only fastmath licence: a NaN weight still poisons its row's sum."""
    rng = np.random.default_rng(ggml_type.value)
    rows = random_rows(ggml_type, 3, 256 // GGML_QUANT_SIZES[ggml_type][0], rng).copy()
    offset = F16_SCALES[ggml_type][0]
    rows[1, offset : offset + 2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    rows.flags.writeable = False  # the same compiled specialisation as the other tests
    out = matvec(ggml_type, rows, random_x(256, rng))
    assert np.isfinite(out[[0, 2]]).all() and np.isnan(out[1])


@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_same_bits_on_any_thread_count(ggml_type):
    """Threads split the rows, never a row's sum: the result does not depend on their number."""
    rng = np.random.default_rng(5)
    rows = random_rows(ggml_type, 37, 2048 // GGML_QUANT_SIZES[ggml_type][0], rng)
    x = random_x(2048, rng)
    many = matvec(ggml_type, rows, x)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = matvec(ggml_type, rows, x)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(one.view(np.uint32), many.view(np.uint32))


def test_out_is_filled_and_returned():
    rng = np.random.default_rng(1)
    rows, x = random_rows(T.Q4_K, 9, 2, rng), random_x(512, rng)
    out = np.full(9, np.nan, dtype=np.float32)
    assert matvec(T.Q4_K, rows, x, out=out) is out
    np.testing.assert_array_equal(out, matvec(int(T.Q4_K), rows, x))


def test_empty_shapes():
    x = np.zeros(32, np.float32)
    assert matvec(T.Q8_0, np.zeros((0, 34), np.uint8), x).shape == (0,)
    np.testing.assert_array_equal(matvec(T.Q8_0, np.zeros((2, 0), np.uint8), x[:0]), [0, 0])


def test_wrapper_rejects_bad_arguments():
    rows, x = np.zeros((2, 34), np.uint8), np.zeros(32, np.float32)
    with pytest.raises(KernelError, match="no matvec kernel for ggml type IQ2_XS"):
        matvec(T.IQ2_XS, rows, x)
    with pytest.raises(KernelError, match="no matvec kernel"):
        matvec(9999, rows, x)
    with pytest.raises(KernelError, match="2-D uint8"):
        matvec(T.Q8_0, rows.astype(np.int16), x)
    with pytest.raises(KernelError, match="2-D uint8"):
        matvec(T.Q8_0, np.zeros((2, 68), np.uint8)[:, ::2], x)
    with pytest.raises(KernelError, match="whole blocks"):
        matvec(T.Q8_0, np.zeros((2, 33), np.uint8), x)
    with pytest.raises(KernelError, match=r"need x of shape \(32,\) float32"):
        matvec(T.Q8_0, rows, x.astype(np.float64))
    with pytest.raises(KernelError, match=r"need x of shape \(32,\)"):
        matvec(T.Q8_0, rows, x[:31])
    with pytest.raises(KernelError, match="out must be"):
        matvec(T.Q8_0, rows, x, out=np.empty(3, np.float32))


# Real tensors: every (type, shape) of both models once, the 262144-row gemma
# output head (and smollm's 49152-row one) through a slice of rows so that the
# float64 reference stays small.
REFERENCE_ROWS = 8192


def real_tensors(path):
    model = open_gguf(path)
    seen = {}
    for t in model.tensors.values():
        if len(t.shape) == 2:
            seen.setdefault((t.ggml_type, t.shape), t)
    return list(seen.values())


@pytest.mark.slow
def test_real_tensors(real_model_path):
    rng = np.random.default_rng(3)
    checked = set()
    for t in real_tensors(real_model_path):
        rows = t.data[:REFERENCE_ROWS]
        # Activations of a transformer are O(1) with a few large ones.
        x = random_x(t.n_cols, rng) * np.float32(4) ** rng.integers(-2, 3, t.n_cols).astype(np.float32)
        assert_close(t.ggml_type, rows, x, matvec(t.ggml_type, rows, x))
        checked.add(t.ggml_type)
    expected = {"gemma-3-270m-q4_k_m.gguf": {T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K},
                "SmolLM2-135M-Instruct.Q4_1.gguf": {T.Q8_0, T.Q4_1}}[real_model_path.name]  # fmt: skip
    assert expected <= checked


def test_whole_output_head(gemma_path):
    """All 262144 rows of gemma's Q8_0 head in one call agree with row slices done separately."""
    head = open_gguf(gemma_path).tensor("token_embd.weight")
    x = random_x(head.n_cols, np.random.default_rng(4))
    whole = matvec(head.ggml_type, head.data, x)
    for start in (0, 131072, head.n_rows - 1000):
        part = matvec(head.ggml_type, head.data[start : start + 1000], x)
        np.testing.assert_array_equal(whole[start : start + 1000], part)
    assert_close(head.ggml_type, head.data[-REFERENCE_ROWS:], x, whole[-REFERENCE_ROWS:])
