"""The legacy 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Element order and arithmetic follow ggml's dequantize_row_* (ggml-quants.c),
which gguf.quants reproduces: our output is bit-exact with both. Every product
and sum is one float32 operation in the reference's order, on quants cast to
float32 first.

How the element loops are written decides whether LLVM vectorises them (the
same rules hold in kquants.py):
  * Their bound is read from `out.shape`, never a literal. LLVM fully unrolls a
    short literal-bound loop before its loop vectoriser runs, and numba turns
    off the SLP vectoriser that would re-vectorise the unrolled code, so
    `range(32)` compiles to 32 scalar converts.
  * That bound is computed inside the prange body. Computed outside, it reaches
    numba's worker function as an unrelated integer, and LLVM then leaves some
    loops scalar (it can no longer bound their index arithmetic).
  * Quants are narrowed (np.int8, np.uint8) right before the float32 cast:
    numba does integer arithmetic in 64 bits, and the narrow cast is what lets
    LLVM use 8- and 32-bit vector lanes instead of 64-bit ones.
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from ._jit import f16_to_f32, kernel, prange


# Q4_0, 18 bytes:  | d: f16 | qs: 16 B, two 4-bit quants a byte |
#   x[i] = d * (lo(qs[i]) - 8),  x[i + 16] = d * (hi(qs[i]) - 8)     i < 16;  as ggml's dequantize_row_q4_0
@kernel(parallel=True)
def dequantize_q4_0(blocks, out):  # (n_blocks, 18) uint8 -> (n_blocks, 32) float32
    for b in prange(blocks.shape[0]):
        half = out.shape[1] // 2
        d = f16_to_f32(blocks[b, 0], blocks[b, 1])
        for i in range(half):
            q = blocks[b, 2 + i]
            out[b, i] = d * np.float32(np.int8((q & 0xF) - 8))
            out[b, half + i] = d * np.float32(np.int8((q >> 4) - 8))


# Q4_1, 20 bytes:  | d: f16 | m: f16 | qs: 16 B, two 4-bit quants a byte |
#   x[i] = d * lo(qs[i]) + m,  x[i + 16] = d * hi(qs[i]) + m          i < 16;  as ggml's dequantize_row_q4_1
@kernel(parallel=True)
def dequantize_q4_1(blocks, out):  # (n_blocks, 20) uint8 -> (n_blocks, 32) float32
    for b in prange(blocks.shape[0]):
        half = out.shape[1] // 2
        d = f16_to_f32(blocks[b, 0], blocks[b, 1])
        m = f16_to_f32(blocks[b, 2], blocks[b, 3])
        for i in range(half):
            q = blocks[b, 4 + i]
            out[b, i] = d * np.float32(np.uint8(q & 0xF)) + m
            out[b, half + i] = d * np.float32(np.uint8(q >> 4)) + m


# Q5_0, 22 bytes:  | d: f16 | qh: u32, bit i = 5th bit of x[i] | qs: 16 B, low 4 bits |
#   x[i] = d * ((lo(qs[i]) | qh_i << 4) - 16),  x[i + 16] = d * ((hi(qs[i]) | qh_(i+16) << 4) - 16)
#   as ggml's dequantize_row_q5_0. `qh >> i` shifts by the loop index, which LLVM vectorises only
#   in 64-bit lanes (4 values per vector, not 8), so Q5_0 and Q5_1 are slower per block than Q4_0, Q4_1.
@kernel(parallel=True)
def dequantize_q5_0(blocks, out):  # (n_blocks, 22) uint8 -> (n_blocks, 32) float32
    for b in prange(blocks.shape[0]):
        half = out.shape[1] // 2
        d = f16_to_f32(blocks[b, 0], blocks[b, 1])
        qh = blocks[b, 2] | (blocks[b, 3] << 8) | (blocks[b, 4] << 16) | (blocks[b, 5] << 24)
        for i in range(half):
            q = blocks[b, 6 + i]
            lo = (q & 0xF) | (((qh >> i) & 1) << 4)
            hi = (q >> 4) | (((qh >> (half + i)) & 1) << 4)
            out[b, i] = d * np.float32(np.int8(lo - 16))
            out[b, half + i] = d * np.float32(np.int8(hi - 16))


# Q5_1, 24 bytes:  | d: f16 | m: f16 | qh: u32, bit i = 5th bit of x[i] | qs: 16 B, low 4 bits |
#   x[i] = d * (lo(qs[i]) | qh_i << 4) + m,  x[i + 16] = d * (hi(qs[i]) | qh_(i+16) << 4) + m
#   as ggml's dequantize_row_q5_1
@kernel(parallel=True)
def dequantize_q5_1(blocks, out):  # (n_blocks, 24) uint8 -> (n_blocks, 32) float32
    for b in prange(blocks.shape[0]):
        half = out.shape[1] // 2
        d = f16_to_f32(blocks[b, 0], blocks[b, 1])
        m = f16_to_f32(blocks[b, 2], blocks[b, 3])
        qh = blocks[b, 4] | (blocks[b, 5] << 8) | (blocks[b, 6] << 16) | (blocks[b, 7] << 24)
        for i in range(half):
            q = blocks[b, 8 + i]
            lo = (q & 0xF) | (((qh >> i) & 1) << 4)
            hi = (q >> 4) | (((qh >> (half + i)) & 1) << 4)
            out[b, i] = d * np.float32(np.uint8(lo)) + m
            out[b, half + i] = d * np.float32(np.uint8(hi)) + m


# Q8_0, 34 bytes:  | d: f16 | qs: int8 x 32 |      x[i] = d * qs[i];  as ggml's dequantize_row_q8_0
@kernel(parallel=True)
def dequantize_q8_0(blocks, out):  # (n_blocks, 34) uint8 -> (n_blocks, 32) float32
    for b in prange(blocks.shape[0]):
        d = f16_to_f32(blocks[b, 0], blocks[b, 1])
        for i in range(out.shape[1]):
            out[b, i] = d * np.float32(np.int8(blocks[b, 2 + i]))


DEQUANTIZE_KERNELS = {
    T.Q4_0: dequantize_q4_0,
    T.Q4_1: dequantize_q4_1,
    T.Q5_0: dequantize_q5_0,
    T.Q5_1: dequantize_q5_1,
    T.Q8_0: dequantize_q8_0,
}
