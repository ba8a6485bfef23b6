"""numerics="ggml" against ggml itself: the activation quantizers byte for byte, the integer
matvec kernels against ggml_vec_dot_* through ctypes (refengine.libggml, on the libggml that
llama-cpp-python installs).

Activations. kernels/activations.py must write exactly the bytes of ggml-cpu's
quantize_row_q8_0 / _q8_1 / _q8_K, on random vectors and on extreme ones (zeros, one spike,
values on the rounding ties, f16 subnormals, inf, NaN).

Dot products. Integer sums are exact on both sides, so ours and ggml's differ only in the
order of the float32 sums over blocks (ggml keeps 8 lane sums, we add each block's total).
The tolerance is that of reassociating a float32 sum,

    |ours - ggml| <= RTOL * M,   M = |W_q| @ |a| + |W_m| @ |a|,

with `a` the dequantized activations and W split into its quant part W_q and its min part
W_m (the terms ggml adds separately: d * sc * q and -dmin * m). M bounds the sum of the
absolute values of every float term added, so a sum of n terms reassociated moves by at
most about n * 2^-24 * M; RTOL = 1e-6 holds for the rows here (at most
64 blocks), and a wrong quant, scale or sign misses it by orders of magnitude. Where ggml
adds larger terms than we do (Q3_K and Q6_K subtract their quant offset lane by lane in
float32), M counts those too (`reference`). Ours is also held to the float64 value of W @ a
on our own terms, so that a mistake shared with ggml cannot pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ggml_oracle as oracle  # noqa: E402  (tests/ is on sys.path, as for test_quantize.py)
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T
from numba import njit
from refengine.kernels import (
    GGML_MATVEC_KERNELS,
    KernelError,
    bound_matmul,
    bound_matvec,
    matvec,
    quantize_activations,
    quantize_rows,
)
from refengine.kernels import kquants_ggml as kq
from refengine.kernels.gemv_ggml import activations_q8_k, pair_sums
from refengine.kernels.simd import SIMD_LEVEL, simd_level

try:
    oracle.cpu_features()
except oracle.LibggmlMissing as e:
    pytest.skip(str(e), allow_module_level=True)

RTOL = 1e-6
QUANT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# Byte offsets of each block's f16 scales (d; m or dmin second), and which of them is a min.
F16_SCALES = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}  # fmt: skip
MIN_SCALE = {T.Q4_1: 2, T.Q5_1: 2, T.Q2_K: 82, T.Q4_K: 2, T.Q5_K: 2}
N_COLS = 2048


# ---------------------------------------------------------------- activations, byte for byte


def activation_inputs() -> dict[str, np.ndarray]:
    """Vectors of 512 values (two Q8_K blocks, sixteen Q8_0 ones)."""
    rng = np.random.RandomState(7)
    vectors = {f"corner_{name}": np.tile(row, 2) for name, row in oracle.corner_rows(256).items()}
    for name, rows in oracle.random_rows(rng, 1, 512).items():
        vectors[f"random_{name}"] = rows[0]
    grid = rng.randint(-127, 128, 512).astype(np.float32)
    vectors["ties_q8"] = (grid + 0.5) * np.float32(0.25)  # exact halves on a power-of-two grid
    vectors["spike_per_block"] = np.where(np.arange(512) % 32 == 5, 1000.0, rng.standard_normal(512)).astype(np.float32)
    vectors["f32_max"] = (np.finfo(np.float32).max * np.tile([1.0, -1.0], 256)).astype(np.float32)
    vectors["f32_subnormal"] = (rng.standard_normal(512) * 1e-40).astype(np.float32)
    return vectors


ACTIVATION_INPUTS = activation_inputs()


@pytest.mark.parametrize("weight_type", [T.Q8_0, T.Q4_1, T.Q4_K], ids=["q8_0", "q8_1", "q8_k"])
@pytest.mark.parametrize("name", list(ACTIVATION_INPUTS))
def test_activation_quantizers_are_ggmls_byte_for_byte(weight_type, name):
    x = ACTIVATION_INPUTS[name]
    blocks, _, _ = quantize_activations(weight_type, x)
    expected = oracle.quantize_activations(oracle.VEC_DOT_TYPES[weight_type], x)
    differ = np.argwhere(blocks != expected)
    assert differ.size == 0, (
        f"{name}: {len(differ)} bytes differ, first block {differ[0][0]} byte {differ[0][1]}: "
        f"ours {blocks[tuple(differ[0])]}, ggml {expected[tuple(differ[0])]}"
    )


def test_activation_scales_and_sums_match_the_blocks():
    """The float scales and integer sums handed to the dot products are those of the raw blocks."""
    x = ACTIVATION_INPUTS["random_heavy_tailed"]
    blocks, scales, sums = quantize_activations(T.Q4_K, x)  # Q8_K: d f32, qs, bsums int16
    assert np.array_equal(scales, blocks[:, :4].copy().view(np.float32)[:, 0])
    assert np.array_equal(sums, blocks[:, 260:].copy().view(np.int16).astype(np.int32))
    assert np.array_equal(sums, blocks[:, 4:260].view(np.int8).reshape(-1, 16, 16).sum(axis=2))
    blocks, scales, sums = quantize_activations(T.Q4_0, x)  # Q8_0: d f16, qs; sums of 4 are ours
    assert np.array_equal(scales, blocks[:, :2].copy().view(np.float16)[:, 0].astype(np.float32))
    assert np.array_equal(sums, blocks[:, 2:].view(np.int8).reshape(-1, 8, 4).sum(axis=2))
    blocks, scales, sums = quantize_activations(T.Q4_1, x)  # Q8_1: d f16, s f16, qs
    assert np.array_equal(sums, blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32))


def test_quantize_activations_refuses_float_types_and_ragged_vectors():
    with pytest.raises(KernelError, match="float activations"):
        quantize_activations(T.F16, np.zeros(32, dtype=np.float32))
    with pytest.raises(KernelError, match="multiple of 256"):
        quantize_activations(T.Q4_K, np.zeros(32, dtype=np.float32))


# ---------------------------------------------------------------- dot products against vec_dot


def with_sane_scales(ggml_type, blocks: np.ndarray, rng, low=-10, high=-2) -> np.ndarray:
    """(n, type_size) blocks with every f16 scale set to +-2^U(low, high)."""
    for offset in F16_SCALES[ggml_type]:
        magnitude = np.exp2(rng.uniform(low, high, blocks.shape[0]))
        sign = np.where(rng.random_sample(blocks.shape[0]) < 0.5, -1.0, 1.0)
        blocks[:, offset : offset + 2] = (sign * magnitude).astype("<f2").view(np.uint8).reshape(-1, 2)
    return blocks


def weight_rows(ggml_type, kind: str, n_rows: int, rng) -> np.ndarray:
    """(n_rows, row_bytes) raw rows of one of several kinds: quantized by our (llama.cpp's)
    quantizer, random bytes with sane scales, or extreme blocks."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n_blocks = n_rows * N_COLS // block_size
    if kind == "quantized":
        rows = quantize_rows(ggml_type, rng.standard_normal((n_rows, N_COLS)).astype(np.float32))
        return rows
    if kind == "random_bytes":
        blocks = rng.randint(0, 256, (n_blocks, type_size)).astype(np.uint8)
        blocks = with_sane_scales(ggml_type, blocks, rng)
    elif kind == "all_ones_bits":  # every quant at its largest code (Q8_0: -1), scales sane
        blocks = with_sane_scales(ggml_type, np.full((n_blocks, type_size), 0xFF, dtype=np.uint8), rng)
    elif kind == "all_zero_bits":  # every quant 0 (the most negative code of the offset types)
        blocks = with_sane_scales(ggml_type, np.zeros((n_blocks, type_size), dtype=np.uint8), rng)
    elif kind == "extreme_scales":  # random quants, f16 scales from subnormal 2^-24 up to 2^15
        blocks = rng.randint(0, 256, (n_blocks, type_size)).astype(np.uint8)
        blocks = with_sane_scales(ggml_type, blocks, rng, low=-24, high=15)
    elif kind == "int8_extremes":  # bytes -128 / 127 / 0x80 patterns only
        blocks = rng.choice(np.array([0x00, 0x7F, 0x80, 0xFF], dtype=np.uint8), (n_blocks, type_size))
        blocks = with_sane_scales(ggml_type, blocks, rng)
    else:
        raise ValueError(kind)
    return blocks.reshape(n_rows, -1)


def dequantized_activations(weight_type, x: np.ndarray) -> np.ndarray:
    """ggml's quantized activations as float64 values q * d."""
    vec_dot_type = oracle.VEC_DOT_TYPES[weight_type]
    blocks = oracle.quantize_activations(vec_dot_type, x)
    if vec_dot_type == T.Q8_K:
        d = blocks[:, :4].copy().view(np.float32)[:, 0]
        qs = blocks[:, 4:260].view(np.int8)
    else:
        d = blocks[:, :2].copy().view(np.float16)[:, 0].astype(np.float32)
        qs = blocks[:, 2 if vec_dot_type == T.Q8_0 else 4 :].view(np.int8)
    return (qs.astype(np.float64) * d.astype(np.float64)[:, None]).reshape(-1)


def dequantized_weights(weight_type, rows: np.ndarray) -> np.ndarray:
    return quants.dequantize(rows, weight_type).astype(np.float64).reshape(rows.shape[0], -1)


def with_bytes_zeroed(weight_type, rows: np.ndarray, ranges) -> np.ndarray:
    """The rows with the byte ranges [start, stop) of every block set to zero."""
    blocks = rows.reshape(-1, GGML_QUANT_SIZES[weight_type][1]).copy()
    for start, stop in ranges:
        blocks[:, start:stop] = 0
    return blocks.reshape(rows.shape)


def reference(weight_type, rows: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, tight, loose) per row, float64.

    value: W @ a, with ggml's one deliberate rounding: Q4_1 and Q5_1 take the activation block's
    sum as Q8_1's f16 s, so their min term is m * s. tight: the sum of |terms| of that value
    (the quant part and the min part apart). loose: also counting the quant offsets ggml subtracts
    lane by lane in Q3_K and Q6_K (it multiplies the unsigned quants, then takes off 4 or 32 times
    the scaled activation sums, and the two can be far larger than their difference)."""
    a = dequantized_activations(weight_type, x)
    w = dequantized_weights(weight_type, rows)
    w_quant, min_part = w, None
    if weight_type in MIN_SCALE:
        at = MIN_SCALE[weight_type]
        w_quant = dequantized_weights(weight_type, with_bytes_zeroed(weight_type, rows, [(at, at + 2)]))
    value = w_quant @ a
    tight = np.abs(w_quant) @ np.abs(a)
    if weight_type in (T.Q4_1, T.Q5_1):
        block_bytes = GGML_QUANT_SIZES[weight_type][1]
        m = rows.reshape(-1, block_bytes)[:, 2:4].copy().view(np.float16).astype(np.float64).reshape(rows.shape[0], -1)
        s_blocks = oracle.quantize_activations(T.Q8_1, x)[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0]
        min_part = m * s_blocks
        value, tight = value + min_part.sum(axis=1), tight + np.abs(min_part).sum(axis=1)
    elif weight_type in MIN_SCALE:
        value, tight = value + (w - w_quant) @ a, tight + np.abs(w - w_quant) @ np.abs(a)
    loose = tight
    if weight_type in (T.Q3_K, T.Q6_K):  # all quant bits zero: every weight is -offset * d * sc
        quant_bytes = [(0, 96)] if weight_type == T.Q3_K else [(0, 192)]
        offsets = -dequantized_weights(weight_type, with_bytes_zeroed(weight_type, rows, quant_bytes))
        loose = tight + 2 * np.abs(offsets) @ np.abs(a)
    return value, tight, loose


def assert_within_reassociation(weight_type, rows, x, ours, label):
    """ours within RTOL of float64 (on the terms we add) and of ggml's vec_dot (on the terms it adds)."""
    expected = oracle.vec_dot_rows(weight_type, rows, x)
    value, tight, loose = reference(weight_type, rows, x)
    # Q3_K and Q6_K take off their quant offset lane by lane in float32, as ggml does (tests/test_ggml_ops.py
    # holds them to ggml's vec_dot bit for bit): the larger terms that cancel there count for float64 too.
    offset_types = (T.Q3_K, T.Q6_K)
    own = loose if weight_type in offset_types else tight
    for name, other, magnitude in (("float64", value, own), ("ggml", expected, loose)):
        error = np.abs(ours.astype(np.float64) - other)
        bad = ~(error <= RTOL * magnitude)  # NaN is bad
        if bad.any():
            r = int(np.argmax(bad))
            pytest.fail(
                f"{weight_type.name} {label}: {bad.sum()} of {bad.size} rows off {name}; row {r}: ours {ours[r]!r}, "
                f"{name} {other[r]!r}, error {error[r]:.3g} > {RTOL:g} * {magnitude[r]:.3g}"
            )


WEIGHT_KINDS = ["quantized", "random_bytes", "all_ones_bits", "all_zero_bits", "extreme_scales", "int8_extremes"]
X_KINDS = ["normal", "heavy_tailed", "outliers", "ties", "one_spike"]


def activation_vector(kind: str, rng) -> np.ndarray:
    if kind in ("normal", "heavy_tailed", "outliers"):
        return oracle.random_rows(rng, 1, N_COLS)[kind][0]
    if kind == "ties":
        return ((rng.randint(-127, 128, N_COLS) + 0.5) * 0.125).astype(np.float32)
    if kind == "one_spike":
        x = (rng.standard_normal(N_COLS) * 1e-3).astype(np.float32)
        x[rng.randint(N_COLS)] = 1e4
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("weight_type", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("weight_kind", WEIGHT_KINDS)
def test_integer_matvec_matches_ggml_vec_dot(weight_type, weight_kind):
    rng = np.random.RandomState(list(T).index(weight_type) * 100 + WEIGHT_KINDS.index(weight_kind))
    rows = weight_rows(weight_type, weight_kind, 48, rng)
    rows.flags.writeable = False  # like a file mapping
    for x_kind in X_KINDS:
        x = activation_vector(x_kind, rng)
        ours = matvec(weight_type, rows, x, numerics="ggml")
        assert_within_reassociation(weight_type, rows, x, ours, f"{weight_kind} x {x_kind}")


@pytest.mark.parametrize("weight_type", QUANT_TYPES, ids=lambda t: t.name)
def test_non_finite_activations_poison_the_same_rows_as_ggml(weight_type):
    rng = np.random.RandomState(3)
    rows = weight_rows(weight_type, "quantized", 8, rng)
    for bad in (np.inf, -np.inf, np.nan):
        x = rng.standard_normal(N_COLS).astype(np.float32)
        x[100] = bad
        ours = matvec(weight_type, rows, x, numerics="ggml")
        expected = oracle.vec_dot_rows(weight_type, rows, x)
        assert np.array_equal(np.isfinite(ours), np.isfinite(expected)), (bad, ours, expected)


@pytest.mark.parametrize("weight_type", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_weights_take_x_rounded_to_their_format(weight_type):
    """ggml's F16 and BF16 vec_dot round x to the weight's format first; F32 keeps it."""
    rng = np.random.RandomState(5)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    x = rng.standard_normal(256).astype(np.float32)
    if weight_type == T.F16:
        rows, w64, x64 = w.astype(np.float16).view(np.uint8), w.astype(np.float16), x.astype(np.float16)
    elif weight_type == T.BF16:
        import torch

        w_bf16 = torch.from_numpy(w).to(torch.bfloat16)
        rows, w64 = w_bf16.view(torch.uint16).numpy().view(np.uint8), w_bf16.float().numpy()
        x64 = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    else:
        rows, w64, x64 = w.view(np.uint8), w, x
    ours = matvec(weight_type, np.ascontiguousarray(rows), x, numerics="ggml")
    reference = w64.astype(np.float64) @ x64.astype(np.float64)
    magnitude = np.abs(w64.astype(np.float64)) @ np.abs(x64.astype(np.float64))
    assert np.all(np.abs(ours - reference) <= 1e-6 * magnitude)


def test_bound_matvec_is_matvec():
    rng = np.random.RandomState(11)
    rows = weight_rows(T.Q4_K, "quantized", 32, rng)
    x = rng.standard_normal(N_COLS).astype(np.float32)
    out = np.empty(32, dtype=np.float32)
    bound_matvec(T.Q4_K, rows, numerics="ggml")(x, out)
    assert np.array_equal(out, matvec(T.Q4_K, rows, x, numerics="ggml"))
    assert not np.array_equal(out, matvec(T.Q4_K, rows, x))  # the exact numerics are another computation


@pytest.mark.parametrize("weight_type", [T.F32, T.F16, *QUANT_TYPES], ids=lambda t: t.name)
def test_a_batch_is_each_token_alone(weight_type):
    """bound_matmul runs the same row code for each token as matvec, and is checked against ggml too."""
    rng = np.random.RandomState(17)
    n_in = 512
    w = rng.standard_normal((24, n_in)).astype(np.float32)
    if weight_type == T.F32:
        rows = w.view(np.uint8)
    elif weight_type == T.F16:
        rows = w.astype(np.float16).view(np.uint8)
    else:
        rows = quantize_rows(weight_type, w)
    x = (rng.standard_normal((5, n_in)) * np.array([[1], [1e-3], [30], [1], [0]])).astype(np.float32)
    out = np.full((5, 24), np.nan, dtype=np.float32)
    bound_matmul(weight_type, rows)(x, out)
    for t in range(5):
        single = matvec(weight_type, rows, x[t], numerics="ggml")
        # The same integers; LLVM may order the float sums differently in the two kernels.
        assert np.allclose(out[t], single, rtol=1e-6, atol=1e-6 * np.abs(single).max()), t
        if weight_type in QUANT_TYPES:
            assert_within_reassociation(weight_type, rows, x[t], out[t], f"token {t} of a batch")


Q4_K, Q5_K = int(T.Q4_K), int(T.Q5_K)


# Each output of a K-quant batch computed alone, on the path ggml takes for the batch's size (kquants_ggml.py):
# the per-token functions, one (row, token) at a time.
@njit
def k_quant_per_token(ggml_type_id, repacked, rows, x, out):
    a, scales, bsums = activations_q8_k(x)
    sums32 = pair_sums(bsums)
    n_tok = x.shape[0]
    n_gemm = n_tok - n_tok % 4 if n_tok > 3 else 0
    for r in range(rows.shape[0]):
        for t in range(n_tok):
            a_t, s_t, m_t, b_t = a[t], scales[t], sums32[t], bsums[t]
            total, total_min = np.float32(0), np.float32(0)
            if ggml_type_id == Q4_K and repacked and t < n_gemm:  # ggml_gemm_q4_K_8x8_q8_K
                for b in range(a_t.shape[0]):
                    total, total_min = kq.q4_k_repacked_gemm_block(total, total_min, rows, r, b, a_t, s_t, m_t)
                out[t, r] = total - total_min
            elif ggml_type_id == Q4_K and repacked:
                out[t, r] = kq.q4_k_repacked(rows, r, a_t, s_t, m_t)
            elif n_tok < kq.TILED_MIN_BATCH:
                if ggml_type_id == Q4_K:
                    out[t, r] = kq.q4_k_vec_dot(rows, r, a_t, s_t, m_t)
                elif ggml_type_id == Q5_K:
                    out[t, r] = kq.q5_k_vec_dot(rows, r, a_t, s_t, m_t)
                else:
                    out[t, r] = kq.q6_k_vec_dot(rows, r, a_t, s_t, b_t)
            else:
                for b in range(a_t.shape[0]):
                    if ggml_type_id == Q4_K:
                        total = kq.q4_k_tiled_block(total, rows, r, b, a_t, s_t, m_t)
                    elif ggml_type_id == Q5_K:
                        total = kq.q5_k_tiled_block(total, rows, r, b, a_t, s_t, m_t)
                    else:
                        total = kq.q6_k_tiled_block(total, rows, r, b, a_t, s_t, b_t)
                out[t, r] = total


BATCH_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("weight_type", BATCH_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("weight_kind", ["quantized", "random_bytes", "extreme_scales", "int8_extremes"])
def test_batch_kernels_are_one_token_per_output(weight_type, weight_kind):
    """bound_matmul decodes a weight block once for a group of tokens and tiles rows and tokens; each output
    must stay its own (row, token) dot product to the bit: matvec's for the legacy types (vec_dot, or
    tinyBLAS: the same sum for one output), and for the K-quants the per-token function of the path the
    batch's size selects (vec_dot below 8 tokens, tiled from 8, Q4_K's repacked gemm by groups of 4 and
    gemv after them). 1..13 tokens and 67 (a second chunk of 64), 40 rows (tiles of 12 to 28 rows end
    inside a pair; 40 is a multiple of 8, so Q4_K is repacked) and 37 (Q4_K not)."""
    rng = np.random.RandomState(list(T).index(weight_type) + 40)
    for n_out in (40, 37):
        rows = weight_rows(weight_type, weight_kind, n_out, rng)
        for n_tok in [*range(1, 14), 67]:
            x = (rng.standard_normal((n_tok, N_COLS)) * rng.choice([1e-3, 1.0, 30.0], (n_tok, 1))).astype(np.float32)
            ours = np.full((n_tok, n_out), np.nan, dtype=np.float32)
            bound_matmul(weight_type, rows)(x, ours)
            expected = np.empty_like(ours)
            if weight_type in (T.Q4_K, T.Q5_K, T.Q6_K):
                k_quant_per_token(int(weight_type), n_out % 8 == 0, rows, x, expected)
            else:
                for t in range(n_tok):
                    matvec(weight_type, rows, x[t], expected[t], numerics="ggml")
            same = (ours == expected) | (np.isnan(ours) & np.isnan(expected))
            assert same.all(), f"{n_out} rows, {n_tok} tokens: {(~same).sum()} outputs differ"


FIRST_CALLS = {  # each leaves 64 in out[0, 0]: 64 products of ones
    "matvec F16": "bound_matvec(T.F16, ones(np.float16), 'ggml')(np.ones(64, np.float32), out[0])",
    "matmul F32": "bound_matmul(T.F32, ones(np.float32))(np.ones((2, 64), np.float32), out)",
    "matmul BF16": "bound_matmul(T.BF16, np.full((4, 64), 0x3F80, np.uint16).view(np.uint8))(x, out)",
}


@pytest.mark.parametrize("call", list(FIRST_CALLS))
def test_a_float_kernel_may_be_the_first_parallel_code_to_run(call):
    """numba starts its worker threads when Python first calls a parallel kernel; a non-parallel kernel
    calling a parallel one before that crashed the process. A fresh process, this kernel first."""
    script = "\n".join(
        [
            "import numpy as np",
            "from gguf import GGMLQuantizationType as T",
            "from refengine.kernels import bound_matmul, bound_matvec",
            "out, x = np.zeros((2, 4), np.float32), np.ones((2, 64), np.float32)",
            "ones = lambda dtype: np.ones((4, 64), dtype).view(np.uint8)",
            FIRST_CALLS[call],
            "assert out[0, 0] == 64, out",
        ]
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unknown_numerics_and_types_are_refused():
    rows = np.zeros((1, 144), dtype=np.uint8)
    with pytest.raises(KernelError, match="numerics must be one of exact, ggml"):
        matvec(T.Q4_K, rows, np.zeros(256, dtype=np.float32), numerics="fast")
    with pytest.raises(KernelError, match="no ggml matvec kernel for ggml type IQ2_XS"):
        bound_matvec(T.IQ2_XS, np.zeros((1, 74), dtype=np.uint8), numerics="ggml")
    with pytest.raises(KernelError, match="no ggml matmul kernel for ggml type IQ2_XS"):
        bound_matmul(T.IQ2_XS, np.zeros((1, 74), dtype=np.uint8))
    with pytest.raises(KernelError, match="not whole blocks"):
        bound_matmul(T.Q4_K, np.zeros((1, 100), dtype=np.uint8))


# ---------------------------------------------------------------- the SIMD level chosen at import


def test_simd_level_follows_the_target_features():
    assert simd_level("znver5", {"avx2", "avx512vnni", "avx512vl", "avxvnni"}) == "avx512vnni"
    assert simd_level("alderlake", {"avx2", "avxvnni"}) == "avxvnni"
    assert simd_level("haswell", {"avx2", "fma", "f16c"}) == "avx2"
    assert simd_level("x86-64-v3", set()) == "avx2"  # NUMBA_CPU_FEATURES empty: the name's own
    assert simd_level("x86-64", set()) == "generic"
    assert simd_level("x86-64", {"sse2"}) == "generic"


PORTABLE_CHECK = """
import numpy as np, sys
sys.path.insert(0, {tests!r})
import ggml_oracle as oracle
from gguf import GGMLQuantizationType as T
from refengine.kernels import matvec, quantize_rows
from refengine.kernels.simd import SIMD_LEVEL
rng = np.random.RandomState(0)
worst = 0.0
for t in {types}:
    rows = quantize_rows(t, rng.standard_normal((16, 1024)).astype(np.float32))
    x = rng.standard_normal(1024).astype(np.float32)
    ours, ggml = matvec(t, rows, x, numerics="ggml"), oracle.vec_dot_rows(t, rows, x)
    worst = max(worst, float(np.max(np.abs(ours - ggml) / np.abs(ggml).max())))
print(SIMD_LEVEL, worst)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("cpu", "level"), [("x86-64-v3", "avx2"), ("x86-64", "generic")])
def test_portable_levels_compute_the_same(cpu, level):
    """The AVX2 and generic code paths, compiled for a CPU without VNNI (or without AVX), agree with
    ggml too. A fresh process, since the level is fixed at import; numba caches each target apart."""
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="")
    script = PORTABLE_CHECK.format(tests=str(Path(__file__).parent), types=[f"T.{t.name}" for t in QUANT_TYPES])
    script = script.replace("'T.", "T.").replace("', ", ", ").replace("']", "]")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    got_level, worst = done.stdout.split()
    assert got_level == level
    assert float(worst) < 1e-6


def test_host_level_is_the_fastest_the_cpu_has():
    """On this machine numba compiles for the host: the level is the best its features allow."""
    if os.environ.get("NUMBA_CPU_NAME"):
        pytest.skip("NUMBA_CPU_NAME is set: not the host's level")
    import llvmlite.binding as llvm

    features = {f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+")}
    assert SIMD_LEVEL == simd_level(llvm.get_host_cpu_name(), features)
    assert set(GGML_MATVEC_KERNELS) >= set(QUANT_TYPES)
