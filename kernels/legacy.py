"""The legacy 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Element order and arithmetic follow ggml's dequantize_row_* (ggml-quants.c),
which gguf.quants reproduces: our output is bit-exact with both.
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from ._jit import f16_to_f32, kernel, prange


# Q8_0, 34 bytes:  | d: f16 | qs: int8 x 32 |      x[i] = d * qs[i]
@kernel(parallel=True)
def dequantize_q8_0(blocks, out):  # (n_blocks, 34) uint8 -> (n_blocks, 32) float32
    for b in prange(blocks.shape[0]):
        d = f16_to_f32(blocks[b, 0], blocks[b, 1])
        qs = blocks[b, 2:34].view(np.int8)
        for i in range(32):
            out[b, i] = d * np.float32(qs[i])


DEQUANTIZE_KERNELS = {
    T.Q8_0: dequantize_q8_0,
}
