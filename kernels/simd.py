"""Integer SIMD for numba kernels: 32-byte vectors and the CPU's byte dot product.

ggml's CPU kernels multiply 8-bit quants by 8-bit activations and sum the products in
32-bit integers, 32 bytes an instruction (arch/x86/quants.c, `mul_sum_us8_pairs_float`).
numba has no vector types and LLVM does not find those instructions in a scalar loop, so
this module gives kernels two vector types and the few operations on them they need, each
an @intrinsic that writes the LLVM IR itself:

    Bytes32   <32 x i8>   32 quants or activations (signed or not: the operation says)
    Int32x8   <8 x i32>   8 partial sums; lane k holds the sum over bytes 4k .. 4k+3

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


class Bytes32Type(types.Type):
    def __init__(self):
        super().__init__(name="Bytes32")


class Int32x8Type(types.Type):
    def __init__(self):
        super().__init__(name="Int32x8")


Bytes32 = Bytes32Type()
Int32x8 = Int32x8Type()


@register_model(Bytes32Type)
class _Bytes32Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V32I8)


@register_model(Int32x8Type)
class _Int32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8I32)


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


# ---------------------------------------------------------------- byte arithmetic


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


@intrinsic
def scale_halves(typingctx, v, low, high):
    """Lanes 0-3 (bytes 0-15 of a dot) times `low`, lanes 4-7 (bytes 16-31) times `high`: the
    integer scales of two 16-value sub-blocks, or of one 32-value sub-block when low == high."""
    if not (v is Int32x8 and _are_integers(low, high)):
        return None

    def codegen(context, builder, signature, args):
        values = []
        for a, t in zip(args[1:], signature.args[1:], strict=True):
            values.append(
                builder.trunc(a, _I32) if t.bitwidth > 32 else (builder.sext(a, _I32) if t.bitwidth < 32 else a)
            )
        pair = builder.insert_element(ir.Constant(ir.VectorType(_I32, 2), None), values[0], _I32(0))
        pair = builder.insert_element(pair, values[1], _I32(1))
        scales = builder.shuffle_vector(pair, pair, _const_vector(ir.VectorType(_I32, 8), [0, 0, 0, 0, 1, 1, 1, 1]))
        return builder.mul(args[0], scales)

    return Int32x8(v, low, high), codegen


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
def f32_to_f16_bits(typingctx, value):
    """float32 to the bits of an IEEE half, rounded to nearest even, by LLVM's fptrunc: vcvtps2ph,
    which is ggml-cpu's GGML_CPU_FP32_TO_FP16 on x86 (_cvtss_sh(x, 0)). Only for HAS_F16C targets:
    elsewhere LLVM calls a runtime function numba may not link."""
    if not (isinstance(value, types.Float) and value.bitwidth == 32):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.uint16(value), codegen
