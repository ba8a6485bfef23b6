"""The 4-bit float types MXFP4 and NVFP4: e2m1 values times a power-of-two or e4m3 scale.

Element order and arithmetic follow ggml's dequantize_row_mxfp4 / _nvfp4
(ggml-quants.c), which gguf.quants reproduces: our output is bit-exact with both.
Like ggml, both use the e2m1 values doubled (kvalues, integers) and halve the
block scale instead; every scale decoded here is an exact float32.
"""

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from ._jit import kernel, prange, u32_as_f32
from .iquants import put_nibbles, read_only

# (16,) e2m1 values doubled: 0, 1, 2, 3, 4, 6, 8, 12, then 0, -1, .. -12 (sign bit set)
MXFP4_KVALUES = read_only(np.array(quants.MXFP4.kvalues, dtype=np.float32))
NVFP4_KVALUES = read_only(np.array(quants.NVFP4.kvalues, dtype=np.float32))


@kernel
def e8m0_half(e):
    """2^(e - 128): the e8m0 scale 2^(e - 127), halved, as ggml_e8m0_to_fp32_half (ggml-impl.h).
    e = 0 and 1 fall below float32's normal range, so their bits are a subnormal's; e = 255,
    e8m0's NaN, gives 2^127 as in ggml and gguf.quants."""
    if e < 2:
        return u32_as_f32(np.uint32(0x00200000) << np.uint32(e))
    return u32_as_f32(np.uint32(e - 1) << np.uint32(23))


@kernel
def ue4m3_half(x):
    """An unsigned e4m3 scale byte (bias 7; the top bit is ignored) as float32, halved;
    0 and 0x7F (e4m3's NaN) give 0. Same steps as gguf.quants NVFP4.ue4m3_to_fp32,
    each exact in float32."""
    if x == 0 or x == 0x7F:
        return np.float32(0)
    exp = (x >> 3) & 15
    man = np.float32(x & 7)
    if exp == 0:
        raw = man * np.float32(2.0**-9)
    else:
        two_to_exp = u32_as_f32(np.uint32(exp - 7 + 127) << np.uint32(23))  # 2^(exp - 7)
        raw = (np.float32(1) + man / np.float32(8)) * two_to_exp
    return raw * np.float32(0.5)


# MXFP4, 17 bytes: | e: e8m0 | qs: 16 B |
#   x[j] = 2^(e - 128) * MXFP4_KVALUES[qs[j] & 15],  x[16 + j] = ... [qs[j] >> 4]
#   as ggml-quants.c dequantize_row_mxfp4
@kernel(parallel=True)
def dequantize_mxfp4(blocks, out, kvalues):  # (n, 17) uint8 -> (n, 32) float32
    for b in prange(blocks.shape[0]):
        d = e8m0_half(blocks[b, 0])
        for j in range(16):
            put_nibbles(out, b, j, 16, d, blocks[b, 1 + j], kvalues)


# NVFP4, 36 bytes: | d: ue4m3 x 4 | qs: 32 B |
#   4 sub-blocks of 16 values; sub-block s has scale d[s] and bytes qs[8s : 8s + 8], low nibbles first:
#   x[16s + j] = ue4m3_half(d[s]) * NVFP4_KVALUES[qs[8s + j] & 15],  x[16s + 8 + j] = ... [qs[8s + j] >> 4]
#   as ggml-quants.c dequantize_row_nvfp4
@kernel(parallel=True)
def dequantize_nvfp4(blocks, out, kvalues):  # (n, 36) uint8 -> (n, 64) float32
    for b in prange(blocks.shape[0]):
        for s in range(4):
            d = ue4m3_half(blocks[b, s])
            for j in range(8):
                put_nibbles(out, b, 16 * s + j, 8, d, blocks[b, 4 + 8 * s + j], kvalues)


DEQUANTIZE_KERNELS = {
    T.MXFP4: dequantize_mxfp4,
    T.NVFP4: dequantize_nvfp4,
}

KERNEL_TABLES = {
    T.MXFP4: (MXFP4_KVALUES,),
    T.NVFP4: (NVFP4_KVALUES,),
}
