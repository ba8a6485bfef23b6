"""The ternary types TQ1_0 and TQ2_0: weights in {-1, 0, 1} times one f16 scale.

Element order and arithmetic follow ggml's dequantize_row_tq1_0 / _tq2_0
(ggml-quants.c), which gguf.quants reproduces: our output is bit-exact with both.

Each packed byte feeds several elements that lie 4, 16 or 32 apart, so the loops
run over the bytes and, unrolled inside, over the fields of a byte. That leaves
one long loop of contiguous loads and stores for LLVM's loop vectorizer; the
shorter per-field loops would be fully unrolled into scalar code first (numba
runs no SLP vectorizer).
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from ._jit import f16_to_f32, kernel, prange


@kernel
def trit(byte, p):
    """Trit p (0 = the most significant) of a byte packing five base-3 digits as a
    fixed-point fraction of 3^5: multiplying by 3^p (mod 256) brings trit p to the
    top, and `* 3 >> 8` reads it off. Returns 0, 1 or 2."""
    top = (byte * 3**p) & 0xFF
    return (top * 3) >> 8


@kernel
def put_trits(out, b, d, blocks, at, n, n_trits, start):
    """The n bytes at `at` hold n_trits trits each: trit p of byte j is element start + n * p + j."""
    for j in range(n):
        q = blocks[b, at + j]
        for p in range(n_trits):
            out[b, start + n * p + j] = d * np.float32(trit(q, p) - 1)


# TQ1_0, 54 bytes: | qs: 48 B | qh: 4 B | d: f16 |
#   5 trits per qs byte, 4 per qh byte; elements 0..159 from qs[0:32], 160..239 from qs[32:48],
#   240..255 from qh (see put_trits);  x = d * (trit - 1)
#   as ggml-quants.c dequantize_row_tq1_0
@kernel(parallel=True)
def dequantize_tq1_0(blocks, out):  # (n, 54) uint8 -> (n, 256) float32
    for b in prange(blocks.shape[0]):
        d = f16_to_f32(blocks[b, 52], blocks[b, 53])
        put_trits(out, b, d, blocks, 0, 32, 5, 0)
        put_trits(out, b, d, blocks, 32, 16, 5, 160)
        put_trits(out, b, d, blocks, 48, 4, 4, 240)


# TQ2_0, 66 bytes: | qs: 64 B | d: f16 |
#   bits 2s..2s+1 of qs[32h + j] are element 128h + 32s + j;  x = d * (field - 1)
#   as ggml-quants.c dequantize_row_tq2_0
@kernel(parallel=True)
def dequantize_tq2_0(blocks, out):  # (n, 66) uint8 -> (n, 256) float32
    for b in prange(blocks.shape[0]):
        d = f16_to_f32(blocks[b, 64], blocks[b, 65])
        for j in range(32):
            for h in range(2):
                q = blocks[b, 32 * h + j]
                for s in range(4):
                    out[b, 128 * h + 32 * s + j] = d * np.float32(((q >> (2 * s)) & 3) - 1)


DEQUANTIZE_KERNELS = {
    T.TQ1_0: dequantize_tq1_0,
    T.TQ2_0: dequantize_tq2_0,
}
