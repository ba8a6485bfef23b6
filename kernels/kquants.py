"""The k-quants: 256-element super-blocks Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Element order and arithmetic follow ggml's dequantize_row_q*_K (ggml-quants.c),
which gguf.quants reproduces: our output is bit-exact with both. A super-block
holds sub-blocks of 16 or 32 values, each with a small integer scale (and min);
the float32 sub-block scale is formed first, as the reference does: Q4_K is
x = (d * sc) * q - (dmin * m), never d * (sc * q).

The element loops follow the rules in legacy.py's docstring (bound from
`out.shape`, computed inside the prange body; quants narrowed before the float32
cast). Their shift counts are constants, so that LLVM can shift whole vectors of
bytes: a count that varies with a loop variable (`q >> 2 * s`) keeps the lanes
64 bits wide.
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from ._jit import f16_to_f32, kernel, prange


@kernel
def scale_min_k4(blocks, b, j):
    """Sub-block j's 6-bit (scale, min) of a Q4_K/Q5_K block, as ggml's get_scale_min_k4.

    The 12 bytes at 4..15 pack 8 scales and 8 mins: bytes 0-3 hold scales 0-3 and
    bytes 4-7 mins 0-3 in their low 6 bits; scales and mins 4-7 take their low
    nibbles from bytes 8-11 and their top 2 bits from the spare bits of 0-7.
    """
    if j < 4:
        scale = blocks[b, 4 + j] & 63
        min_ = blocks[b, 8 + j] & 63
    else:
        scale = (blocks[b, 8 + j] & 0xF) | ((blocks[b, j] >> 6) << 4)
        min_ = (blocks[b, 8 + j] >> 4) | ((blocks[b, 4 + j] >> 6) << 4)
    # One integer type for both branches: numba would unify int64 with uint64 as float64.
    return np.uint8(scale), np.uint8(min_)


@kernel
def q3_k_scale(blocks, b, k):
    """Sub-block k's signed 6-bit scale of a Q3_K block (as the kmask shuffle in ggml's dequantize_row_q3_K).

    The 12 bytes at 96..107 hold the low nibbles of scales 0-7 and 8-15 in the low
    and high halves of bytes 0-7, and their top 2 bits in bytes 8-11, scale k at
    bit 2 * (k // 4) of byte 8 + k % 4. Stored with a +32 bias.
    """
    low = (blocks[b, 96 + k % 8] >> (4 * (k // 8))) & 0xF
    high = (blocks[b, 104 + k % 4] >> (2 * (k // 4))) & 3
    return np.int8((low | (high << 4)) - 32)


# Q2_K, 84 bytes: | scales: 16 B (scale | min << 4) | qs: 64 B (2-bit) | d: f16 | dmin: f16 |
#   16 sub-blocks of 16: x = (d * scale) * q - (dmin * min), as ggml's dequantize_row_q2_K.
#   Value 128h + 32s + l (h < 2, s < 4, l < 32) is bits 2s, 2s+1 of qs[32h + l]; sub-block 8h + 2s + l // 16.
@kernel(parallel=True)
def dequantize_q2_k(blocks, out):  # (n_blocks, 84) uint8 -> (n_blocks, 256) float32
    for b in prange(blocks.shape[0]):
        sub = out.shape[1] // 16  # 16 values per sub-block
        d = f16_to_f32(blocks[b, 80], blocks[b, 81])
        dmin = f16_to_f32(blocks[b, 82], blocks[b, 83])
        for h in range(2):
            for s in range(4):  # LLVM unrolls these 2 x 4 loops, so 2 * s is a constant shift
                k = 8 * h + 2 * s  # sub-blocks k and k + 1 take 16 bytes of qs each
                d0 = d * np.float32(blocks[b, k] & 0xF)
                m0 = dmin * np.float32(blocks[b, k] >> 4)
                d1 = d * np.float32(blocks[b, k + 1] & 0xF)
                m1 = dmin * np.float32(blocks[b, k + 1] >> 4)
                y = 128 * h + 32 * s
                for l in range(sub):
                    q0 = (blocks[b, 16 + 32 * h + l] >> (2 * s)) & 3
                    q1 = (blocks[b, 32 + 32 * h + l] >> (2 * s)) & 3
                    out[b, y + l] = d0 * np.float32(np.uint8(q0)) - m0
                    out[b, y + 16 + l] = d1 * np.float32(np.uint8(q1)) - m1


# Q3_K, 110 bytes: | hmask: 32 B (3rd bit) | qs: 64 B (low 2 bits) | scales: 12 B (16 x 6-bit) | d: f16 |
#   16 sub-blocks of 16: x = (d * (scale - 32)) * q, q = low 2 bits - (0 if the hmask bit is set else 4),
#   as ggml's dequantize_row_q3_K.
#   Value 128h + 32s + l (h < 2, s < 4, l < 32): bits 2s, 2s+1 of qs[32h + l], bit 4h + s of hmask[l].
@kernel(parallel=True)
def dequantize_q3_k(blocks, out):  # (n_blocks, 110) uint8 -> (n_blocks, 256) float32
    for b in prange(blocks.shape[0]):
        sub = out.shape[1] // 16  # 16 values per sub-block
        d = f16_to_f32(blocks[b, 108], blocks[b, 109])
        for h in range(2):
            for s in range(4):  # unrolled by LLVM, as in Q2_K
                k = 8 * h + 2 * s
                d0 = d * np.float32(q3_k_scale(blocks, b, k))
                d1 = d * np.float32(q3_k_scale(blocks, b, k + 1))
                m = np.uint8(1 << (4 * h + s))  # the hmask bit of these 32 values, as ggml's m
                y = 128 * h + 32 * s
                for l in range(sub):
                    lo0 = (blocks[b, 32 + 32 * h + l] >> (2 * s)) & 3
                    lo1 = (blocks[b, 48 + 32 * h + l] >> (2 * s)) & 3
                    q0 = lo0 - (0 if np.uint8(blocks[b, l] & m) else 4)
                    q1 = lo1 - (0 if np.uint8(blocks[b, 16 + l] & m) else 4)
                    out[b, y + l] = d0 * np.float32(np.int8(q0))
                    out[b, y + 16 + l] = d1 * np.float32(np.int8(q1))


# Q4_K, 144 bytes: | d: f16 | dmin: f16 | scales: 12 B (8 x 6-bit scale, 8 x 6-bit min) | qs: 128 B (4-bit) |
#   8 sub-blocks of 32: x = (d * scale) * q - (dmin * min), as ggml's dequantize_row_q4_K.
#   Value 64c + l is the low nibble of qs[32c + l] (sub-block 2c), value 64c + 32 + l its high one (2c + 1).
@kernel(parallel=True)
def dequantize_q4_k(blocks, out):  # (n_blocks, 144) uint8 -> (n_blocks, 256) float32
    for b in prange(blocks.shape[0]):
        sub = out.shape[1] // 8  # 32 values per sub-block
        d = f16_to_f32(blocks[b, 0], blocks[b, 1])
        dmin = f16_to_f32(blocks[b, 2], blocks[b, 3])
        for c in range(4):
            sc, m = scale_min_k4(blocks, b, 2 * c)
            d0, m0 = d * np.float32(sc), dmin * np.float32(m)
            sc, m = scale_min_k4(blocks, b, 2 * c + 1)
            d1, m1 = d * np.float32(sc), dmin * np.float32(m)
            for l in range(sub):
                q = blocks[b, 16 + 32 * c + l]
                out[b, 64 * c + l] = d0 * np.float32(np.uint8(q & 0xF)) - m0
                out[b, 64 * c + 32 + l] = d1 * np.float32(np.uint8(q >> 4)) - m1


# Q5_K, 176 bytes: | d: f16 | dmin: f16 | scales: 12 B (as Q4_K) | qh: 32 B (bit 4) | qs: 128 B (bits 0-3) |
#   8 sub-blocks of 32: x = (d * scale) * q - (dmin * min), as ggml's dequantize_row_q5_K.
#   Value 64c + l: low nibble of qs[32c + l] | bit 2c of qh[l] << 4; 64c + 32 + l: high nibble, bit 2c + 1.
@kernel(parallel=True)
def dequantize_q5_k(blocks, out):  # (n_blocks, 176) uint8 -> (n_blocks, 256) float32
    for b in prange(blocks.shape[0]):
        sub = out.shape[1] // 8  # 32 values per sub-block
        d = f16_to_f32(blocks[b, 0], blocks[b, 1])
        dmin = f16_to_f32(blocks[b, 2], blocks[b, 3])
        for c in range(4):
            sc, m = scale_min_k4(blocks, b, 2 * c)
            d0, m0 = d * np.float32(sc), dmin * np.float32(m)
            sc, m = scale_min_k4(blocks, b, 2 * c + 1)
            d1, m1 = d * np.float32(sc), dmin * np.float32(m)
            # Test qh against byte masks, as ggml does: shifting qh by 2c would be a variable
            # shift, which LLVM vectorises in 64-bit lanes (the np.uint8 keeps the test in bytes).
            u0, u1 = np.uint8(1 << (2 * c)), np.uint8(2 << (2 * c))
            for l in range(sub):
                q = blocks[b, 48 + 32 * c + l]
                qh = blocks[b, 16 + l]
                q0 = (q & 0xF) | (16 if np.uint8(qh & u0) else 0)
                q1 = (q >> 4) | (16 if np.uint8(qh & u1) else 0)
                out[b, 64 * c + l] = d0 * np.float32(np.uint8(q0)) - m0
                out[b, 64 * c + 32 + l] = d1 * np.float32(np.uint8(q1)) - m1


# Q6_K, 210 bytes: | ql: 128 B (low 4 bits) | qh: 64 B (high 2 bits) | scales: int8 x 16 | d: f16 |
#   16 sub-blocks of 16: x = (d * scale) * (q - 32), as ggml's dequantize_row_q6_K.
#   In half h (128 values, ql[64h:], qh[32h:]), value 32r + l (r < 4, l < 32) takes nibble r // 2 of
#   ql[64h + 32(r % 2) + l] and bits 2r..2r+1 of qh[32h + l]; it is in sub-block 8h + 2r + l // 16.
@kernel(parallel=True)
def dequantize_q6_k(blocks, out):  # (n_blocks, 210) uint8 -> (n_blocks, 256) float32
    for b in prange(blocks.shape[0]):
        sub = out.shape[1] // 16  # 16 values per sub-block
        d = f16_to_f32(blocks[b, 208], blocks[b, 209])
        for h in range(2):
            for g in range(2):  # l in [16g, 16g + 16): the four runs' sub-blocks 8h + g + 2r
                k = 192 + 8 * h + g
                d0 = d * np.float32(np.int8(blocks[b, k]))
                d1 = d * np.float32(np.int8(blocks[b, k + 2]))
                d2 = d * np.float32(np.int8(blocks[b, k + 4]))
                d3 = d * np.float32(np.int8(blocks[b, k + 6]))
                for l in range(16 * g, 16 * g + sub):
                    ql0 = blocks[b, 64 * h + l]
                    ql1 = blocks[b, 64 * h + 32 + l]
                    qh = blocks[b, 128 + 32 * h + l]
                    y = 128 * h + l
                    out[b, y] = d0 * np.float32(np.int8(((ql0 & 0xF) | ((qh & 3) << 4)) - 32))
                    out[b, y + 32] = d1 * np.float32(np.int8(((ql1 & 0xF) | ((qh & 12) << 2)) - 32))
                    out[b, y + 64] = d2 * np.float32(np.int8(((ql0 >> 4) | (qh & 48)) - 32))
                    out[b, y + 96] = d3 * np.float32(np.int8(((ql1 >> 4) | ((qh >> 6) << 4)) - 32))


DEQUANTIZE_KERNELS = {
    T.Q2_K: dequantize_q2_k,
    T.Q3_K: dequantize_q3_k,
    T.Q4_K: dequantize_q4_k,
    T.Q5_K: dequantize_q5_k,
    T.Q6_K: dequantize_q6_k,
}
