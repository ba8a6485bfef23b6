"""Integer SIMD for numba kernels: 32-byte vectors and the CPU's byte dot product.

ggml's CPU kernels multiply 8-bit quants by 8-bit activations and sum the products in
32-bit integers, 32 bytes an instruction (arch/x86/quants.c, `mul_sum_us8_pairs_float`).
numba has no vector types and LLVM does not find those instructions in a scalar loop, so
this module gives kernels two vector types and the few operations on them they need, each
an @intrinsic that writes the LLVM IR itself:

    Bytes32   <32 x i8>   32 quants or activations (signed or not: the operation says)
    Int32x8   <8 x i32>   8 partial sums; lane k holds the sum over bytes 4k .. 4k+3
    Float32x8 <8 x float> 8 float sums, as ggml's __m256 accumulators

The one that matters, `dot_bytes(acc, u, s)`, adds the products of unsigned bytes `u` and
signed bytes `s` to `acc`, four products a lane. It compiles to

    avx512vnni, avxvnni   vpdpbusd                (llvm.x86.avx512.vpdpbusd.256)
    avx2                  vpmaddubsw + vpmaddwd   (as ggml without VNNI)
    generic               widen, multiply, add    (plain LLVM IR, for any CPU)

All three give the same integers, lane for lane, while every pair of products fits an
int16 (vpmaddubsw saturates there): |u| * |s| * 2 <= 32767, true of every caller (quants
of at most 7 bits against activations in [-127, 127], or 128 x 127 for the sign trick).

SIMD_LEVEL is chosen once, at import, from the CPU numba compiles for: the host, or
NUMBA_CPU_NAME / NUMBA_CPU_FEATURES when set (the two-node test guest compiles for
x86-64-v3, which has AVX2 but no VNNI). An instruction the target lacks would stop LLVM
with "Cannot select", so anything not recognised gets the generic IR. numba's on-disk
cache is keyed by the same CPU name and features, so a cached kernel always matches the
level chosen here.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model

# CPUs known by name when NUMBA_CPU_NAME is set and NUMBA_CPU_FEATURES is empty (LLVM then takes
# the name's own features): the x86-64 micro-architecture levels.
_NAMED_LEVELS = {"x86-64-v3": "avx2", "x86-64-v4": "avx2"}


def _target_features() -> tuple[str, set[str]]:
    """(CPU name, enabled features) numba compiles for, as numba.core.codegen chooses them."""
    name = config.CPU_NAME or llvm.get_host_cpu_name()
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm.get_host_cpu_features().flatten()
    return name, {f[1:] for f in features.split(",") if f.startswith("+")}


def simd_level(name: str, features: set[str]) -> str:
    """The dot-product instructions a target has: avx512vnni, avxvnni, avx2 or generic."""
    if not features:
        return _NAMED_LEVELS.get(name, "generic")
    if {"avx512vnni", "avx512vl"} <= features:
        return "avx512vnni"
    if "avxvnni" in features:
        return "avxvnni"
    if "avx2" in features:
        return "avx2"
    return "generic"


TARGET_CPU, TARGET_FEATURES = _target_features()
SIMD_LEVEL = simd_level(TARGET_CPU, TARGET_FEATURES)
# F16C (vcvtps2ph) rounds float32 to half in one instruction: ggml-cpu's GGML_CPU_FP32_TO_FP16 on x86.
HAS_F16C = "f16c" in TARGET_FEATURES or SIMD_LEVEL != "generic"


# ---------------------------------------------------------------- the vector types

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V32I8 = ir.VectorType(_I8, 32)
_V16I8 = ir.VectorType(_I8, 16)
_V16I16 = ir.VectorType(_I16, 16)
_V8I32 = ir.VectorType(_I32, 8)
_V8F32 = ir.VectorType(ir.FloatType(), 8)


class Bytes32Type(types.Type):
    def __init__(self):
        super().__init__(name="Bytes32")


class Int32x8Type(types.Type):
    def __init__(self):
        super().__init__(name="Int32x8")


class Float32x8Type(types.Type):
    def __init__(self):
        super().__init__(name="Float32x8")


Bytes32 = Bytes32Type()
Int32x8 = Int32x8Type()
Float32x8 = Float32x8Type()


@register_model(Bytes32Type)
class _Bytes32Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V32I8)


@register_model(Int32x8Type)
class _Int32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8I32)


@register_model(Float32x8Type)
class _Float32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8F32)


def _splat(value: ir.Value | ir.Constant, vector_type: ir.VectorType, builder: ir.IRBuilder):
    """`value` in every lane of `vector_type`."""
    one = builder.insert_element(ir.Constant(ir.VectorType(vector_type.element, 1), None), value, _I32(0))
    return builder.shuffle_vector(
        one, one, _const_vector(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count)
    )


def _const_vector(vector_type: ir.VectorType, values) -> ir.Constant:
    return ir.Constant(vector_type, [vector_type.element(v) for v in values])


def _element_pointer(context, builder, array_type, array_value, indices, index_types, pointee):
    """A `pointee *` to array[i, j] (2-D C-contiguous), no bounds check: the caller's kernel has them."""
    array = context.make_array(array_type)(context, builder, array_value)
    indices = [context.cast(builder, v, t, types.intp) for v, t in zip(indices, index_types, strict=True)]
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
    return builder.bitcast(pointer, pointee.as_pointer())


def _is_byte_matrix(arr) -> bool:
    return (
        isinstance(arr, types.Array)
        and arr.ndim == 2
        and arr.layout == "C"
        and isinstance(arr.dtype, types.Integer)
        and arr.dtype.bitwidth == 8
    )


def _are_integers(*values) -> bool:
    return all(isinstance(v, types.Integer) for v in values)


def _intrinsic_call(builder, name: str, return_type, args):
    fn_type = ir.FunctionType(return_type, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fn_type, name), args)


# ---------------------------------------------------------------- loads


@intrinsic
def load_bytes(typingctx, arr, i, j):
    """The 32 bytes arr[i, j : j + 32] of a 2-D C-contiguous int8/uint8 array (may run into row i + 1)."""
    if not (_is_byte_matrix(arr) and _are_integers(i, j)):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:], signature.args[1:], _V32I8)
        return builder.load(pointer, align=1)

    return Bytes32(arr, i, j), codegen


@intrinsic
def load_nibbles(typingctx, arr, i, j):
    """The 16 bytes at arr[i, j] split into 32 four-bit values: bytes 0-15 the low nibbles, 16-31
    the high ones. The legacy blocks' order (value l and value l + 16 share byte l), as ggml's
    bytes_from_nibbles_32."""
    if not (_is_byte_matrix(arr) and _are_integers(i, j)):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:], signature.args[1:], _V16I8)
        packed = builder.load(pointer, align=1)
        low = builder.and_(packed, _const_vector(_V16I8, [0x0F] * 16))
        high = builder.lshr(packed, _const_vector(_V16I8, [4] * 16))
        return builder.shuffle_vector(low, high, _const_vector(ir.VectorType(_I32, 32), range(32)))

    return Bytes32(arr, i, j), codegen


@intrinsic
def load_u16(typingctx, arr, i, j):
    """The little-endian uint16 at arr[i, j : j + 2] of a 2-D byte array: one load, where numba's
    indexing would read two bytes, each with its negative-index check."""
    if not (_is_byte_matrix(arr) and _are_integers(i, j)):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(
            _element_pointer(context, builder, signature.args[0], args[0], args[1:], signature.args[1:], _I16), align=1
        )

    return types.uint16(arr, i, j), codegen


@intrinsic
def load_u32(typingctx, arr, i, j):
    """The little-endian uint32 at arr[i, j : j + 4] of a 2-D byte array, in one load."""
    if not (_is_byte_matrix(arr) and _are_integers(i, j)):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(
            _element_pointer(context, builder, signature.args[0], args[0], args[1:], signature.args[1:], _I32), align=1
        )

    return types.uint32(arr, i, j), codegen


# ---------------------------------------------------------------- byte arithmetic


@intrinsic
def ones_bytes(typingctx):
    """32 bytes of 1: dot_bytes(acc, ones_bytes(), s) adds up s four bytes a lane."""

    def codegen(context, builder, signature, args):
        return _const_vector(_V32I8, [1] * 32)

    return Bytes32(), codegen


@intrinsic
def low_nibbles(typingctx, v):
    """Each byte's low four bits."""
    if v is not Bytes32:
        return None

    def codegen(context, builder, signature, args):
        return builder.and_(args[0], _const_vector(_V32I8, [0x0F] * 32))

    return Bytes32(v), codegen


@intrinsic
def high_nibbles(typingctx, v):
    """Each byte's high four bits, shifted down."""
    if v is not Bytes32:
        return None

    def codegen(context, builder, signature, args):
        return builder.lshr(args[0], _const_vector(_V32I8, [4] * 32))

    return Bytes32(v), codegen


@intrinsic
def shift_right(typingctx, v, n):
    """Each byte shifted right (logical) by n bits, n a constant in 0..7 in practice."""
    if not (v is Bytes32 and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        count = builder.trunc(args[1], _I8) if signature.args[1].bitwidth > 8 else args[1]
        return builder.lshr(args[0], _splat(count, _V32I8, builder))

    return Bytes32(v, n), codegen


@intrinsic
def shift_left(typingctx, v, n):
    """Each byte shifted left by n bits (bits leaving the byte are lost)."""
    if not (v is Bytes32 and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        count = builder.trunc(args[1], _I8) if signature.args[1].bitwidth > 8 else args[1]
        return builder.shl(args[0], _splat(count, _V32I8, builder))

    return Bytes32(v, n), codegen


@intrinsic
def mask_bytes(typingctx, v, mask):
    """Each byte AND `mask`."""
    if not (v is Bytes32 and isinstance(mask, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        m = builder.trunc(args[1], _I8) if signature.args[1].bitwidth > 8 else args[1]
        return builder.and_(args[0], _splat(m, _V32I8, builder))

    return Bytes32(v, mask), codegen


@intrinsic
def bit_bytes(typingctx, v, bit, value):
    """Per byte: `value` where (byte AND bit) is non-zero, else 0. Puts a quant's high bit in place."""
    if not (v is Bytes32 and _are_integers(bit, value)):
        return None

    def codegen(context, builder, signature, args):
        bits = [
            builder.trunc(a, _I8) if t.bitwidth > 8 else a for a, t in zip(args[1:], signature.args[1:], strict=True)
        ]
        test = builder.and_(args[0], _splat(bits[0], _V32I8, builder))
        is_set = builder.icmp_unsigned("!=", test, ir.Constant(_V32I8, None))
        return builder.select(is_set, _splat(bits[1], _V32I8, builder), ir.Constant(_V32I8, None))

    return Bytes32(v, bit, value), codegen


@intrinsic
def bits_to_bytes(typingctx, bits, value):
    """32 bits (a uint32) to 32 bytes: byte l is `value` where bit l is set, else 0 (ggml's
    bytes_from_bits_32, for the fifth bit of Q5_0 / Q5_1)."""
    if not _are_integers(bits, value):
        return None

    def codegen(context, builder, signature, args):
        word = builder.trunc(args[0], _I32) if signature.args[0].bitwidth > 32 else args[0]
        if signature.args[0].bitwidth < 32:
            word = builder.zext(word, _I32)
        value8 = builder.trunc(args[1], _I8) if signature.args[1].bitwidth > 8 else args[1]
        as_bytes = builder.bitcast(_splat(word, _V8I32, builder), _V32I8)  # bytes b0 b1 b2 b3, 8 times
        spread = builder.shuffle_vector(
            as_bytes, as_bytes, _const_vector(ir.VectorType(_I32, 32), [l // 8 for l in range(32)])
        )
        test = builder.and_(spread, _const_vector(_V32I8, [1 << (l % 8) for l in range(32)]))
        is_set = builder.icmp_unsigned("!=", test, ir.Constant(_V32I8, None))
        return builder.select(is_set, _splat(value8, _V32I8, builder), ir.Constant(_V32I8, None))

    return Bytes32(bits, value), codegen


@intrinsic
def or_bytes(typingctx, a, b):
    if not (a is Bytes32 and b is Bytes32):
        return None

    def codegen(context, builder, signature, args):
        return builder.or_(args[0], args[1])

    return Bytes32(a, b), codegen


# ---------------------------------------------------------------- dot products


def _dot_unsigned_signed(builder, acc, u, s):
    """acc + lane sums of u (unsigned bytes) x s (signed bytes), four products a lane."""
    if SIMD_LEVEL in ("avx512vnni", "avxvnni"):
        return _intrinsic_call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [acc, u, s])
    if SIMD_LEVEL == "avx2":
        pairs = _intrinsic_call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [u, s])
        quads = _intrinsic_call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [pairs, _const_vector(_V16I16, [1] * 16)])
        return builder.add(acc, quads)
    wide = ir.VectorType(_I32, 32)
    products = builder.mul(builder.zext(u, wide), builder.sext(s, wide))
    total = acc
    for k in range(4):  # lane l gets products 4l + k
        part = builder.shuffle_vector(
            products, products, _const_vector(ir.VectorType(_I32, 8), [4 * l + k for l in range(8)])
        )
        total = builder.add(total, part)
    return total


@intrinsic
def dot_bytes(typingctx, acc, u, s):
    """acc + (u . s) in 8 lanes: lane k gains u[4k + i] * s[4k + i], i < 4; u unsigned, s signed bytes."""
    if not (acc is Int32x8 and u is Bytes32 and s is Bytes32):
        return None

    def codegen(context, builder, signature, args):
        return _dot_unsigned_signed(builder, *args)

    return Int32x8(acc, u, s), codegen


@intrinsic
def dot_signed_bytes(typingctx, acc, a, b):
    """acc + (a . b) for two vectors of signed bytes, by ggml's sign trick (mul_sum_i8_pairs_float):
    |a| (unsigned) times b with a's sign, so the unsigned-by-signed instruction applies."""
    if not (acc is Int32x8 and a is Bytes32 and b is Bytes32):
        return None

    def codegen(context, builder, signature, args):
        acc_value, a_value, b_value = args
        zero = ir.Constant(_V32I8, None)
        negative = builder.icmp_signed("<", a_value, zero)
        magnitude = builder.select(negative, builder.sub(zero, a_value), a_value)  # -(-128) wraps to 128 unsigned
        signed_b = builder.select(negative, builder.sub(zero, b_value), b_value)
        return _dot_unsigned_signed(builder, acc_value, magnitude, signed_b)

    return Int32x8(acc, a, b), codegen


@intrinsic
def dot_bytes_scaled(typingctx, acc, u, s, low, high):
    """acc + (u . s) * scale in 8 lanes, scale = `low` for bytes 0-15 (lanes 0-3) and `high` for bytes
    16-31 (lanes 4-7): the products of a sub-block's quants and activations, times its integer scale
    (one 32-value sub-block: low == high; two of 16 values: their two scales). ggml's
    _mm256_madd_epi16(scale, _mm256_maddubs_epi16(q, y)); with VNNI the multiply by the scale and the
    add are one vpdpwssd. Exact while u * s pairs fit an int16 (as dot_bytes) and the lanes an int32."""
    if not (acc is Int32x8 and u is Bytes32 and s is Bytes32 and _are_integers(low, high)):
        return None

    def codegen(context, builder, signature, args):
        acc_value, u_value, s_value = args[:3]
        scales = [_as_i32(builder, a, t) for a, t in zip(args[3:], signature.args[3:], strict=True)]
        if SIMD_LEVEL == "generic":
            pair = builder.insert_element(ir.Constant(ir.VectorType(_I32, 2), None), scales[0], _I32(0))
            pair = builder.insert_element(pair, scales[1], _I32(1))
            lanes = _dot_unsigned_signed(builder, ir.Constant(_V8I32, None), u_value, s_value)
            return builder.add(acc_value, builder.mul(lanes, _pick(builder, pair, [0] * 4 + [1] * 4)))
        pair = builder.insert_element(
            ir.Constant(ir.VectorType(_I16, 2), None), builder.trunc(scales[0], _I16), _I32(0)
        )
        pair = builder.insert_element(pair, builder.trunc(scales[1], _I16), _I32(1))
        scale16 = _pick(builder, pair, [0] * 8 + [1] * 8)
        pairs = _intrinsic_call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [u_value, s_value])
        if SIMD_LEVEL in ("avx512vnni", "avxvnni"):
            return _intrinsic_call(builder, "llvm.x86.avx512.vpdpwssd.256", _V8I32, [acc_value, pairs, scale16])
        return builder.add(acc_value, _intrinsic_call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [pairs, scale16]))

    return Int32x8(acc, u, s, low, high), codegen


# ---------------------------------------------------------------- 32-bit lanes


@intrinsic
def zero_lanes(typingctx):
    """An Int32x8 of zeros."""

    def codegen(context, builder, signature, args):
        return ir.Constant(_V8I32, None)

    return Int32x8(), codegen


@intrinsic
def add_lanes(typingctx, a, b):
    if not (a is Int32x8 and b is Int32x8):
        return None

    def codegen(context, builder, signature, args):
        return builder.add(args[0], args[1])

    return Int32x8(a, b), codegen


def _as_i32(builder, value, value_type):
    """An integer argument as i32 (sign-extended or truncated)."""
    if value_type.bitwidth > 32:
        return builder.trunc(value, _I32)
    if value_type.bitwidth < 32:
        return builder.sext(value, _I32) if value_type.signed else builder.zext(value, _I32)
    return value


def _is_int32_matrix(arr) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 2 and arr.layout == "C" and arr.dtype == types.int32


@intrinsic
def load_lanes(typingctx, arr, i, j):
    """The 8 int32 arr[i, j : j + 8] of a 2-D C-contiguous int32 array."""
    if not (_is_int32_matrix(arr) and _are_integers(i, j)):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:], signature.args[1:], _V8I32)
        return builder.load(pointer, align=4)

    return Int32x8(arr, i, j), codegen


@intrinsic
def widen_bytes(typingctx, arr, i, j):
    """The 8 bytes arr[i, j : j + 8] of a 2-D byte array, as int32 lanes: sign-extended if the
    array is int8, zero-extended if uint8."""
    if not (_is_byte_matrix(arr) and _are_integers(i, j)):
        return None

    def codegen(context, builder, signature, args):
        v8i8 = ir.VectorType(_I8, 8)
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:], signature.args[1:], v8i8)
        loaded = builder.load(pointer, align=1)
        return builder.sext(loaded, _V8I32) if signature.args[0].dtype.signed else builder.zext(loaded, _V8I32)

    return Int32x8(arr, i, j), codegen


@intrinsic
def store_lanes(typingctx, arr, i, j, v):
    """arr[i, j : j + 8] = v, for a 2-D C-contiguous int32 array."""
    if not (_is_int32_matrix(arr) and _are_integers(i, j) and v is Int32x8):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:3], signature.args[1:3], _V8I32)
        builder.store(args[3], pointer, align=4)
        return context.get_dummy_value()

    return types.none(arr, i, j, v), codegen


@intrinsic
def mul_lanes(typingctx, a, b):
    if not (a is Int32x8 and b is Int32x8):
        return None

    def codegen(context, builder, signature, args):
        return builder.mul(args[0], args[1])

    return Int32x8(a, b), codegen


@intrinsic
def and_lanes(typingctx, v, mask):
    if not (v is Int32x8 and isinstance(mask, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.and_(args[0], _splat(_as_i32(builder, args[1], signature.args[1]), _V8I32, builder))

    return Int32x8(v, mask), codegen


@intrinsic
def shift_lanes_right(typingctx, v, n):
    """Each lane shifted right (logical) by n bits."""
    if not (v is Int32x8 and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.lshr(args[0], _splat(_as_i32(builder, args[1], signature.args[1]), _V8I32, builder))

    return Int32x8(v, n), codegen


@intrinsic
def lane(typingctx, v, k):
    """Lane k of v, as an int32 (k is constant once LLVM has unrolled the caller's loop)."""
    if not (v is Int32x8 and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], _as_i32(builder, args[1], signature.args[1]))

    return types.int32(v, k), codegen


def _k4_bytes(context, builder, signature, args):
    """The 16 bytes at arr[i, j] (12 used) of a Q4_K / Q5_K block's packed scales, as <16 x i8>."""
    pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:], signature.args[1:], _V16I8)
    return builder.load(pointer, align=1)


def _pick(builder, v, indices):
    return builder.shuffle_vector(v, v, _const_vector(ir.VectorType(_I32, len(indices)), indices))


def _bytes8(values):
    return _const_vector(ir.VectorType(_I8, 8), values)


@intrinsic
def k4_scales(typingctx, arr, i, j):
    """The 8 six-bit sub-block scales of a Q4_K / Q5_K block whose 12 scale bytes are arr[i, j : j + 12]
    (reads 16 bytes), as ggml's get_scale_min_k4: scale k < 4 is s[k] & 63, scale k >= 4 is
    (s[k + 4] & 15) | (s[k - 4] >> 6) << 4."""
    if not (_is_byte_matrix(arr) and _are_integers(i, j)):
        return None

    def codegen(context, builder, signature, args):
        s = _k4_bytes(context, builder, signature, args)
        low = builder.and_(_pick(builder, s, [0, 1, 2, 3, 8, 9, 10, 11]), _bytes8([63] * 4 + [15] * 4))
        top = builder.shl(builder.lshr(_pick(builder, s, [0, 1, 2, 3, 0, 1, 2, 3]), _bytes8([6] * 8)), _bytes8([4] * 8))
        top = builder.and_(top, _bytes8([0] * 4 + [0x30] * 4))
        return builder.zext(builder.or_(low, top), _V8I32)

    return Int32x8(arr, i, j), codegen


@intrinsic
def k4_mins(typingctx, arr, i, j):
    """The 8 six-bit sub-block mins of a Q4_K / Q5_K block (scale bytes at arr[i, j : j + 12]):
    min k < 4 is s[k + 4] & 63, min k >= 4 is (s[k + 4] >> 4) | (s[k] >> 6) << 4."""
    if not (_is_byte_matrix(arr) and _are_integers(i, j)):
        return None

    def codegen(context, builder, signature, args):
        s = _k4_bytes(context, builder, signature, args)
        low = builder.lshr(_pick(builder, s, [4, 5, 6, 7, 8, 9, 10, 11]), _bytes8([0] * 4 + [4] * 4))
        low = builder.and_(low, _bytes8([63] * 4 + [15] * 4))
        top = builder.shl(builder.lshr(_pick(builder, s, [4, 5, 6, 7, 4, 5, 6, 7]), _bytes8([6] * 8)), _bytes8([4] * 8))
        top = builder.and_(top, _bytes8([0] * 4 + [0x30] * 4))
        return builder.zext(builder.or_(low, top), _V8I32)

    return Int32x8(arr, i, j), codegen


@intrinsic
def q3k_scales(typingctx, arr, i, j, half):
    """Scales 8 half .. 8 half + 7 of a Q3_K block whose 12 scale bytes are arr[i, j : j + 12], as
    signed int32 (six bits, stored +32): scale k has the low nibble (s[k % 8] >> 4 (k // 8)) and the
    top two bits (s[8 + k % 4] >> 2 (k // 4)), as ggml's kmask shuffle. Reads arr[i, j - 2 : j + 14],
    all inside the 110-byte block (the 12 bytes end 2 bytes before it does)."""
    if not (_is_byte_matrix(arr) and _are_integers(i, j, half)):
        return None

    def codegen(context, builder, signature, args):
        v16i8 = _V16I8
        start = builder.sub(_as_i32(builder, args[2], signature.args[2]), _I32(2))
        pointer = _element_pointer(
            context, builder, signature.args[0], args[0], [args[1], start], [signature.args[1], types.int32], v16i8
        )
        s = builder.load(pointer, align=1)  # s[t] is byte t + 2
        h = builder.trunc(_as_i32(builder, args[3], signature.args[3]), _I8)
        four_h = builder.shl(h, _I8(2))
        low = builder.lshr(_pick(builder, s, [2, 3, 4, 5, 6, 7, 8, 9]), _splat(four_h, ir.VectorType(_I8, 8), builder))
        low = builder.and_(low, _bytes8([15] * 8))
        shifts = builder.add(_splat(four_h, ir.VectorType(_I8, 8), builder), _bytes8([0] * 4 + [2] * 4))
        top = builder.and_(builder.lshr(_pick(builder, s, [10, 11, 12, 13, 10, 11, 12, 13]), shifts), _bytes8([3] * 8))
        value = builder.zext(builder.or_(low, builder.shl(top, _bytes8([4] * 8))), _V8I32)
        return builder.sub(value, _const_vector(_V8I32, [32] * 8))

    return Int32x8(arr, i, j, half), codegen


@intrinsic
def pair_products(typingctx, arr, i, j, sums, b):
    """Lane k = arr[i, j + 2k] * sums[b, 2k] + arr[i, j + 2k + 1] * sums[b, 2k + 1], k = 0..7: 16 bytes of a
    2-D byte array (sign-extended if int8) against 16 int32 of a 2-D C-contiguous int32 array, products
    added in pairs as vpmaddwd adds them (ggml's _mm256_madd_epi16 of 16 scales by 16 block sums)."""
    if not (_is_byte_matrix(arr) and _are_integers(i, j, b) and _is_int32_matrix(sums)):
        return None

    def codegen(context, builder, signature, args):
        v16i8, v16i32 = ir.VectorType(_I8, 16), ir.VectorType(_I32, 16)
        arr_type, sums_type = signature.args[0], signature.args[3]
        pointer = _element_pointer(context, builder, arr_type, args[0], args[1:3], signature.args[1:3], v16i8)
        loaded = builder.load(pointer, align=1)
        widened = builder.sext(loaded, v16i32) if arr_type.dtype.signed else builder.zext(loaded, v16i32)
        index = [args[4], ir.Constant(ir.IntType(64), 0)]
        sums_pointer = _element_pointer(
            context, builder, sums_type, args[3], index, [signature.args[4], types.int64], v16i32
        )
        products = builder.mul(widened, builder.load(sums_pointer, align=4))
        even = _pick(builder, products, list(range(0, 16, 2)))
        odd = _pick(builder, products, list(range(1, 16, 2)))
        return builder.add(even, odd)

    return Int32x8(arr, i, j, sums, b), codegen


@intrinsic
def sub_lanes(typingctx, a, b):
    if not (a is Int32x8 and b is Int32x8):
        return None

    def codegen(context, builder, signature, args):
        return builder.sub(args[0], args[1])

    return Int32x8(a, b), codegen


@intrinsic
def shift_lanes_left(typingctx, v, n):
    if not (v is Int32x8 and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.shl(args[0], _splat(_as_i32(builder, args[1], signature.args[1]), _V8I32, builder))

    return Int32x8(v, n), codegen


# ---------------------------------------------------------------- float lanes


@intrinsic
def zero_floats(typingctx):
    """A Float32x8 of +0.0."""

    def codegen(context, builder, signature, args):
        return ir.Constant(_V8F32, None)

    return Float32x8(), codegen


@intrinsic
def fma_lanes(typingctx, acc, v, d):
    """acc + float(v) * d, lane by lane, the multiply and add fused where the CPU has FMA:
    ggml's acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(v), acc)."""
    if not (acc is Float32x8 and v is Int32x8 and isinstance(d, types.Float) and d.bitwidth == 32):
        return None

    def codegen(context, builder, signature, args):
        products = builder.fmul(builder.sitofp(args[1], _V8F32), _splat(args[2], _V8F32, builder), flags=["contract"])
        return builder.fadd(products, args[0], flags=["contract"])

    return Float32x8(acc, v, d), codegen


@intrinsic
def add_floats(typingctx, a, b):
    if not (a is Float32x8 and b is Float32x8):
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return Float32x8(a, b), codegen


@intrinsic
def sub_floats(typingctx, a, b):
    if not (a is Float32x8 and b is Float32x8):
        return None

    def codegen(context, builder, signature, args):
        return builder.fsub(args[0], args[1])

    return Float32x8(a, b), codegen


@intrinsic
def sum_floats(typingctx, v):
    """The 8 lanes added as ggml's hsum_float_8: high half + low half, then lanes (0 + 2) + (1 + 3)."""
    if v is not Float32x8:
        return None

    def codegen(context, builder, signature, args):
        v4 = ir.VectorType(ir.FloatType(), 4)
        halves = builder.fadd(_pick(builder, args[0], [4, 5, 6, 7]), _pick(builder, args[0], [0, 1, 2, 3]))
        pairs = builder.fadd(_pick(builder, halves, [0, 1]), _pick(builder, halves, [2, 3]))
        assert halves.type == v4
        return builder.fadd(builder.extract_element(pairs, _I32(0)), builder.extract_element(pairs, _I32(1)))

    return types.float32(v), codegen


def _is_matrix_of(arr, dtype) -> bool:
    """A 2-D array of `dtype` whose rows are contiguous (C, or A for a view of some columns, as MLA's values:
    the callers check the last axis's stride)."""
    return isinstance(arr, types.Array) and arr.ndim == 2 and arr.layout in "CA" and arr.dtype == dtype


@intrinsic
def load_floats(typingctx, arr, i, j):
    """The 8 float32 arr[i, j : j + 8] of a 2-D float32 array whose rows are contiguous."""
    if not (_is_matrix_of(arr, types.float32) and _are_integers(i, j)):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:], signature.args[1:], _V8F32)
        return builder.load(pointer, align=4)

    return Float32x8(arr, i, j), codegen


@intrinsic
def store_floats(typingctx, arr, i, j, v):
    """arr[i, j : j + 8] = v, for a 2-D float32 array whose rows are contiguous."""
    if not (_is_matrix_of(arr, types.float32) and _are_integers(i, j) and v is Float32x8):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:3], signature.args[1:3], _V8F32)
        builder.store(args[3], pointer, align=4)
        return context.get_dummy_value()

    return types.none(arr, i, j, v), codegen


def _is_float_vector(arr) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout in "CA" and arr.dtype == types.float32


@intrinsic
def load_floats_at(typingctx, arr, i):
    """The 8 float32 arr[i : i + 8] of a 1-D float32 array (contiguous: the callers' rows are)."""
    if not (_is_float_vector(arr) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:], signature.args[1:], _V8F32)
        return builder.load(pointer, align=4)

    return Float32x8(arr, i), codegen


@intrinsic
def store_floats_at(typingctx, arr, i, v):
    """arr[i : i + 8] = v, for a contiguous 1-D float32 array."""
    if not (_is_float_vector(arr) and isinstance(i, types.Integer) and v is Float32x8):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:2], signature.args[1:2], _V8F32)
        builder.store(args[2], pointer, align=4)
        return context.get_dummy_value()

    return types.none(arr, i, v), codegen


@intrinsic
def load_halves(typingctx, arr, i, j):
    """The 8 IEEE halves arr[i, j : j + 8] of a 2-D uint16 array (f16 bits, rows contiguous) as float32: one
    vcvtph2ps (LLVM's fpext from half), exact as gemv.half_to_f32 one by one."""
    if not (_is_matrix_of(arr, types.uint16) and _are_integers(i, j)):
        return None

    def codegen(context, builder, signature, args):
        v8f16 = ir.VectorType(ir.HalfType(), 8)
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:], signature.args[1:], v8f16)
        return builder.fpext(builder.load(pointer, align=2), _V8F32)

    return Float32x8(arr, i, j), codegen


@intrinsic
def splat_float(typingctx, x):
    """x (float32) in all 8 lanes."""
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return None

    def codegen(context, builder, signature, args):
        return _splat(args[0], _V8F32, builder)

    return Float32x8(x), codegen


@intrinsic
def fma_floats(typingctx, a, b, acc):
    """a * b + acc lane by lane with one rounding (llvm.fma.v8f32): ops_ggml.fma32 on 8 lanes at once, as
    ggml's _mm512_fmadd_ps on its lanes."""
    if not (a is Float32x8 and b is Float32x8 and acc is Float32x8):
        return None

    def codegen(context, builder, signature, args):
        return _intrinsic_call(builder, "llvm.fma.v8f32", _V8F32, list(args))

    return Float32x8(a, b, acc), codegen


@intrinsic
def sum_lanes_4(typingctx, a, b, c, d):
    """(sum_lanes(a), sum_lanes(b), sum_lanes(c), sum_lanes(d)) in three rounds of adds for the four: the
    lanes of a and b interleaved and added in pairs, then those of c and d, then halves. Integer sums, so
    their order does not matter (the adds wrap as the CPU's)."""
    if not all(v is Int32x8 for v in (a, b, c, d)):
        return None

    def codegen(context, builder, signature, args):
        va, vb, vc, vd = args
        ab = builder.add(
            _shuffle2(builder, va, vb, [0, 8, 1, 9, 2, 10, 3, 11]),
            _shuffle2(builder, va, vb, [4, 12, 5, 13, 6, 14, 7, 15]),
        )
        cd = builder.add(
            _shuffle2(builder, vc, vd, [0, 8, 1, 9, 2, 10, 3, 11]),
            _shuffle2(builder, vc, vd, [4, 12, 5, 13, 6, 14, 7, 15]),
        )
        # ab: a0+a4, b0+b4, a1+a5, b1+b5, a2+a6, ...; cd likewise
        quads = builder.add(
            _shuffle2(builder, ab, cd, [0, 1, 8, 9, 2, 3, 10, 11]),
            _shuffle2(builder, ab, cd, [4, 5, 12, 13, 6, 7, 14, 15]),
        )
        # quads: a(0,4,2,6), b.., c.., d.., a(1,5,3,7), b.., c.., d..
        totals = builder.add(_pick(builder, quads, [0, 1, 2, 3]), _pick(builder, quads, [4, 5, 6, 7]))
        result = cgutils.get_null_value(context.get_value_type(signature.return_type))
        for k in range(4):
            result = builder.insert_value(result, builder.extract_element(totals, _I32(k)), k)
        return result

    return types.UniTuple(types.int32, 4)(a, b, c, d), codegen


def _shuffle2(builder, a, b, indices):
    return builder.shuffle_vector(a, b, _const_vector(ir.VectorType(_I32, len(indices)), indices))


@intrinsic
def pair_sums_as_floats(typingctx, v):
    """Lanes k = 0..3: float(v[2k] + v[2k + 1]) (an int32 add, then one conversion); lanes 4-7 zero."""
    if v is not Int32x8:
        return None

    def codegen(context, builder, signature, args):
        zero = ir.Constant(_V8I32, None)
        even = builder.shuffle_vector(args[0], zero, _const_vector(ir.VectorType(_I32, 8), [0, 2, 4, 6, 8, 8, 8, 8]))
        odd = builder.shuffle_vector(args[0], zero, _const_vector(ir.VectorType(_I32, 8), [1, 3, 5, 7, 8, 8, 8, 8]))
        return builder.sitofp(builder.add(even, odd), _V8F32)

    return Float32x8(v), codegen


@intrinsic
def float_lane(typingctx, v, k):
    """Lane k of a Float32x8, as a float32."""
    if not (v is Float32x8 and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], _as_i32(builder, args[1], signature.args[1]))

    return types.float32(v, k), codegen


@intrinsic
def sum_lanes(typingctx, v):
    """The sum of the 8 lanes, as an int32 (wrapping, as the CPU's adds)."""
    if v is not Int32x8:
        return None

    def codegen(context, builder, signature, args):
        return _intrinsic_call(builder, "llvm.vector.reduce.add.v8i32", _I32, [args[0]])

    return types.int32(v), codegen


# ---------------------------------------------------------------- scalar conversions


@intrinsic
def amax32_x86(typingctx, x, b):
    """max |x[b, 0:32]| of a 2-D C-contiguous float32 array, reduced as quantize_row_q8_0's AVX code
    does: maxAbs = max(|v0|, |v1|, |v2|, |v3|) over its four 8-float vectors, then 8 -> 4 -> 2 -> 1
    lanes, every max being x86's maxps(a, b) = a > b ? a : b (so b where either is NaN)."""
    if not (
        isinstance(x, types.Array) and x.ndim == 2 and x.layout == "C" and x.dtype == types.float32
    ) or not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        def maxps(first, second):
            return builder.select(builder.fcmp_ordered(">", first, second), first, second)

        vectors = []
        for k in range(4):
            index = [args[1], ir.Constant(ir.IntType(64), 8 * k)]
            pointer = _element_pointer(
                context, builder, signature.args[0], args[0], index, [signature.args[1], types.int64], _V8F32
            )
            loaded = builder.load(pointer, align=4)
            vectors.append(_intrinsic_call(builder, "llvm.fabs.v8f32", _V8F32, [loaded]))
        m = vectors[0]
        for v in vectors[1:]:
            m = maxps(m, v)
        four = maxps(_pick(builder, m, [4, 5, 6, 7]), _pick(builder, m, [0, 1, 2, 3]))
        two = maxps(_pick(builder, four, [0, 1]), _pick(builder, four, [2, 3]))
        return maxps(builder.extract_element(two, _I32(0)), builder.extract_element(two, _I32(1)))

    return types.float32(x, b), codegen


@intrinsic
def amax32(typingctx, x, b, j):
    """max |x[b, j : j + 32]| of a 2-D C-contiguous float32 array, starting from 0 and taking each
    value only if it is larger (a NaN never is): quantize_row_q8_K_ref's `if (ax > amax)`."""
    if not (
        isinstance(x, types.Array) and x.ndim == 2 and x.layout == "C" and x.dtype == types.float32
    ) or not _are_integers(b, j):
        return None

    def codegen(context, builder, signature, args):
        m = ir.Constant(_V8F32, None)
        start = _as_i32(builder, args[2], signature.args[2])
        for k in range(4):
            index = [args[1], builder.add(start, _I32(8 * k))]
            pointer = _element_pointer(
                context, builder, signature.args[0], args[0], index, [signature.args[1], types.int32], _V8F32
            )
            magnitude = _intrinsic_call(builder, "llvm.fabs.v8f32", _V8F32, [builder.load(pointer, align=4)])
            m = builder.select(builder.fcmp_ordered(">", magnitude, m), magnitude, m)
        return _intrinsic_call(builder, "llvm.vector.reduce.fmax.v8f32", ir.FloatType(), [m])

    return types.float32(x, b, j), codegen


@intrinsic
def store_half_sums(typingctx, arr, i, j, v):
    """arr[i, j] = v's lanes 0-3 added, arr[i, j + 1] = lanes 4-7 (the sums over bytes 0-15 and 16-31
    of a dot product), for a 2-D C-contiguous int32 array."""
    if not (_is_int32_matrix(arr) and _are_integers(i, j) and v is Int32x8):
        return None

    def codegen(context, builder, signature, args):
        v2i32 = ir.VectorType(_I32, 2)
        pairs = builder.add(_pick(builder, args[3], [0, 4, 1, 5]), _pick(builder, args[3], [2, 6, 3, 7]))
        halves = builder.add(_pick(builder, pairs, [0, 1]), _pick(builder, pairs, [2, 3]))
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1:3], signature.args[1:3], v2i32)
        builder.store(halves, pointer, align=4)
        return context.get_dummy_value()

    return types.none(arr, i, j, v), codegen


@intrinsic
def f32_to_f16_bits(typingctx, value):
    """float32 to the bits of an IEEE half, rounded to nearest even, by LLVM's fptrunc: vcvtps2ph,
    which is ggml-cpu's GGML_CPU_FP32_TO_FP16 on x86 (_cvtss_sh(x, 0)). Only for HAS_F16C targets:
    elsewhere LLVM calls a runtime function numba may not link."""
    if not (isinstance(value, types.Float) and value.bitwidth == 32):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.uint16(value), codegen
