"""Plain float tensors: F32, F16, BF16. One element per "block"."""

import numpy as np
from gguf import GGMLQuantizationType as T

from ._jit import bf16_to_f32, f16_to_f32, kernel, prange


# F32: 4 bytes, little-endian IEEE single.
@kernel(parallel=True)
def dequantize_f32(blocks, out):  # (n, 4) uint8 -> (n, 1) float32
    src = blocks.reshape(-1).view(np.float32)
    for i in prange(out.shape[0]):
        out[i, 0] = src[i]


# F16: 2 bytes, IEEE half.
@kernel(parallel=True)
def dequantize_f16(blocks, out):  # (n, 2) uint8 -> (n, 1) float32
    for i in prange(out.shape[0]):
        out[i, 0] = f16_to_f32(blocks[i, 0], blocks[i, 1])


# BF16: 2 bytes, the upper half of an IEEE single.
@kernel(parallel=True)
def dequantize_bf16(blocks, out):  # (n, 2) uint8 -> (n, 1) float32
    for i in prange(out.shape[0]):
        out[i, 0] = bf16_to_f32(blocks[i, 0], blocks[i, 1])


DEQUANTIZE_KERNELS = {
    T.F32: dequantize_f32,
    T.F16: dequantize_f16,
    T.BF16: dequantize_bf16,
}
