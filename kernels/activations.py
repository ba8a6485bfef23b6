"""ggml-cpu's activation quantizers: float32 to Q8_0, Q8_1 and Q8_K, bit for bit.

Before an integer dot product ggml quantizes the activation vector to its weight type's
`vec_dot_type` (ggml-cpu.c's type_traits_cpu): Q8_0 for Q4_0, Q5_0 and Q8_0, Q8_1 for
Q4_1 and Q5_1, Q8_K for the k-quants. What llama.cpp runs on x86 is the AVX code of
arch/x86/quants.c for Q8_0 and Q8_1, which is not the reference quantize_row_q8_0_ref:
it scales by 127 / amax instead of 1 / d, rounds halves to even (_mm256_round_ps) where
the reference rounds them away from zero (roundf), and takes the maximum with maxps,
whose NaN rule (the second operand wins) decides what a NaN does. Q8_K is
quantize_row_q8_K_ref (ggml-quants.c) everywhere. The functions here follow that code
operation for operation; tests/test_ggml_numerics.py holds them to ggml's own through
ctypes, byte for byte, on random and extreme inputs.

Each quantizer writes ggml's block layout (`blocks`, raw bytes, what ggml's vec_dot reads)
and beside it what our dot products want ready to use:

    Q8_0, 34 bytes: | d: f16 | qs: int8 x 32 |                 scales (n,) f32 = d, sums (n, 8) int32:
                                                               sums[k] = qs[4k] + .. + qs[4k + 3]
    Q8_1, 36 bytes: | d: f16 | s: f16 = f16(d * sum qs) | qs |  scales (n,) f32 = d, sums (n,) f32 = s
    Q8_K, 292 bytes: | d: f32 | qs: int8 x 256 | bsums: int16 x 16 (sums of 16 qs) |
                                                               scales (n,) f32 = d, sums (n, 16) int32 = bsums

Q8_0's integer sums are not part of ggml's block: Q4_0 and Q5_0 take them to subtract
their quants' offset (8, 16) from each 4-byte lane of a dot product instead of making every
quant a signed byte (sum (q - 8) y = sum q y - 8 sum y, exactly, in integers), which leaves
the lanes equal to those of ggml's sign-trick products.
"""

import numpy as np

from ._jit import f16_to_f32, kernel
from .quantize import f32_bits, fp32_to_fp16, nearest_int
from .simd import (
    HAS_F16C,
    amax32,
    amax32_x86,
    dot_bytes,
    f32_to_f16_bits,
    load_bytes,
    ones_bytes,
    store_half_sums,
    store_lanes,
    zero_lanes,
)

f32 = np.float32

Q8_0_BYTES, Q8_1_BYTES, Q8_K_BYTES = 34, 36, 292


@kernel
def cpu_fp32_to_fp16(value):
    """GGML_CPU_FP32_TO_FP16: vcvtps2ph on x86 (round to nearest even); ggml's portable rounding
    where the target has no F16C. The two differ only in a NaN's payload."""
    if HAS_F16C:
        return np.int64(f32_to_f16_bits(value))
    return fp32_to_fp16(value)


@kernel
def maxps(a, b):
    """x86 maxps/maxss on one lane: a if a > b, else b (so b when either is NaN)."""
    return a if a > b else b


@kernel
def cvtps_epi32(v):
    """x86 cvtps2dq on a value already rounded: the int32, or INT_MIN for NaN and out-of-range values."""
    if v >= f32(-2147483648.0) and v < f32(2147483648.0):
        return np.int64(np.int32(v))
    return np.int64(-2147483648)


@kernel
def packs_to_int8(i):
    """_mm256_packs_epi32 then _mm256_packs_epi16: an int32 saturated to int8."""
    return max(-128, min(127, i))


@kernel
def amax_x86(x, b):
    """max |x[b, :32]| as quantize_row_q8_0's AVX code reduces it (simd.amax32_x86)."""
    return amax32_x86(x, b)


@kernel
def quantize_q8_0(x, blocks, scales, sums):  # (n, 32) f32 -> (n, 34) u8, (n,) f32, (n, 8) int32
    """quantize_row_q8_0, AVX branch (arch/x86/quants.c)."""
    qs = blocks[:, 2:].view(np.int8)
    for b in range(x.shape[0]):
        amax = amax_x86(x, b)
        h = cpu_fp32_to_fp16(amax / f32(127.0))
        blocks[b, 0] = h & 0xFF
        blocks[b, 1] = h >> 8
        scales[b] = f16_to_f32(blocks[b, 0], blocks[b, 1])
        inverse = f32(127.0) / amax if amax != f32(0.0) else f32(0.0)
        for l in range(x.shape[1]):
            qs[b, l] = packs_to_int8(cvtps_epi32(np.rint(x[b, l] * inverse)))
        # sum of each 4 quants: their dot product with ones, as the matvec's lanes add them
        store_lanes(sums, b, 0, dot_bytes(zero_lanes(), ones_bytes(), load_bytes(blocks, b, 2)))


@kernel
def quantize_q8_1(x, blocks, scales, sums):  # (n, 32) f32 -> (n, 36) u8, (n,) f32, (n,) f32
    """quantize_row_q8_1, AVX2 branch: as Q8_0, plus s = f16(d * the int32 sum of the quants)
    taken before they are saturated to int8 (hsum_i32_8 of the cvtps2dq results, wrapping)."""
    qs = blocks[:, 4:].view(np.int8)
    for b in range(x.shape[0]):
        amax = amax_x86(x, b)
        d = amax / f32(127.0)
        h = cpu_fp32_to_fp16(d)
        blocks[b, 0] = h & 0xFF
        blocks[b, 1] = h >> 8
        scales[b] = f16_to_f32(blocks[b, 0], blocks[b, 1])
        inverse = f32(127.0) / amax if amax != f32(0.0) else f32(0.0)
        total = np.int32(0)
        for l in range(x.shape[1]):
            i = np.int32(cvtps_epi32(np.rint(x[b, l] * inverse)))
            total = np.int32(total + i)  # int32 adds wrap, as vpaddd does (numba would widen to int64)
            qs[b, l] = packs_to_int8(i)
        s = cpu_fp32_to_fp16(d * f32(total))
        blocks[b, 2] = s & 0xFF
        blocks[b, 3] = s >> 8
        sums[b] = f16_to_f32(blocks[b, 2], blocks[b, 3])


@kernel
def first_of_largest_magnitude(x, b):
    """(max |x[b, :]|, the first x[b, l] of that magnitude): what quantize_row_q8_K_ref's loop
    `if (ax > amax) { amax = ax; max = x[j]; }` ends with (a NaN never passes the test)."""
    amax = f32(0.0)
    for j in range(0, x.shape[1], 32):
        amax = max(amax, amax32(x, b, j))
    for l in range(x.shape[1]):
        if abs(x[b, l]) == amax:
            return amax, x[b, l]
    return amax, f32(0.0)


@kernel
def quantize_q8_k(x, blocks, scales, sums):  # (n, 256) f32 -> (n, 292) u8, (n,) f32, (n, 16) int32
    """quantize_row_q8_K_ref: the value of largest magnitude maps to -127 (iscale = -127 / max),
    quants by nearest_int, capped at 127, d = 1 / iscale as float32, and bsums of each 16.
    An all-zero block (amax == 0) is d = 0 and zero quants; ggml leaves its bsums unwritten,
    we write zeros (they are multiplied by d = 0 either way)."""
    qs = blocks[:, 4:260].view(np.int8)
    for b in range(x.shape[0]):
        amax, max_value = first_of_largest_magnitude(x, b)
        if amax == f32(0.0):
            blocks[b, :] = 0
            scales[b] = f32(0.0)
            sums[b, :] = 0
            continue
        iscale = f32(-127.0) / max_value
        for l in range(x.shape[1]):
            qs[b, l] = min(127, nearest_int(iscale * x[b, l]))
        for j in range(0, x.shape[1], 32):  # sums of 16: dot products with ones, added half by half
            store_half_sums(sums, b, j // 16, dot_bytes(zero_lanes(), ones_bytes(), load_bytes(blocks, b, 4 + j)))
        for k in range(sums.shape[1]):
            blocks[b, 260 + 2 * k] = sums[b, k] & 0xFF
            blocks[b, 261 + 2 * k] = (sums[b, k] >> 8) & 0xFF
        d = f32(1.0) / iscale
        scales[b] = d
        bits = f32_bits(d)
        for i in range(4):
            blocks[b, i] = (bits >> np.uint32(8 * i)) & np.uint32(0xFF)
