"""Fused quantized matrix-vector products for decoding one token: y = W @ x.

Every kernel has the same signature,
    kernel(rows, x, out)
where `rows` is W's raw (n_out, row_bytes) uint8 data (a read-only view of the
file mapping is fine), `x` the (n_in,) float32 input and `out` the (n_out,)
float32 result. Quant blocks are decoded in registers as they stream past and
W is never materialised. Rows are independent, so they are split over threads
with prange.

Arithmetic. llama.cpp rounds x to 8 bits for its integer dot products (gemv_ggml.py
does the same, for numerics="ggml"); these kernels keep x in float32, decode every
weight exactly and accumulate in float32, so the only error is float32 rounding of
the products and sums. Per block, the scales that
are constant over a run of quants are factored out of its inner sum (exact in
real arithmetic), as ggml's ggml_vec_dot_*_q8_* do:
  * A float scale d multiplies a whole block's (or super-block's) sum:
    sum_l (d * q_l) * x_l = d * sum_l q_l * x_l.
  * A k-quant's small integer sub-block scale sc multiplies either its quants
    inside the sum (sc * q is an integer below 2^12, exact in float32) or the
    sub-block's own sum.
  * A min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) meets only x, so its sum of x over the
    (sub-)block is computed once per call, in `group_sums`, as ggml's q8 blocks
    carry theirs (block_q8_1.s, block_q8_K.bsums):
    sum_l (d * q_l + m) * x_l = d * sum_l q_l * x_l + m * sum_l x_l.

Speed. Decoding is bound by memory bandwidth: every weight byte is read once
per token, and a kernel keeps up only if it decodes faster than DRAM delivers.
What it took, each measured (scripts/bench_matvec.py, and in-cache timings of
one thread on the 2-core development VM):
  * Vectorised inner sums. Kernels are compiled with kernel(reassociate=True)
    (see _jit.py): a float sum vectorises only if LLVM may reorder it. Loops
    follow the rules in legacy.py's docstring: bounds read from array shapes
    inside the prange body, never literals (LLVM would unroll them into scalar
    code); quants narrowed to np.int8 / np.uint8 before the float32 cast;
    constant shift counts. The bounds come from `xb`, x viewed as runs of values.
  * Short loops say so. A loop over 16 values (a half block) takes its bound as
    min(shape, 16): without a visible upper bound LLVM sizes its vector loop for
    long runs (32 values an iteration) and a 16-value loop only ever runs its
    4-lane remainder loop. Q4_0: 3.5 -> 4.9 GB/s. (Q6_K's loop body is long
    enough for LLVM to interleave less; there the cap costs 15%.)
  * Independent sums. A loop starts its own sums instead of adding onto the
    previous loop's, so that consecutive loops overlap in the out-of-order core
    instead of queueing on one chain of dependent additions (Q2_K: 1.65 -> 2.1
    GB/s); Q4_K and Q5_K keep one sum per sub-block in a single loop (4.4 -> 5.2).
  * Software prefetch, `PREFETCH_BYTES` ahead in the row stream (`prefetch_block`),
    in the block kernels: they issue loads too slowly for the out-of-order core
    alone to keep enough cache misses in flight. Streaming Q8_0: 3.3 -> 8.2 GB/s.
  * Block scales converted by the CPU's half-to-float instruction (`half_to_f32`)
    rather than by _jit.f16_to_f32's bit manipulation and branches: Q8_0, whose
    blocks are small, 8.9 -> 10.5 GB/s.
Where that leaves them (quiet VM, 2 threads, read bandwidth 24-34 GB/s): the
float kernels stream at 70-90% of it, Q8_0 at 60%, the 2- to 6-bit types at
13-39% (Q4_K 10 GB/s). Those are bound by the CPU, not memory: every 8 values
cost a widening shuffle, an int-to-float conversion and an FMA on 8-lane
vectors, plus the bit fiddling, about 5 GB/s a core. (AVX-512's 16 lanes, tried
by lifting LLVM's 256-bit preference, were no faster.)
"""

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import kernel, prange, prefetch, u32_as_f32
from .kquants import q3_k_scale, scale_min_k4
from .simd import (
    Float32x8,
    Int32x8,
    and_lanes,
    fma_floats,
    load_floats,
    shift_lanes_right,
    splat_float,
    sum_floats,
    widen_bytes,
    zero_floats,
)

# How far ahead of the block being decoded the row stream is prefetched. Measured
# on the 2-core VM (2 GB of matrices in sequence, 2 threads, GB/s by distance):
#   distance   none   1 KB   2 KB   4 KB   8 KB  16 KB  32 KB
#   Q8_0        3.3    7.5    8.1    8.2    8.3    8.7    7.9
#   Q4_K        3.9    5.0    5.1    5.1    5.1    5.0    4.9
#   F32        12.7   12.5   12.5   11.6   11.5   11.0   10.7
# (a busy machine, so half the absolute figures of a quiet one). Flat from 2 to
# 16 KB. F32, F16 and BF16 go without (see matvec_f32).
PREFETCH_BYTES = 4096
CACHE_LINE = 64

# BIT[i] = 1 << i: Q5_0 and Q5_1 test bit i of their 32-bit qh against it.
BIT = np.uint32(1) << np.arange(32, dtype=np.uint32)


@intrinsic
def half_to_f32(typingctx, bits):
    """An IEEE half, given as the low 16 bits of an integer, to float32 by the CPU's conversion.

    LLVM's fpext from half: one instruction on x86 with F16C (vcvtph2ps, every
    x86-64 CPU since 2012) and on ARMv8, and it vectorises. Exact for every
    finite half and for infinities; a NaN stays a NaN (with its quiet bit set,
    where _jit.f16_to_f32 keeps the payload bit for bit: no matter for a sum).
    """
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        i16 = ir.IntType(16)
        if bits.bitwidth > 16:
            value = builder.trunc(value, i16)
        elif bits.bitwidth < 16:
            value = builder.zext(value, i16)
        return builder.fpext(builder.bitcast(value, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def mul_quants(typingctx, v, x):
    """float(v) * x lane by lane: 8 int32 quants (simd.Int32x8) times 8 floats (simd.Float32x8)."""
    if not (v is Int32x8 and x is Float32x8):
        return None

    def codegen(context, builder, signature, args):
        return builder.fmul(builder.sitofp(args[0], ir.VectorType(ir.FloatType(), 8)), args[1])

    return Float32x8(v, x), codegen


@intrinsic
def fma_quants(typingctx, acc, v, x):
    """acc + float(v) * x lane by lane, fused where the CPU has FMA (a reduction kernel's "contract")."""
    if not (acc is Float32x8 and v is Int32x8 and x is Float32x8):
        return None

    def codegen(context, builder, signature, args):
        product = builder.fmul(builder.sitofp(args[1], ir.VectorType(ir.FloatType(), 8)), args[2], flags=["contract"])
        return builder.fadd(product, args[0], flags=["contract"])

    return Float32x8(acc, v, x), codegen


@kernel
def f16_at_row(rows, r, offset):
    """The little-endian f16 at rows[r, offset : offset + 2], as float32."""
    return half_to_f32(np.uint16(rows[r, offset]) | (np.uint16(rows[r, offset + 1]) << np.uint16(8)))


@kernel
def f16_at(blocks, r, b, offset):
    """The little-endian f16 at byte `offset` of block (r, b), as float32."""
    return half_to_f32(np.uint16(blocks[r, b, offset]) | (np.uint16(blocks[r, b, offset + 1]) << np.uint16(8)))


@kernel
def prefetch_block(rows, r, start, n_bytes):
    """Prefetch the cache lines of bytes [start, start + n_bytes) of row r, PREFETCH_BYTES ahead.

    Past the row's end this reaches into the next rows (the array is C-contiguous),
    which is where the stream goes next; past the array's end it is harmless.
    """
    for offset in range(start + PREFETCH_BYTES, start + PREFETCH_BYTES + n_bytes, CACHE_LINE):
        prefetch(rows, r, offset)


@kernel(reassociate=True)
def group_sums(x, group):  # (n,) float32, group size -> (n // group,) float32
    """Sums of x over consecutive groups of `group` elements: the x side of a min's term."""
    xg = x.reshape((x.shape[0] // group, group))
    sums = np.empty(xg.shape[0], dtype=np.float32)
    for g in range(xg.shape[0]):
        s = np.float32(0)
        for l in range(xg.shape[1]):
            s += xg[g, l]
        sums[g] = s
    return sums


# ---------------------------------------------------------------- plain floats


# F32: 4 bytes a value, little-endian IEEE single. The float kernels decode so little
# that loads alone keep enough misses in flight: prefetching costs them 5-20%.
@kernel(parallel=True, reassociate=True)
def matvec_f32(rows, x, out):  # (n_out, 4 n_in) uint8, (n_in,) float32 -> (n_out,) float32
    w = rows.reshape(-1).view(np.float32).reshape((rows.shape[0], x.shape[0]))
    for r in prange(w.shape[0]):
        acc = np.float32(0)
        for i in range(w.shape[1]):
            acc += w[r, i] * x[i]
        out[r] = acc


# F16: 2 bytes a value, IEEE half.
@kernel(parallel=True, reassociate=True)
def matvec_f16(rows, x, out):  # (n_out, 2 n_in) uint8, (n_in,) float32 -> (n_out,) float32
    w = rows.reshape(-1).view(np.uint16).reshape((rows.shape[0], x.shape[0]))
    for r in prange(w.shape[0]):
        acc = np.float32(0)
        for i in range(w.shape[1]):
            acc += half_to_f32(w[r, i]) * x[i]
        out[r] = acc


# BF16: 2 bytes a value, the upper half of an IEEE single.
@kernel(parallel=True, reassociate=True)
def matvec_bf16(rows, x, out):  # (n_out, 2 n_in) uint8, (n_in,) float32 -> (n_out,) float32
    w = rows.reshape(-1).view(np.uint16).reshape((rows.shape[0], x.shape[0]))
    for r in prange(w.shape[0]):
        acc = np.float32(0)
        for i in range(w.shape[1]):
            acc += u32_as_f32(np.uint32(w[r, i]) << np.uint32(16)) * x[i]
        out[r] = acc


# ---------------------------------------------------------------- legacy 32-element blocks
# Layouts as in legacy.py; each block's f16 scale d is factored out of its sum,
# as in ggml_vec_dot_q4_0_q8_0 and its siblings.


# Q8_0, 34 bytes: | d: f16 | qs: int8 x 32 |   y = sum_b d_b * sum_l q_l * x_l, in 8-lane vectors as Q4_1
@kernel(inline=True)
def q8_0_row(rows, quants, r, xb):
    """Row r's dot product with x viewed as (n_blocks, 32); quants: rows viewed as int8 (widened with their sign)."""
    acc = zero_floats()
    for b in range(xb.shape[0]):
        at = 34 * b
        prefetch_block(rows, r, at, 34)
        s = mul_quants(widen_bytes(quants, r, at + 2), load_floats(xb, b, 0))
        s = fma_quants(s, widen_bytes(quants, r, at + 10), load_floats(xb, b, 8))
        s = fma_quants(s, widen_bytes(quants, r, at + 18), load_floats(xb, b, 16))
        s = fma_quants(s, widen_bytes(quants, r, at + 26), load_floats(xb, b, 24))
        acc = fma_floats(splat_float(f16_at_row(rows, r, at)), s, acc)
    return sum_floats(acc)


@kernel(parallel=True, reassociate=True)
def matvec_q8_0(rows, x, out):  # (n_out, n_blocks * 34) uint8, (n_blocks * 32,) float32 -> (n_out,)
    xb = x.reshape((x.shape[0] // 32, 32))
    quants = rows.view(np.int8)
    for r in prange(rows.shape[0]):
        out[r] = q8_0_row(rows, quants, r, xb)


@kernel(parallel=True, reassociate=True)
def matvec_slices_q8_0(rows, n_out, slices, x, out):  # as gemv_ggml's matvec_slices_*: out[j] = W_slices[j] @ x[0]
    xb = x[0].reshape((x.shape[1] // 32, 32))
    quants = rows.view(np.int8)
    for job in prange(slices.shape[0] * n_out):
        j, i = job // n_out, job % n_out
        out[j, i] = q8_0_row(rows, quants, slices[j] * n_out + i, xb)


# Q4_0, 18 bytes: | d: f16 | qs: 16 B |   x[i] = d * (lo(qs[i]) - 8), x[i + 16] = d * (hi(qs[i]) - 8)
@kernel(parallel=True, reassociate=True)
def matvec_q4_0(rows, x, out):  # (n_out, n_blocks * 18) uint8, (n_blocks * 32,) float32 -> (n_out,)
    n_blocks = x.shape[0] // 32
    blocks = rows.reshape((rows.shape[0], n_blocks, 18))
    xb = x.reshape((n_blocks, 2, 16))
    for r in prange(blocks.shape[0]):
        acc = np.float32(0)
        for b in range(blocks.shape[1]):
            prefetch_block(rows, r, 18 * b, 18)
            s = np.float32(0)
            for i in range(min(xb.shape[2], 16)):
                q = blocks[r, b, 2 + i]
                s += np.float32(np.int8((q & 0xF) - 8)) * xb[b, 0, i] + np.float32(np.int8((q >> 4) - 8)) * xb[b, 1, i]
            acc += f16_at(blocks, r, b, 0) * s
        out[r] = acc


# Q4_1, 20 bytes: | d: f16 | m: f16 | qs: 16 B |   x[i] = d * lo(qs[i]) + m, x[i + 16] = d * hi(qs[i]) + m
#   y = sum_b d_b * sum_l q_l * x_l + m_b * sum_l x_l, as ggml_vec_dot_q4_1_q8_1, written in 8-lane vectors:
#   a block's quants widened to int32 lanes (8 bytes a load), each nibble's float product added lane by lane
#   into the block's 8-lane sum, which d_b scales into the row's 8-lane accumulator. A scalar loop's block
#   sum would end in a horizontal reduction per block, as costly as the block's products: one thread
#   8.6 -> 12.4 GB/s on smollm2's shapes (and Q8_0 likewise 14.6 -> 23.9).
@kernel(inline=True)
def q4_1_row(rows, r, xb, x_sums):
    """Row r's dot product with x viewed as (n_blocks, 32), x_sums its block sums."""
    acc = zero_floats()
    mins = np.float32(0)
    for b in range(xb.shape[0]):
        at = 20 * b
        prefetch_block(rows, r, at, 20)
        low, high = widen_bytes(rows, r, at + 4), widen_bytes(rows, r, at + 12)  # quant bytes 0-7, 8-15
        s = mul_quants(and_lanes(low, 15), load_floats(xb, b, 0))
        s = fma_quants(s, and_lanes(high, 15), load_floats(xb, b, 8))
        s = fma_quants(s, shift_lanes_right(low, 4), load_floats(xb, b, 16))
        s = fma_quants(s, shift_lanes_right(high, 4), load_floats(xb, b, 24))
        acc = fma_floats(splat_float(f16_at_row(rows, r, at)), s, acc)
        mins += f16_at_row(rows, r, at + 2) * x_sums[b]
    return sum_floats(acc) + mins


@kernel(parallel=True, reassociate=True)
def matvec_q4_1(rows, x, out):  # (n_out, n_blocks * 20) uint8, (n_blocks * 32,) float32 -> (n_out,)
    xb = x.reshape((x.shape[0] // 32, 32))
    x_sums = group_sums(x, 32)  # (n_blocks,)
    for r in prange(rows.shape[0]):
        out[r] = q4_1_row(rows, r, xb, x_sums)


@kernel(parallel=True, reassociate=True)
def matvec_slices_q4_1(rows, n_out, slices, x, out):  # as gemv_ggml's matvec_slices_*: out[j] = W_slices[j] @ x[0]
    xb = x[0].reshape((x.shape[1] // 32, 32))
    x_sums = group_sums(x[0], 32)
    for job in prange(slices.shape[0] * n_out):
        j, i = job // n_out, job % n_out
        out[j, i] = q4_1_row(rows, slices[j] * n_out + i, xb, x_sums)


# Q5_0, 22 bytes: | d: f16 | qh: u32, bit i = 5th bit of x[i] | qs: 16 B, low 4 bits |
#   x[i] = d * ((lo(qs[i]) | qh_i << 4) - 16),  x[i + 16] = d * ((hi(qs[i]) | qh_(i+16) << 4) - 16)
@kernel(parallel=True, reassociate=True)
def matvec_q5_0(rows, x, out):  # (n_out, n_blocks * 22) uint8, (n_blocks * 32,) float32 -> (n_out,)
    n_blocks = x.shape[0] // 32
    blocks = rows.reshape((rows.shape[0], n_blocks, 22))
    xb = x.reshape((n_blocks, 2, 16))
    for r in prange(blocks.shape[0]):
        acc = np.float32(0)
        for b in range(blocks.shape[1]):
            prefetch_block(rows, r, 22 * b, 22)
            qh = (
                np.uint32(blocks[r, b, 2])
                | (np.uint32(blocks[r, b, 3]) << np.uint32(8))
                | (np.uint32(blocks[r, b, 4]) << np.uint32(16))
                | (np.uint32(blocks[r, b, 5]) << np.uint32(24))
            )
            s = np.float32(0)
            for i in range(min(xb.shape[2], 16)):
                q = blocks[r, b, 6 + i]
                lo = (q & 0xF) | (16 if np.uint32(qh & BIT[i]) else 0)
                hi = (q >> 4) | (16 if np.uint32(qh & BIT[i + 16]) else 0)
                s += np.float32(np.int8(lo - 16)) * xb[b, 0, i] + np.float32(np.int8(hi - 16)) * xb[b, 1, i]
            acc += f16_at(blocks, r, b, 0) * s
        out[r] = acc


# Q5_1, 24 bytes: | d: f16 | m: f16 | qh: u32 | qs: 16 B |   x = d * (5-bit q) + m, bits as Q5_0
@kernel(parallel=True, reassociate=True)
def matvec_q5_1(rows, x, out):  # (n_out, n_blocks * 24) uint8, (n_blocks * 32,) float32 -> (n_out,)
    n_blocks = x.shape[0] // 32
    blocks = rows.reshape((rows.shape[0], n_blocks, 24))
    xb = x.reshape((n_blocks, 2, 16))
    x_sums = group_sums(x, 32)  # (n_blocks,)
    for r in prange(blocks.shape[0]):
        acc = np.float32(0)
        for b in range(blocks.shape[1]):
            prefetch_block(rows, r, 24 * b, 24)
            qh = (
                np.uint32(blocks[r, b, 4])
                | (np.uint32(blocks[r, b, 5]) << np.uint32(8))
                | (np.uint32(blocks[r, b, 6]) << np.uint32(16))
                | (np.uint32(blocks[r, b, 7]) << np.uint32(24))
            )
            s = np.float32(0)
            for i in range(min(xb.shape[2], 16)):
                q = blocks[r, b, 8 + i]
                lo = (q & 0xF) | (16 if np.uint32(qh & BIT[i]) else 0)
                hi = (q >> 4) | (16 if np.uint32(qh & BIT[i + 16]) else 0)
                s += np.float32(np.uint8(lo)) * xb[b, 0, i] + np.float32(np.uint8(hi)) * xb[b, 1, i]
            acc += f16_at(blocks, r, b, 0) * s + f16_at(blocks, r, b, 2) * x_sums[b]
        out[r] = acc


# ---------------------------------------------------------------- k-quants, 256-element super-blocks
# Layouts as in kquants.py. Following ggml_vec_dot_q*_K_q8_K, a super-block contributes
#   d * sum_k sc_k * (sum over sub-block k of q * x) - dmin * sum_k m_k * (sum of x over sub-block k):
# d and dmin come out of the sums; the integer sub-block scale sc_k multiplies either the quants
# inside the sum (Q2_K, Q3_K, Q6_K, whose 16-value sub-blocks share loops four at a time; sc_k * q
# is an exact integer) or the sub-block's own sum (Q4_K, Q5_K); the mins' x sums are `group_sums`.


# Q2_K, 84 bytes: | scales: 16 B (scale | min << 4) | qs: 64 B (2-bit) | d: f16 | dmin: f16 |
#   Value 128h + 32j + l (h < 2, j < 4, l < 32) is bits 2j, 2j+1 of qs[32h + l]; sub-block 8h + 2j + l // 16.
#   Loops as in Q6_K: for each h and half g of l, the four runs j with their four scales.
@kernel(parallel=True, reassociate=True)
def matvec_q2_k(rows, x, out):  # (n_out, n_blocks * 84) uint8, (n_blocks * 256,) float32 -> (n_out,)
    n_blocks = x.shape[0] // 256
    blocks = rows.reshape((rows.shape[0], n_blocks, 84))
    xb = x.reshape((n_blocks, 2, 4, 32))  # (super-block, h, j, l)
    x_sums = group_sums(x, 16).reshape((n_blocks, 16))
    for r in prange(blocks.shape[0]):
        acc = np.float32(0)
        for b in range(blocks.shape[1]):
            prefetch_block(rows, r, 84 * b, 84)
            s = np.float32(0)
            for h in range(2):
                for g in range(2):  # l in [16g, 16g + 16): sub-blocks k + 2j
                    k = 8 * h + g
                    sc0 = np.float32(blocks[r, b, k] & 0xF)
                    sc1 = np.float32(blocks[r, b, k + 2] & 0xF)
                    sc2 = np.float32(blocks[r, b, k + 4] & 0xF)
                    sc3 = np.float32(blocks[r, b, k + 6] & 0xF)
                    t = np.float32(0)
                    for l in range(16 * g, 16 * g + min(xb.shape[3] // 2, 16)):
                        q = blocks[r, b, 16 + 32 * h + l]
                        t += (
                            (sc0 * np.float32(np.uint8(q & 3))) * xb[b, h, 0, l]
                            + (sc1 * np.float32(np.uint8((q >> 2) & 3))) * xb[b, h, 1, l]
                            + (sc2 * np.float32(np.uint8((q >> 4) & 3))) * xb[b, h, 2, l]
                            + (sc3 * np.float32(np.uint8(q >> 6))) * xb[b, h, 3, l]
                        )
                    s += t
            mins = np.float32(0)
            for k in range(x_sums.shape[1]):
                mins += np.float32(blocks[r, b, k] >> 4) * x_sums[b, k]
            acc += f16_at(blocks, r, b, 80) * s - f16_at(blocks, r, b, 82) * mins
        out[r] = acc


# Q3_K, 110 bytes: | hmask: 32 B (3rd bit) | qs: 64 B (low 2 bits) | scales: 12 B (16 x 6-bit) | d: f16 |
#   q = low 2 bits - (0 if the hmask bit is set else 4), scale signed (q3_k_scale).
#   Value 128h + 32j + l (h < 2, j < 4, l < 32): bits 2j, 2j+1 of qs[32h + l], bit 4h + j of hmask[l];
#   sub-block 8h + 2j + l // 16. Loops as in Q2_K.
@kernel(parallel=True, reassociate=True)
def matvec_q3_k(rows, x, out):  # (n_out, n_blocks * 110) uint8, (n_blocks * 256,) float32 -> (n_out,)
    n_blocks = x.shape[0] // 256
    blocks = rows.reshape((rows.shape[0], n_blocks, 110))
    xb = x.reshape((n_blocks, 2, 4, 32))  # (super-block, h, j, l)
    for r in prange(blocks.shape[0]):
        acc = np.float32(0)
        row = blocks[r]
        for b in range(blocks.shape[1]):
            prefetch_block(rows, r, 110 * b, 110)
            s = np.float32(0)
            for h in range(2):
                for g in range(2):  # l in [16g, 16g + 16): sub-blocks k + 2j
                    k = 8 * h + g
                    sc0 = np.float32(q3_k_scale(row, b, k))
                    sc1 = np.float32(q3_k_scale(row, b, k + 2))
                    sc2 = np.float32(q3_k_scale(row, b, k + 4))
                    sc3 = np.float32(q3_k_scale(row, b, k + 6))
                    m = np.uint8(1 << (4 * h))  # the hmask bit of run j = 0; run j tests m << j
                    t = np.float32(0)
                    for l in range(16 * g, 16 * g + min(xb.shape[3] // 2, 16)):
                        q = blocks[r, b, 32 + 32 * h + l]
                        hm = blocks[r, b, l]
                        q0 = (q & 3) - (0 if np.uint8(hm & m) else 4)
                        q1 = ((q >> 2) & 3) - (0 if np.uint8(hm & (m << 1)) else 4)
                        q2 = ((q >> 4) & 3) - (0 if np.uint8(hm & (m << 2)) else 4)
                        q3 = (q >> 6) - (0 if np.uint8(hm & (m << 3)) else 4)
                        t += (
                            (sc0 * np.float32(np.int8(q0))) * xb[b, h, 0, l]
                            + (sc1 * np.float32(np.int8(q1))) * xb[b, h, 1, l]
                            + (sc2 * np.float32(np.int8(q2))) * xb[b, h, 2, l]
                            + (sc3 * np.float32(np.int8(q3))) * xb[b, h, 3, l]
                        )
                    s += t
            acc += f16_at(blocks, r, b, 108) * s
        out[r] = acc


@kernel(reassociate=True)
def k4_scaled_sum(row, b, s0, s1, s2, s3, s4, s5, s6, s7):
    """sum_k sc_k * s_k over the 8 sub-blocks of Q4_K/Q5_K block b (row: (n_blocks, type_size))."""
    total = np.float32(scale_min_k4(row, b, 0)[0]) * s0 + np.float32(scale_min_k4(row, b, 1)[0]) * s1
    total += np.float32(scale_min_k4(row, b, 2)[0]) * s2 + np.float32(scale_min_k4(row, b, 3)[0]) * s3
    total += np.float32(scale_min_k4(row, b, 4)[0]) * s4 + np.float32(scale_min_k4(row, b, 5)[0]) * s5
    total += np.float32(scale_min_k4(row, b, 6)[0]) * s6 + np.float32(scale_min_k4(row, b, 7)[0]) * s7
    return total


@kernel(reassociate=True)
def k4_mins_sum(row, b, x_sums):
    """sum_k m_k * (sum of x over sub-block k) for Q4_K/Q5_K block b; x_sums: (n_blocks, 8)."""
    total = np.float32(0)
    for k in range(8):
        total += np.float32(scale_min_k4(row, b, k)[1]) * x_sums[b, k]
    return total


# Q4_K, 144 bytes: | d: f16 | dmin: f16 | scales: 12 B (8 x 6-bit scale, 8 x 6-bit min) | qs: 128 B (4-bit) |
#   Value 64c + l is the low nibble of qs[32c + l] (sub-block 2c), value 64c + 32 + l its high one (2c + 1).
#   One loop over l feeds eight sums, one per sub-block, each scaled once after the loop: a fifth
#   faster than a loop per pair of sub-blocks, whose short sums each end in a lane reduction.
@kernel(parallel=True, reassociate=True)
def matvec_q4_k(rows, x, out):  # (n_out, n_blocks * 144) uint8, (n_blocks * 256,) float32 -> (n_out,)
    n_blocks = x.shape[0] // 256
    blocks = rows.reshape((rows.shape[0], n_blocks, 144))
    xb = x.reshape((n_blocks, 8, 32))  # (super-block, sub-block, value)
    x_sums = group_sums(x, 32).reshape((n_blocks, 8))
    for r in prange(blocks.shape[0]):
        acc = np.float32(0)
        row = blocks[r]
        for b in range(blocks.shape[1]):
            prefetch_block(rows, r, 144 * b, 144)
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0)
            for l in range(xb.shape[2]):
                q0, q1, q2, q3 = row[b, 16 + l], row[b, 48 + l], row[b, 80 + l], row[b, 112 + l]
                s0 += np.float32(np.uint8(q0 & 0xF)) * xb[b, 0, l]
                s1 += np.float32(np.uint8(q0 >> 4)) * xb[b, 1, l]
                s2 += np.float32(np.uint8(q1 & 0xF)) * xb[b, 2, l]
                s3 += np.float32(np.uint8(q1 >> 4)) * xb[b, 3, l]
                s4 += np.float32(np.uint8(q2 & 0xF)) * xb[b, 4, l]
                s5 += np.float32(np.uint8(q2 >> 4)) * xb[b, 5, l]
                s6 += np.float32(np.uint8(q3 & 0xF)) * xb[b, 6, l]
                s7 += np.float32(np.uint8(q3 >> 4)) * xb[b, 7, l]
            acc += f16_at(blocks, r, b, 0) * k4_scaled_sum(row, b, s0, s1, s2, s3, s4, s5, s6, s7)
            acc -= f16_at(blocks, r, b, 2) * k4_mins_sum(row, b, x_sums)
        out[r] = acc


# Q5_K, 176 bytes: | d: f16 | dmin: f16 | scales: 12 B (as Q4_K) | qh: 32 B (bit 4) | qs: 128 B (bits 0-3) |
#   Value 64c + l: low nibble of qs[32c + l] | bit 2c of qh[l] << 4; 64c + 32 + l: high nibble, bit 2c + 1.
#   Loop as in Q4_K.
@kernel(parallel=True, reassociate=True)
def matvec_q5_k(rows, x, out):  # (n_out, n_blocks * 176) uint8, (n_blocks * 256,) float32 -> (n_out,)
    n_blocks = x.shape[0] // 256
    blocks = rows.reshape((rows.shape[0], n_blocks, 176))
    xb = x.reshape((n_blocks, 8, 32))  # (super-block, sub-block, value)
    x_sums = group_sums(x, 32).reshape((n_blocks, 8))
    for r in prange(blocks.shape[0]):
        acc = np.float32(0)
        row = blocks[r]
        for b in range(blocks.shape[1]):
            prefetch_block(rows, r, 176 * b, 176)
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0)
            for l in range(xb.shape[2]):
                q0, q1, q2, q3 = row[b, 48 + l], row[b, 80 + l], row[b, 112 + l], row[b, 144 + l]
                qh = row[b, 16 + l]
                # Test qh against byte masks, as dequantize_q5_k does (shifts by a loop variable
                # would be vectorised in 64-bit lanes).
                s0 += np.float32(np.uint8((q0 & 0xF) | (16 if np.uint8(qh & 1) else 0))) * xb[b, 0, l]
                s1 += np.float32(np.uint8((q0 >> 4) | (16 if np.uint8(qh & 2) else 0))) * xb[b, 1, l]
                s2 += np.float32(np.uint8((q1 & 0xF) | (16 if np.uint8(qh & 4) else 0))) * xb[b, 2, l]
                s3 += np.float32(np.uint8((q1 >> 4) | (16 if np.uint8(qh & 8) else 0))) * xb[b, 3, l]
                s4 += np.float32(np.uint8((q2 & 0xF) | (16 if np.uint8(qh & 16) else 0))) * xb[b, 4, l]
                s5 += np.float32(np.uint8((q2 >> 4) | (16 if np.uint8(qh & 32) else 0))) * xb[b, 5, l]
                s6 += np.float32(np.uint8((q3 & 0xF) | (16 if np.uint8(qh & 64) else 0))) * xb[b, 6, l]
                s7 += np.float32(np.uint8((q3 >> 4) | (16 if np.uint8(qh & 128) else 0))) * xb[b, 7, l]
            acc += f16_at(blocks, r, b, 0) * k4_scaled_sum(row, b, s0, s1, s2, s3, s4, s5, s6, s7)
            acc -= f16_at(blocks, r, b, 2) * k4_mins_sum(row, b, x_sums)
        out[r] = acc


# Q6_K, 210 bytes: | ql: 128 B (low 4 bits) | qh: 64 B (high 2 bits) | scales: int8 x 16 | d: f16 |
#   In half h (128 values, ql[64h:], qh[32h:]), value 32r + l (r < 4, l < 32) takes nibble r // 2 of
#   ql[64h + 32(r % 2) + l] and bits 2r..2r+1 of qh[32h + l]; it is in sub-block 8h + 2r + l // 16.
@kernel(parallel=True, reassociate=True)
def matvec_q6_k(rows, x, out):  # (n_out, n_blocks * 210) uint8, (n_blocks * 256,) float32 -> (n_out,)
    n_blocks = x.shape[0] // 256
    blocks = rows.reshape((rows.shape[0], n_blocks, 210))
    xb = x.reshape((n_blocks, 2, 4, 32))  # (super-block, h, r, l)
    for r in prange(blocks.shape[0]):
        acc = np.float32(0)
        for b in range(blocks.shape[1]):
            prefetch_block(rows, r, 210 * b, 210)
            s = np.float32(0)
            for h in range(2):
                for g in range(2):  # l in [16g, 16g + 16): the four runs' sub-blocks 8h + g + 2r
                    k = 192 + 8 * h + g
                    sc0 = np.float32(np.int8(blocks[r, b, k]))
                    sc1 = np.float32(np.int8(blocks[r, b, k + 2]))
                    sc2 = np.float32(np.int8(blocks[r, b, k + 4]))
                    sc3 = np.float32(np.int8(blocks[r, b, k + 6]))
                    for l in range(16 * g, 16 * g + xb.shape[3] // 2):
                        ql0 = blocks[r, b, 64 * h + l]
                        ql1 = blocks[r, b, 64 * h + 32 + l]
                        qh = blocks[r, b, 128 + 32 * h + l]
                        q0 = np.int8(((ql0 & 0xF) | ((qh & 3) << 4)) - 32)
                        q1 = np.int8(((ql1 & 0xF) | ((qh & 12) << 2)) - 32)
                        q2 = np.int8(((ql0 >> 4) | (qh & 48)) - 32)
                        q3 = np.int8(((ql1 >> 4) | ((qh >> 6) << 4)) - 32)
                        s += (
                            (sc0 * np.float32(q0)) * xb[b, h, 0, l]
                            + (sc1 * np.float32(q1)) * xb[b, h, 1, l]
                            + (sc2 * np.float32(q2)) * xb[b, h, 2, l]
                            + (sc3 * np.float32(q3)) * xb[b, h, 3, l]
                        )
            acc += f16_at(blocks, r, b, 208) * s
        out[r] = acc


# one token through several n_out-row slices of one weight's rows (or of a view spanning several weights), as
# gemv_ggml's GGML_MATVEC_SLICES_KERNELS: f(rows, n_out, slices, x (1, n_in), out (k, n_out)), each output its row's
# matvec output, to the bit
MATVEC_SLICES_KERNELS = {T.Q8_0: matvec_slices_q8_0, T.Q4_1: matvec_slices_q4_1}

MATVEC_KERNELS = {
    T.F32: matvec_f32,
    T.F16: matvec_f16,
    T.BF16: matvec_bf16,
    T.Q8_0: matvec_q8_0,
    T.Q4_0: matvec_q4_0,
    T.Q4_1: matvec_q4_1,
    T.Q5_0: matvec_q5_0,
    T.Q5_1: matvec_q5_1,
    T.Q2_K: matvec_q2_k,
    T.Q3_K: matvec_q3_k,
    T.Q4_K: matvec_q4_k,
    T.Q5_K: matvec_q5_k,
    T.Q6_K: matvec_q6_k,
}
