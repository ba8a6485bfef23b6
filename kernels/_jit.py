"""The one place where numba's decorator and its flags are chosen, plus the
few scalar bit tricks every block decoder needs.

Every kernel in this folder is compiled through `kernel`, so the flags that
decide exactness (no fastmath: no reassociation, no fused multiply-add) and
start-up time (cache=True) are set once for all of them.
"""

import hashlib
import os
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types  # noqa: F401  (prange is re-exported for kernels)
from numba.core import cgutils
from numba.extending import intrinsic


def source_digest(folder: Path = Path(__file__).parent) -> str:
    """A digest of every kernel module's source: the key of the compiled code that matches it."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# numba invalidates a cached kernel when its own source file changes, not when a function it calls
# from another file does (a half-to-float in _jit.py, a SIMD intrinsic in simd.py): the old machine
# code would keep running. So the cache lives in a folder named by the digest of all of this
# package's sources, and any change to any of them starts a new one. NUMBA_CACHE_DIR, if the user
# set it, is theirs to keep consistent.
if not os.environ.get("NUMBA_CACHE_DIR"):
    numba.config.CACHE_DIR = str(Path(__file__).parent / "__pycache__" / f"numba-{source_digest()}")

_FLAGS = dict(
    cache=True,  # the second process loads machine code from the cache instead of compiling (see above)
    nogil=True,  # NUMA worker threads run kernels concurrently
    fastmath=False,  # bit-exact results need IEEE order of operations, with no FMA contraction
    error_model="numpy",  # no Python exception checks inside loops, so LLVM can vectorise them
    boundscheck=False,
)


# The fastmath flags of a reduction kernel (a dot product). Its float sum only
# vectorises if LLVM may reorder it: a vector loop keeps several partial sums and
# adds them up at the end. "reassoc" permits that, "contract" lets a multiply and
# its add fuse into one FMA (one rounding instead of two), "nsz" lets the sum
# start from +0.0 whatever the sign of the first product. None of them allows
# an approximate operation (no "afn", "arcp") or assumes away NaN and inf
# ("nnan", "ninf"): a NaN weight still gives a NaN output.
_REASSOCIATE_FLAGS = {"reassoc", "contract", "nsz"}


def kernel(fn=None, *, parallel=False, reassociate=False, inline=False):
    """Compile `fn` as a refengine kernel.

    parallel=True enables `prange`, which kernels use only over independent
    outputs (blocks or rows).

    reassociate=True is for reduction kernels (gemv.py) and only them: it
    compiles with the fastmath flags in _REASSOCIATE_FLAGS, so float sums are
    vectorised in a different order from the source's and are no longer
    bit-reproducible against a sequential reference (they stay within float32
    rounding of it). Dequantization kernels keep the exact default.

    inline=True inlines `fn` into its callers in numba's own IR, where it takes
    the caller's flags: for a helper called once per row of a parallel loop,
    whose call (a dozen array structs passed by value) LLVM judges too big to
    inline and which then costs as much as a short row's work (gemv_ggml.py).
    """
    flags = dict(_FLAGS, fastmath=_REASSOCIATE_FLAGS) if reassociate else _FLAGS

    def wrap(f):
        return njit(parallel=parallel, inline="always" if inline else "never", **flags)(f)

    return wrap(fn) if fn is not None else wrap


@intrinsic
def prefetch(typingctx, arr, i, j):
    """Ask the CPU to start loading the cache line that holds arr[i, j] (a 2-D C-contiguous array).

    LLVM's llvm.prefetch (read, keep in all cache levels): a hint with no effect on
    results, which never faults, so (i, j) may point past the array's end, and j
    past the end of row i means the same byte as in a flat view of the array.
    Streaming kernels call it a few hundred bytes to a few KB ahead of the block
    they decode, so the line is already in flight when they reach it: the
    hardware prefetcher stops at every 4 KB page and restarts slowly, and at the
    start of every call. Measured +20-30% on streaming dequantization (Q4_K,
    Q6_K, Q8_0, 2 threads); see gemv.py for the figures there.
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and arr.layout == "C"):
        return None
    if not (isinstance(i, types.Integer) and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        indices = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:], strict=True)]
        pointer = cgutils.get_item_pointer2(
            context,
            builder,
            data=array.data,
            shape=cgutils.unpack_tuple(builder, array.shape),
            strides=cgutils.unpack_tuple(builder, array.strides),
            layout=array_type.layout,
            inds=indices,
            wraparound=False,
        )
        i8_ptr = ir.PointerType(ir.IntType(8))
        i32 = ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [i8_ptr, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0")
        # arguments: address, 0 = read, 3 = high temporal locality (all cache levels), 1 = data cache
        builder.call(fn, [builder.bitcast(pointer, i8_ptr), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(arr, i, j), codegen


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
