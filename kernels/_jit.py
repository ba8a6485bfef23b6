"""The one place where numba's decorator and its flags are chosen, plus the
few scalar bit tricks every block decoder needs.

Every kernel in this folder is compiled through `kernel`, so the flags that
decide exactness (no fastmath: no reassociation, no fused multiply-add) and
start-up time (cache=True) are set once for all of them.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types  # noqa: F401  (prange is re-exported for kernels)
from numba.extending import intrinsic

_FLAGS = dict(
    cache=True,  # the second process loads machine code from __pycache__ instead of compiling
    nogil=True,  # NUMA worker threads run kernels concurrently
    fastmath=False,  # bit-exact results need IEEE order of operations, with no FMA contraction
    error_model="numpy",  # no Python exception checks inside loops, so LLVM can vectorise them
    boundscheck=False,
)


def kernel(fn=None, *, parallel=False):
    """Compile `fn` as a refengine kernel.

    parallel=True enables `prange`, which kernels use only over independent
    outputs (blocks or rows).
    """

    def wrap(f):
        return njit(parallel=parallel, **_FLAGS)(f)

    return wrap(fn) if fn is not None else wrap


@intrinsic
def u32_as_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as an IEEE float32 (a bitcast, no conversion)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        i32 = ir.IntType(32)
        width = bits.bitwidth
        if width > 32:
            value = builder.trunc(value, i32)
        elif width < 32:
            value = builder.zext(value, i32)
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@kernel
def f16_to_f32(lo, hi):
    """IEEE half (two little-endian bytes) to float32, exactly as numpy's
    float16 -> float32 cast, NaN payloads and subnormals included."""
    h = np.uint32(lo) | (np.uint32(hi) << np.uint32(8))
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exp = h & np.uint32(0x7C00)
    mant = h & np.uint32(0x03FF)
    if exp == np.uint32(0x7C00):  # inf or NaN: keep the payload
        return u32_as_f32(sign | np.uint32(0x7F800000) | (mant << np.uint32(13)))
    if exp == np.uint32(0):
        if mant == np.uint32(0):
            return u32_as_f32(sign)
        # subnormal half: normalise the mantissa into a float32 exponent
        e = np.uint32(113)  # 127 - 15 + 1
        while (mant & np.uint32(0x0400)) == np.uint32(0):
            mant <<= np.uint32(1)
            e -= np.uint32(1)
        mant &= np.uint32(0x03FF)
        return u32_as_f32(sign | (e << np.uint32(23)) | (mant << np.uint32(13)))
    return u32_as_f32(sign | ((exp + np.uint32(0x1C000)) << np.uint32(13)) | (mant << np.uint32(13)))


@kernel
def bf16_to_f32(lo, hi):
    """bfloat16 (two little-endian bytes) to float32: the top half of the float's bits."""
    return u32_as_f32((np.uint32(lo) << np.uint32(16)) | (np.uint32(hi) << np.uint32(24)))

