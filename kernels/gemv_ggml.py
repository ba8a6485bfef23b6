"""Matrix-vector products in llama.cpp's CPU arithmetic: y = W @ x on integers, as ggml_vec_dot_*.

Every kernel has gemv.py's signature, kernel(rows, x, out), and computes what ggml's
mul_mat computes for one token on x86 (ggml-cpu/arch/x86/quants.c):

 1. x is quantized to the weight type's vec_dot_type (activations.py): Q8_0 for Q4_0,
    Q5_0, Q8_0; Q8_1 for Q4_1, Q5_1; Q8_K for the k-quants. Bit for bit as ggml does it.
 2. Each block's dot product of weight quants and activation quants runs on integers and is
    exact: with the block's integer sub-block scales, an int32 `isum` per block.
 3. Floats enter once per block, as in ggml: y += (d_w * d_x) * isum, with d_w the block's
    f16 scale and d_x the activation block's; a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) adds
    m_w * s_x, s_x being Q8_1's f16 s or Q8_K's bsums times its d.

So the integers are ggml's exactly, and the float32 sums differ from ggml's only in their
order: equal within float32 reassociation, as tests/test_ggml_numerics.py checks against
ggml's own vec_dot through ctypes. The legacy types, Q2_K, Q4_K and Q5_K keep 8 float lane
sums per row, as ggml does; Q3_K and Q6_K add each super-block's integer total instead,
because ggml subtracts their quant offset (4, 32) lane by lane in float32, where terms far
larger than the result cancel and round (3% of a row's value on a test row), and the
integer total does not.

Integer dot products use simd.py's Bytes32 vectors: `dot_bytes` (vpdpbusd with VNNI,
vpmaddubsw + vpmaddwd with AVX2) and `dot_bytes_scaled` (vpmaddubsw, then the sub-block
scale by vpdpwssd or vpmaddwd): 32 byte products an instruction, with no conversion to float
per value, which is what lets a matvec keep up with memory where the exact kernels of gemv.py
are bound by the CPU. They multiply unsigned by signed bytes; the types with signed quants are
fed unsigned, and the offset they carry comes off in integers with the activation sums (Q4_0:
sum (q - 8) y = sum q y - 8 sum y), except Q8_0, which takes ggml's sign trick.

Each type's work on one weight row is a `<type>_row` function; `matvec_<type>` runs it over the
rows for one token, and `matmul_<type>`, kernel(rows, x (n_tok, n_in), out (n_tok, n_out)), for
every token of a batch in turn, so that a row is read from memory once and from L1 for the other
tokens: what ggml's mul_mat computes for a batch (x quantized token by token, vec_dot for every
row and token), in the same integers. Block layouts are those of legacy.py and kquants.py; each
row function restates its own.
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from ._jit import f16_to_f32, kernel, prange, u32_as_f32
from .activations import (
    Q8_0_BYTES,
    Q8_1_BYTES,
    Q8_K_BYTES,
    cpu_fp32_to_fp16,
    quantize_q8_0,
    quantize_q8_1,
    quantize_q8_k,
)
from .gemv import half_to_f32, matvec_f32, prefetch_block
from .quantize import f32_bits
from .simd import (
    HAS_F16C,
    add_floats,
    add_lanes,
    and_lanes,
    bit_bytes,
    bits_to_bytes,
    dot_bytes,
    dot_bytes_scaled,
    dot_signed_bytes,
    fma_lanes,
    high_nibbles,
    k4_mins,
    k4_scales,
    lane,
    load_bytes,
    load_lanes,
    load_nibbles,
    load_u16,
    load_u32,
    low_nibbles,
    mask_bytes,
    mul_lanes,
    or_bytes,
    q3k_scales,
    shift_lanes_right,
    shift_left,
    shift_right,
    sum_floats,
    sum_lanes,
    widen_bytes,
    zero_floats,
    zero_lanes,
)

f32 = np.float32


@kernel
def half_at(rows, r, j):
    """The little-endian f16 at rows[r, j : j + 2], as float32 (GGML_CPU_FP16_TO_FP32): one vcvtph2ps
    with F16C; without it _jit.f16_to_f32's bit manipulation (LLVM would call a runtime function)."""
    if HAS_F16C:
        return half_to_f32(load_u16(rows, r, j))
    return f16_to_f32(rows[r, j], rows[r, j + 1])


# ---------------------------------------------------------------- activations
# x (n_tok, n) float32, quantized token by token: blocks (n_tok, n_blocks, bytes), scales and sums per block.


@kernel
def activations_q8_0(x):  # -> (n_tok, n / 32, 34) u8, (n_tok, n / 32) f32, (n_tok, n / 32, 8) int32
    n_tok, n_blocks = x.shape[0], x.shape[1] // 32
    blocks = np.empty((n_tok, n_blocks, Q8_0_BYTES), dtype=np.uint8)
    scales = np.empty((n_tok, n_blocks), dtype=np.float32)
    sums = np.empty((n_tok, n_blocks, 8), dtype=np.int32)
    for t in range(n_tok):
        quantize_q8_0(x[t].reshape((n_blocks, 32)), blocks[t], scales[t], sums[t])
    return blocks, scales, sums


@kernel
def activations_q8_1(x):  # -> (n_tok, n / 32, 36) u8, (n_tok, n / 32) f32, (n_tok, n / 32) f32
    n_tok, n_blocks = x.shape[0], x.shape[1] // 32
    blocks = np.empty((n_tok, n_blocks, Q8_1_BYTES), dtype=np.uint8)
    scales = np.empty((n_tok, n_blocks), dtype=np.float32)
    sums = np.empty((n_tok, n_blocks), dtype=np.float32)
    for t in range(n_tok):
        quantize_q8_1(x[t].reshape((n_blocks, 32)), blocks[t], scales[t], sums[t])
    return blocks, scales, sums


@kernel
def activations_q8_k(x):  # -> (n_tok, n / 256, 292) u8, (n_tok, n / 256) f32, (n_tok, n / 256, 16) int32
    n_tok, n_blocks = x.shape[0], x.shape[1] // 256
    blocks = np.empty((n_tok, n_blocks, Q8_K_BYTES), dtype=np.uint8)
    scales = np.empty((n_tok, n_blocks), dtype=np.float32)
    sums = np.empty((n_tok, n_blocks, 16), dtype=np.int32)
    for t in range(n_tok):
        quantize_q8_k(x[t].reshape((n_blocks, 256)), blocks[t], scales[t], sums[t])
    return blocks, scales, sums


@kernel
def scaled(sums, factor):  # (n_tok, n, 8) int32 -> factor * sums, (n_tok, n, 8) int32
    """A loop, not `sums * factor`: in a parallel kernel an array expression becomes a parallel region
    of its own, which costs a wake-up of the threads."""
    out = np.empty_like(sums)
    for t in range(sums.shape[0]):
        for b in range(sums.shape[1]):
            for k in range(sums.shape[2]):
                out[t, b, k] = sums[t, b, k] * np.int32(factor)
    return out


@kernel
def pair_sums(sums):  # (n_tok, n, 16) int32 -> (n_tok, n, 8) int32: sums over 32 values, for 32-value sub-blocks
    pairs = np.empty((sums.shape[0], sums.shape[1], 8), dtype=np.int32)
    for t in range(sums.shape[0]):
        for b in range(sums.shape[1]):
            for k in range(8):
                pairs[t, b, k] = sums[t, b, 2 * k] + sums[t, b, 2 * k + 1]
    return pairs


# ---------------------------------------------------------------- legacy 32-value blocks, by Q8_0 / Q8_1
# Activation block b: qs at a[b, 2:34] (Q8_0) or a[b, 4:36] (Q8_1). As in ggml, a block's 8 integer lane
# sums are converted to float and accumulated lane by lane, times the block's d_w * d_x, into 8 float
# sums added up at the end (hsum_float_8): a horizontal integer sum per block would cost more than the
# block's dot product. A row's blocks are taken four at a time into four accumulators: with one, every
# block waits for the previous one's fused multiply-add (4 cycles of latency), which bounds ggml's loop.


@kernel
def q8_0_block(acc, rows, r, b, a, a_scales):
    """acc + (d_w d_x) * lanes of sum q y, Q8_0 block b: | d: f16 | qs: int8 x 32 |, by ggml's sign trick."""
    dot = dot_signed_bytes(zero_lanes(), load_bytes(rows, r, 34 * b + 2), load_bytes(a, b, 2))
    return fma_lanes(acc, dot, half_at(rows, r, 34 * b) * a_scales[b])


@kernel
def q4_0_block(acc, rows, r, b, a, a_scales, offsets):
    """acc + (d_w d_x) * lanes of sum (q - 8) y, Q4_0 block b: | d: f16 | qs: 16 B, value l the low nibble
    of qs[l], value l + 16 the high one |. The offset comes off each lane, sum (q - 8) y = sum q y - 8 sum y,
    by starting the dot product's lanes at offsets[b] = -8 * (the activation lane sums)."""
    dot = dot_bytes(load_lanes(offsets, b, 0), load_nibbles(rows, r, 18 * b + 2), load_bytes(a, b, 2))
    return fma_lanes(acc, dot, half_at(rows, r, 18 * b) * a_scales[b])


@kernel
def q5_0_block(acc, rows, r, b, a, a_scales, offsets):
    """acc + (d_w d_x) * lanes of sum (q - 16) y, Q5_0 block b: | d: f16 | qh: u32, bit l the fifth bit of
    value l | qs: 16 B, the low four bits as Q4_0 |; offsets[b] = -16 * (the activation lane sums)."""
    q = or_bytes(load_nibbles(rows, r, 22 * b + 6), bits_to_bytes(load_u32(rows, r, 22 * b + 2), 16))
    dot = dot_bytes(load_lanes(offsets, b, 0), q, load_bytes(a, b, 2))
    return fma_lanes(acc, dot, half_at(rows, r, 22 * b) * a_scales[b])


@kernel
def q4_1_block(acc, rows, r, b, a, a_scales):
    """acc + (d_w d_x) * lanes of sum q y, Q4_1 block b: | d: f16 | m: f16 | qs: 16 B, as Q4_0 |, q unsigned."""
    dot = dot_bytes(zero_lanes(), load_nibbles(rows, r, 20 * b + 4), load_bytes(a, b, 4))
    return fma_lanes(acc, dot, half_at(rows, r, 20 * b) * a_scales[b])


@kernel
def q5_1_block(acc, rows, r, b, a, a_scales):
    """acc + (d_w d_x) * lanes of sum q y, Q5_1 block b: | d: f16 | m: f16 | qh: u32 | qs: 16 B |, the
    5-bit q of Q5_0 unsigned."""
    q = or_bytes(load_nibbles(rows, r, 24 * b + 8), bits_to_bytes(load_u32(rows, r, 24 * b + 4), 16))
    return fma_lanes(acc, dot_bytes(zero_lanes(), q, load_bytes(a, b, 4)), half_at(rows, r, 24 * b) * a_scales[b])


@kernel
def sum_of_four(acc0, acc1, acc2, acc3):
    return sum_floats(add_floats(add_floats(acc0, acc1), add_floats(acc2, acc3)))


# Q8_0, 34 bytes: y = sum_b (d_b d_x) * sum_l q_l y_l, as ggml_vec_dot_q8_0_q8_0
@kernel(inline=True)
def q8_0_row(rows, r, a, a_scales):
    """W[r] . x for one token: Q8_0 row r of `rows` against its quantized activations a (n_blocks, bytes)."""
    n_blocks = a.shape[0]
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    for b in range(0, n_blocks - 3, 4):
        prefetch_block(rows, r, 34 * b, 4 * 34)
        acc0 = q8_0_block(acc0, rows, r, b, a, a_scales)
        acc1 = q8_0_block(acc1, rows, r, b + 1, a, a_scales)
        acc2 = q8_0_block(acc2, rows, r, b + 2, a, a_scales)
        acc3 = q8_0_block(acc3, rows, r, b + 3, a, a_scales)
    for b in range(n_blocks - n_blocks % 4, n_blocks):
        acc0 = q8_0_block(acc0, rows, r, b, a, a_scales)
    return sum_of_four(acc0, acc1, acc2, acc3)


@kernel(parallel=True, reassociate=True)
def matvec_q8_0(rows, x, out):  # (n_out, n_blocks * 34) uint8, (n_blocks * 32,) float32 -> (n_out,)
    a, a_scales, _ = activations_q8_0(x.reshape((1, x.shape[0])))
    for r in prange(rows.shape[0]):
        out[r] = q8_0_row(rows, r, a[0], a_scales[0])


@kernel(parallel=True, reassociate=True)
def matmul_q8_0(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, _ = activations_q8_0(x)
    for r in prange(rows.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = q8_0_row(rows, r, a[t], a_scales[t])


# Q4_0, 18 bytes, as ggml_vec_dot_q4_0_q8_0
@kernel(inline=True)
def q4_0_row(rows, r, a, a_scales, offsets):
    """W[r] . x for one token: Q4_0 row r of `rows` against its quantized activations a (n_blocks, bytes)."""
    n_blocks = a.shape[0]
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    for b in range(0, n_blocks - 3, 4):
        prefetch_block(rows, r, 18 * b, 4 * 18)
        acc0 = q4_0_block(acc0, rows, r, b, a, a_scales, offsets)
        acc1 = q4_0_block(acc1, rows, r, b + 1, a, a_scales, offsets)
        acc2 = q4_0_block(acc2, rows, r, b + 2, a, a_scales, offsets)
        acc3 = q4_0_block(acc3, rows, r, b + 3, a, a_scales, offsets)
    for b in range(n_blocks - n_blocks % 4, n_blocks):
        acc0 = q4_0_block(acc0, rows, r, b, a, a_scales, offsets)
    return sum_of_four(acc0, acc1, acc2, acc3)


@kernel(parallel=True, reassociate=True)
def matvec_q4_0(rows, x, out):  # (n_out, n_blocks * 18) uint8, (n_blocks * 32,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_0(x.reshape((1, x.shape[0])))
    offsets = scaled(a_sums, -8)
    for r in prange(rows.shape[0]):
        out[r] = q4_0_row(rows, r, a[0], a_scales[0], offsets[0])


@kernel(parallel=True, reassociate=True)
def matmul_q4_0(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, a_sums = activations_q8_0(x)
    offsets = scaled(a_sums, -8)
    for r in prange(rows.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = q4_0_row(rows, r, a[t], a_scales[t], offsets[t])


# Q5_0, 22 bytes, as ggml_vec_dot_q5_0_q8_0
@kernel(inline=True)
def q5_0_row(rows, r, a, a_scales, offsets):
    """W[r] . x for one token: Q5_0 row r of `rows` against its quantized activations a (n_blocks, bytes)."""
    n_blocks = a.shape[0]
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    for b in range(0, n_blocks - 3, 4):
        prefetch_block(rows, r, 22 * b, 4 * 22)
        acc0 = q5_0_block(acc0, rows, r, b, a, a_scales, offsets)
        acc1 = q5_0_block(acc1, rows, r, b + 1, a, a_scales, offsets)
        acc2 = q5_0_block(acc2, rows, r, b + 2, a, a_scales, offsets)
        acc3 = q5_0_block(acc3, rows, r, b + 3, a, a_scales, offsets)
    for b in range(n_blocks - n_blocks % 4, n_blocks):
        acc0 = q5_0_block(acc0, rows, r, b, a, a_scales, offsets)
    return sum_of_four(acc0, acc1, acc2, acc3)


@kernel(parallel=True, reassociate=True)
def matvec_q5_0(rows, x, out):  # (n_out, n_blocks * 22) uint8, (n_blocks * 32,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_0(x.reshape((1, x.shape[0])))
    offsets = scaled(a_sums, -16)
    for r in prange(rows.shape[0]):
        out[r] = q5_0_row(rows, r, a[0], a_scales[0], offsets[0])


@kernel(parallel=True, reassociate=True)
def matmul_q5_0(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, a_sums = activations_q8_0(x)
    offsets = scaled(a_sums, -16)
    for r in prange(rows.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = q5_0_row(rows, r, a[t], a_scales[t], offsets[t])


# Q4_1, 20 bytes: y = sum_b (d_b d_x) * sum q y + m_b * s_x, as ggml_vec_dot_q4_1_q8_1, whose summs
# (the m s terms) are added after the lanes, as here.
@kernel(inline=True)
def q4_1_row(rows, r, a, a_scales, a_sums):
    """W[r] . x for one token: Q4_1 row r of `rows` against its quantized activations a (n_blocks, bytes)."""
    n_blocks = a.shape[0]
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    m0 = m1 = m2 = m3 = f32(0)
    for b in range(0, n_blocks - 3, 4):
        prefetch_block(rows, r, 20 * b, 4 * 20)
        acc0 = q4_1_block(acc0, rows, r, b, a, a_scales)
        acc1 = q4_1_block(acc1, rows, r, b + 1, a, a_scales)
        acc2 = q4_1_block(acc2, rows, r, b + 2, a, a_scales)
        acc3 = q4_1_block(acc3, rows, r, b + 3, a, a_scales)
        m0 += half_at(rows, r, 20 * b + 2) * a_sums[b]
        m1 += half_at(rows, r, 20 * b + 22) * a_sums[b + 1]
        m2 += half_at(rows, r, 20 * b + 42) * a_sums[b + 2]
        m3 += half_at(rows, r, 20 * b + 62) * a_sums[b + 3]
    for b in range(n_blocks - n_blocks % 4, n_blocks):
        acc0 = q4_1_block(acc0, rows, r, b, a, a_scales)
        m0 += half_at(rows, r, 20 * b + 2) * a_sums[b]
    return sum_of_four(acc0, acc1, acc2, acc3) + ((m0 + m1) + (m2 + m3))


@kernel(parallel=True, reassociate=True)
def matvec_q4_1(rows, x, out):  # (n_out, n_blocks * 20) uint8, (n_blocks * 32,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_1(x.reshape((1, x.shape[0])))
    for r in prange(rows.shape[0]):
        out[r] = q4_1_row(rows, r, a[0], a_scales[0], a_sums[0])


@kernel(parallel=True, reassociate=True)
def matmul_q4_1(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, a_sums = activations_q8_1(x)
    for r in prange(rows.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = q4_1_row(rows, r, a[t], a_scales[t], a_sums[t])


# Q5_1, 24 bytes: as Q4_1, as ggml_vec_dot_q5_1_q8_1
@kernel(inline=True)
def q5_1_row(rows, r, a, a_scales, a_sums):
    """W[r] . x for one token: Q5_1 row r of `rows` against its quantized activations a (n_blocks, bytes)."""
    n_blocks = a.shape[0]
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    m0 = m1 = m2 = m3 = f32(0)
    for b in range(0, n_blocks - 3, 4):
        prefetch_block(rows, r, 24 * b, 4 * 24)
        acc0 = q5_1_block(acc0, rows, r, b, a, a_scales)
        acc1 = q5_1_block(acc1, rows, r, b + 1, a, a_scales)
        acc2 = q5_1_block(acc2, rows, r, b + 2, a, a_scales)
        acc3 = q5_1_block(acc3, rows, r, b + 3, a, a_scales)
        m0 += half_at(rows, r, 24 * b + 2) * a_sums[b]
        m1 += half_at(rows, r, 24 * b + 26) * a_sums[b + 1]
        m2 += half_at(rows, r, 24 * b + 50) * a_sums[b + 2]
        m3 += half_at(rows, r, 24 * b + 74) * a_sums[b + 3]
    for b in range(n_blocks - n_blocks % 4, n_blocks):
        acc0 = q5_1_block(acc0, rows, r, b, a, a_scales)
        m0 += half_at(rows, r, 24 * b + 2) * a_sums[b]
    return sum_of_four(acc0, acc1, acc2, acc3) + ((m0 + m1) + (m2 + m3))


@kernel(parallel=True, reassociate=True)
def matvec_q5_1(rows, x, out):  # (n_out, n_blocks * 24) uint8, (n_blocks * 32,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_1(x.reshape((1, x.shape[0])))
    for r in prange(rows.shape[0]):
        out[r] = q5_1_row(rows, r, a[0], a_scales[0], a_sums[0])


@kernel(parallel=True, reassociate=True)
def matmul_q5_1(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, a_sums = activations_q8_1(x)
    for r in prange(rows.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = q5_1_row(rows, r, a[t], a_scales[t], a_sums[t])


# ---------------------------------------------------------------- k-quants, 256-value super-blocks, by Q8_K
# Activation super-block b: d = a_scales[b], qs at a[b, 4:260] (value v at 4 + v), bsums a_sums[b, k]
# (sum of the quants of values 16k .. 16k + 15). In ggml_vec_dot_q*_K_q8_K a super-block adds
#   d_x * d_w * isum  +  (-d_x * dmin_w) * msum,
# isum = sum_k sc_k * (sum over sub-block k of q y), msum = sum_k m_k * (sum of y over sub-block k).
# The sub-block scales and mins are decoded eight at a time into vector lanes (simd.k4_scales, ...),
# and a sub-block's 8 lane sums are multiplied by its scale before the lanes are added up, once
# per super-block.


# Q4_K, 144 bytes: | d: f16 | dmin: f16 | scales: 12 B (8 x 6-bit scale, 8 x 6-bit min) | qs: 128 B |
#   Value 64c + l is the low nibble of qs[32c + l] (sub-block 2c), value 64c + 32 + l its high one (2c + 1).
@kernel(inline=True)
def q4_k_row(rows, r, a, a_scales, sums32):
    """W[r] . x for one token: Q4_K row r of `rows` against its quantized activations a (n_blocks, bytes)."""
    acc, acc_mins = zero_floats(), zero_floats()
    for b in range(a.shape[0]):
        base = 144 * b
        prefetch_block(rows, r, base, 144)
        scales = k4_scales(rows, r, base + 4)
        lanes_low, lanes_high = zero_lanes(), zero_lanes()  # two chains of dependent adds, not one
        for c in range(4):
            packed = load_bytes(rows, r, base + 16 + 32 * c)
            low, high = lane(scales, 2 * c), lane(scales, 2 * c + 1)
            lanes_low = dot_bytes_scaled(lanes_low, low_nibbles(packed), load_bytes(a, b, 4 + 64 * c), low, low)
            y = load_bytes(a, b, 36 + 64 * c)
            lanes_high = dot_bytes_scaled(lanes_high, high_nibbles(packed), y, high, high)
        lanes = add_lanes(lanes_low, lanes_high)
        mins = mul_lanes(k4_mins(rows, r, base + 4), load_lanes(sums32, b, 0))
        acc = fma_lanes(acc, lanes, a_scales[b] * half_at(rows, r, base))
        acc_mins = fma_lanes(acc_mins, mins, -a_scales[b] * half_at(rows, r, base + 2))
    return sum_floats(acc) + sum_floats(acc_mins)


@kernel(parallel=True, reassociate=True)
def matvec_q4_k(rows, x, out):  # (n_out, n_blocks * 144) uint8, (n_blocks * 256,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_k(x.reshape((1, x.shape[0])))
    sums32 = pair_sums(a_sums)
    for r in prange(rows.shape[0]):
        out[r] = q4_k_row(rows, r, a[0], a_scales[0], sums32[0])


@kernel(parallel=True, reassociate=True)
def matmul_q4_k(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, a_sums = activations_q8_k(x)
    sums32 = pair_sums(a_sums)
    for r in prange(rows.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = q4_k_row(rows, r, a[t], a_scales[t], sums32[t])


# Q5_K, 176 bytes: | d: f16 | dmin: f16 | scales: 12 B (as Q4_K) | qh: 32 B | qs: 128 B |
#   Value 64c + l: low nibble of qs[32c + l] | bit 2c of qh[l] << 4; value 64c + 32 + l: high nibble, bit 2c + 1.
@kernel(inline=True)
def q5_k_row(rows, r, a, a_scales, sums32):
    """W[r] . x for one token: Q5_K row r of `rows` against its quantized activations a (n_blocks, bytes)."""
    acc, acc_mins = zero_floats(), zero_floats()
    for b in range(a.shape[0]):
        base = 176 * b
        prefetch_block(rows, r, base, 176)
        scales = k4_scales(rows, r, base + 4)
        high_bits = load_bytes(rows, r, base + 16)
        lanes_low, lanes_high = zero_lanes(), zero_lanes()
        for c in range(4):
            packed = load_bytes(rows, r, base + 48 + 32 * c)
            q_low = or_bytes(low_nibbles(packed), bit_bytes(high_bits, 1 << (2 * c), 16))
            q_high = or_bytes(high_nibbles(packed), bit_bytes(high_bits, 2 << (2 * c), 16))
            low, high = lane(scales, 2 * c), lane(scales, 2 * c + 1)
            lanes_low = dot_bytes_scaled(lanes_low, q_low, load_bytes(a, b, 4 + 64 * c), low, low)
            lanes_high = dot_bytes_scaled(lanes_high, q_high, load_bytes(a, b, 36 + 64 * c), high, high)
        lanes = add_lanes(lanes_low, lanes_high)
        mins = mul_lanes(k4_mins(rows, r, base + 4), load_lanes(sums32, b, 0))
        acc = fma_lanes(acc, lanes, a_scales[b] * half_at(rows, r, base))
        acc_mins = fma_lanes(acc_mins, mins, -a_scales[b] * half_at(rows, r, base + 2))
    return sum_floats(acc) + sum_floats(acc_mins)


@kernel(parallel=True, reassociate=True)
def matvec_q5_k(rows, x, out):  # (n_out, n_blocks * 176) uint8, (n_blocks * 256,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_k(x.reshape((1, x.shape[0])))
    sums32 = pair_sums(a_sums)
    for r in prange(rows.shape[0]):
        out[r] = q5_k_row(rows, r, a[0], a_scales[0], sums32[0])


@kernel(parallel=True, reassociate=True)
def matmul_q5_k(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, a_sums = activations_q8_k(x)
    sums32 = pair_sums(a_sums)
    for r in prange(rows.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = q5_k_row(rows, r, a[t], a_scales[t], sums32[t])


# Q6_K, 210 bytes: | ql: 128 B (low 4 bits) | qh: 64 B (high 2 bits) | scales: int8 x 16 | d: f16 |
#   In half h (values 128h ..), value 128h + 32j + l takes nibble j // 2 of ql[64h + 32(j % 2) + l] and
#   bits 2j, 2j + 1 of qh[32h + l]: q in 0..63, weight q - 32, sub-block 8h + 2j + l // 16.
#   isum = sum_k sc_k * sum (q - 32) y = sum_k sc_k * sum q y - 32 * sum_k sc_k * bsum_k, as ggml's q8sclsub.
@kernel(inline=True)
def q6_k_row(rows, r, a, a_scales, a_sums):
    """W[r] . x for one token: Q6_K row r of `rows` against its quantized activations a (n_blocks, bytes)."""
    signed_rows = rows.view(np.int8)
    acc = f32(0)
    for b in range(a.shape[0]):
        base = 210 * b
        prefetch_block(rows, r, base, 210)
        scales_low = widen_bytes(signed_rows, r, base + 192)  # sub-blocks 0-7
        scales_high = widen_bytes(signed_rows, r, base + 200)  # 8-15
        offsets = add_lanes(
            mul_lanes(scales_low, load_lanes(a_sums, b, 0)), mul_lanes(scales_high, load_lanes(a_sums, b, 8))
        )
        lanes0, lanes1, lanes2, lanes3 = zero_lanes(), zero_lanes(), zero_lanes(), zero_lanes()
        for h in range(2):
            scales = scales_low if h == 0 else scales_high
            low = load_bytes(rows, r, base + 64 * h)
            high = load_bytes(rows, r, base + 64 * h + 32)
            bits = load_bytes(rows, r, base + 128 + 32 * h)
            q0 = or_bytes(low_nibbles(low), mask_bytes(shift_left(bits, 4), 0x30))
            q1 = or_bytes(low_nibbles(high), mask_bytes(shift_left(bits, 2), 0x30))
            q2 = or_bytes(high_nibbles(low), mask_bytes(bits, 0x30))
            q3 = or_bytes(high_nibbles(high), mask_bytes(shift_right(bits, 2), 0x30))
            y = 4 + 128 * h
            lanes0 = dot_bytes_scaled(lanes0, q0, load_bytes(a, b, y), lane(scales, 0), lane(scales, 1))
            lanes1 = dot_bytes_scaled(lanes1, q1, load_bytes(a, b, y + 32), lane(scales, 2), lane(scales, 3))
            lanes2 = dot_bytes_scaled(lanes2, q2, load_bytes(a, b, y + 64), lane(scales, 4), lane(scales, 5))
            lanes3 = dot_bytes_scaled(lanes3, q3, load_bytes(a, b, y + 96), lane(scales, 6), lane(scales, 7))
        lanes = add_lanes(add_lanes(lanes0, lanes1), add_lanes(lanes2, lanes3))
        isum = sum_lanes(lanes) - 32 * sum_lanes(offsets)
        acc += (a_scales[b] * half_at(rows, r, base + 208)) * f32(isum)
    return acc


@kernel(parallel=True, reassociate=True)
def matvec_q6_k(rows, x, out):  # (n_out, n_blocks * 210) uint8, (n_blocks * 256,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_k(x.reshape((1, x.shape[0])))
    for r in prange(rows.shape[0]):
        out[r] = q6_k_row(rows, r, a[0], a_scales[0], a_sums[0])


@kernel(parallel=True, reassociate=True)
def matmul_q6_k(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, a_sums = activations_q8_k(x)
    for r in prange(rows.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = q6_k_row(rows, r, a[t], a_scales[t], a_sums[t])


# Q3_K, 110 bytes: | hmask: 32 B | qs: 64 B (low 2 bits) | scales: 12 B (16 x 6-bit, +32) | d: f16 |
#   Value 128h + 32j + l: bits 2j, 2j + 1 of qs[32h + l] and bit 4h + j of hmask[l], weight
#   low2 - (0 if the hmask bit is set else 4) = q - 4 with q = low2 | hbit << 2 in 0..7; sub-block 8h + 2j + l // 16.
@kernel(inline=True)
def q3_k_row(rows, r, a, a_scales, a_sums):
    """W[r] . x for one token: Q3_K row r of `rows` against its quantized activations a (n_blocks, bytes)."""
    acc = f32(0)
    for b in range(a.shape[0]):
        base = 110 * b
        prefetch_block(rows, r, base, 110)
        hmask = load_bytes(rows, r, base)
        scales_low = q3k_scales(rows, r, base + 96, 0)  # sub-blocks 0-7
        scales_high = q3k_scales(rows, r, base + 96, 1)  # 8-15
        offsets = add_lanes(
            mul_lanes(scales_low, load_lanes(a_sums, b, 0)), mul_lanes(scales_high, load_lanes(a_sums, b, 8))
        )
        lanes0, lanes1, lanes2, lanes3 = zero_lanes(), zero_lanes(), zero_lanes(), zero_lanes()
        for h in range(2):  # the runs j = 0..3 written out, so that every shift is a constant
            scales = scales_low if h == 0 else scales_high
            packed = load_bytes(rows, r, base + 32 + 32 * h)
            bit = 1 << (4 * h)
            y = 4 + 128 * h
            q0 = or_bytes(mask_bytes(packed, 3), bit_bytes(hmask, bit, 4))
            q1 = or_bytes(mask_bytes(shift_right(packed, 2), 3), bit_bytes(hmask, bit << 1, 4))
            q2 = or_bytes(mask_bytes(shift_right(packed, 4), 3), bit_bytes(hmask, bit << 2, 4))
            q3 = or_bytes(shift_right(packed, 6), bit_bytes(hmask, bit << 3, 4))
            lanes0 = dot_bytes_scaled(lanes0, q0, load_bytes(a, b, y), lane(scales, 0), lane(scales, 1))
            lanes1 = dot_bytes_scaled(lanes1, q1, load_bytes(a, b, y + 32), lane(scales, 2), lane(scales, 3))
            lanes2 = dot_bytes_scaled(lanes2, q2, load_bytes(a, b, y + 64), lane(scales, 4), lane(scales, 5))
            lanes3 = dot_bytes_scaled(lanes3, q3, load_bytes(a, b, y + 96), lane(scales, 6), lane(scales, 7))
        lanes = add_lanes(add_lanes(lanes0, lanes1), add_lanes(lanes2, lanes3))
        isum = sum_lanes(lanes) - 4 * sum_lanes(offsets)
        acc += (a_scales[b] * half_at(rows, r, base + 108)) * f32(isum)
    return acc


@kernel(parallel=True, reassociate=True)
def matvec_q3_k(rows, x, out):  # (n_out, n_blocks * 110) uint8, (n_blocks * 256,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_k(x.reshape((1, x.shape[0])))
    for r in prange(rows.shape[0]):
        out[r] = q3_k_row(rows, r, a[0], a_scales[0], a_sums[0])


@kernel(parallel=True, reassociate=True)
def matmul_q3_k(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, a_sums = activations_q8_k(x)
    for r in prange(rows.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = q3_k_row(rows, r, a[t], a_scales[t], a_sums[t])


# Q2_K, 84 bytes: | scales: 16 B (scale | min << 4) | qs: 64 B (2-bit) | d: f16 | dmin: f16 |
#   Value 128h + 32j + l is bits 2j, 2j + 1 of qs[32h + l]; sub-block 8h + 2j + l // 16.
@kernel(inline=True)
def q2_k_row(rows, r, a, a_scales, a_sums):
    """W[r] . x for one token: Q2_K row r of `rows` against its quantized activations a (n_blocks, bytes)."""
    acc = zero_floats()
    for b in range(a.shape[0]):
        base = 84 * b
        prefetch_block(rows, r, base, 84)
        packed_low = widen_bytes(rows, r, base)  # scale | min << 4 of sub-blocks 0-7
        packed_high = widen_bytes(rows, r, base + 8)  # 8-15
        mins = add_lanes(
            mul_lanes(shift_lanes_right(packed_low, 4), load_lanes(a_sums, b, 0)),
            mul_lanes(shift_lanes_right(packed_high, 4), load_lanes(a_sums, b, 8)),
        )
        lanes0, lanes1, lanes2, lanes3 = zero_lanes(), zero_lanes(), zero_lanes(), zero_lanes()
        for h in range(2):  # the runs j = 0..3 written out, so that every shift is a constant
            scales = and_lanes(packed_low if h == 0 else packed_high, 15)
            packed = load_bytes(rows, r, base + 16 + 32 * h)
            y = 4 + 128 * h
            q0, q1 = mask_bytes(packed, 3), mask_bytes(shift_right(packed, 2), 3)
            q2, q3 = mask_bytes(shift_right(packed, 4), 3), shift_right(packed, 6)
            lanes0 = dot_bytes_scaled(lanes0, q0, load_bytes(a, b, y), lane(scales, 0), lane(scales, 1))
            lanes1 = dot_bytes_scaled(lanes1, q1, load_bytes(a, b, y + 32), lane(scales, 2), lane(scales, 3))
            lanes2 = dot_bytes_scaled(lanes2, q2, load_bytes(a, b, y + 64), lane(scales, 4), lane(scales, 5))
            lanes3 = dot_bytes_scaled(lanes3, q3, load_bytes(a, b, y + 96), lane(scales, 6), lane(scales, 7))
        lanes = add_lanes(add_lanes(lanes0, lanes1), add_lanes(lanes2, lanes3))
        acc = fma_lanes(acc, mins, -a_scales[b] * half_at(rows, r, base + 82))
        acc = fma_lanes(acc, lanes, a_scales[b] * half_at(rows, r, base + 80))
    return sum_floats(acc)


@kernel(parallel=True, reassociate=True)
def matvec_q2_k(rows, x, out):  # (n_out, n_blocks * 84) uint8, (n_blocks * 256,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_k(x.reshape((1, x.shape[0])))
    for r in prange(rows.shape[0]):
        out[r] = q2_k_row(rows, r, a[0], a_scales[0], a_sums[0])


@kernel(parallel=True, reassociate=True)
def matmul_q2_k(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, a_sums = activations_q8_k(x)
    for r in prange(rows.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = q2_k_row(rows, r, a[t], a_scales[t], a_sums[t])


# ---------------------------------------------------------------- float weights
# ggml's vec_dot_type of F16 is F16 and of BF16 is BF16: x is rounded to the weight's format
# (GGML_CPU_FP32_TO_FP16 / _BF16, to nearest even) and the products, exact in float32 (11 x 11 or
# 8 x 8 significant bits), summed in float32: gemv.py's loops on the rounded x. F32 is gemv.py's
# matvec_f32 itself. (These kernels are parallel themselves: a non-parallel kernel calling a parallel
# one crashes when it is the first parallel code to run, since numba starts its worker threads only
# when Python calls a parallel kernel.)


@kernel
def round_to_f16(x):  # (n,) f32 -> (n,) f32, each value rounded to the nearest half (GGML_CPU_FP32_TO_FP16)
    rounded = np.empty_like(x)
    for i in range(x.shape[0]):
        h = cpu_fp32_to_fp16(x[i])
        rounded[i] = f16_to_f32(h & 0xFF, h >> 8)
    return rounded


@kernel
def round_to_bf16(x):  # (n,) f32 -> (n,) f32, each value rounded to bfloat16 as ggml_compute_fp32_to_bf16
    rounded = np.empty_like(x)
    for i in range(x.shape[0]):
        u = np.uint32(f32_bits(x[i]))
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: truncate and force quiet
            top = (u >> np.uint32(16)) | np.uint32(64)
        else:
            top = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        rounded[i] = u32_as_f32(top << np.uint32(16))
    return rounded


@kernel(parallel=True, reassociate=True)
def matvec_f16_by_f16(rows, x, out):  # (n_out, 2 n_in) uint8, (n_in,) float32 -> (n_out,)
    w = rows.reshape(-1).view(np.uint16).reshape((rows.shape[0], x.shape[0]))
    rounded = round_to_f16(x)
    for r in prange(w.shape[0]):
        acc = f32(0)
        for i in range(w.shape[1]):
            acc += half_to_f32(w[r, i]) * rounded[i]
        out[r] = acc


@kernel(parallel=True, reassociate=True)
def matvec_bf16_by_bf16(rows, x, out):  # (n_out, 2 n_in) uint8, (n_in,) float32 -> (n_out,)
    w = rows.reshape(-1).view(np.uint16).reshape((rows.shape[0], x.shape[0]))
    rounded = round_to_bf16(x)
    for r in prange(w.shape[0]):
        acc = f32(0)
        for i in range(w.shape[1]):
            acc += u32_as_f32(np.uint32(w[r, i]) << np.uint32(16)) * rounded[i]
        out[r] = acc


# A batch of float weights: each row read once for all the tokens, as in the quantized kernels.
@kernel(parallel=True, reassociate=True)
def matmul_f32(rows, x, out):  # (n_out, 4 n_in) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    w = rows.reshape(-1).view(np.float32).reshape((rows.shape[0], x.shape[1]))
    for r in prange(w.shape[0]):
        for t in range(x.shape[0]):
            acc = f32(0)
            for i in range(w.shape[1]):
                acc += w[r, i] * x[t, i]
            out[t, r] = acc


@kernel(parallel=True, reassociate=True)
def matmul_f16(rows, x, out):  # (n_out, 2 n_in) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    w = rows.reshape(-1).view(np.uint16).reshape((rows.shape[0], x.shape[1]))
    rounded = round_to_f16(x.reshape(-1)).reshape(x.shape)
    for r in prange(w.shape[0]):
        for t in range(x.shape[0]):
            acc = f32(0)
            for i in range(w.shape[1]):
                acc += half_to_f32(w[r, i]) * rounded[t, i]
            out[t, r] = acc


@kernel(parallel=True, reassociate=True)
def matmul_bf16(rows, x, out):  # (n_out, 2 n_in) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    w = rows.reshape(-1).view(np.uint16).reshape((rows.shape[0], x.shape[1]))
    rounded = round_to_bf16(x.reshape(-1)).reshape(x.shape)
    for r in prange(w.shape[0]):
        for t in range(x.shape[0]):
            acc = f32(0)
            for i in range(w.shape[1]):
                acc += u32_as_f32(np.uint32(w[r, i]) << np.uint32(16)) * rounded[t, i]
            out[t, r] = acc


# ggml type -> kernel(rows, x (n_in,), out (n_out,)), and kernel(rows, x (n_tok, n_in), out (n_tok, n_out)).
GGML_MATVEC_KERNELS = {
    T.F32: matvec_f32,
    T.F16: matvec_f16_by_f16,
    T.BF16: matvec_bf16_by_bf16,
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
GGML_MATMUL_KERNELS = {
    T.F32: matmul_f32,
    T.F16: matmul_f16,
    T.BF16: matmul_bf16,
    T.Q8_0: matmul_q8_0,
    T.Q4_0: matmul_q4_0,
    T.Q4_1: matmul_q4_1,
    T.Q5_0: matmul_q5_0,
    T.Q5_1: matmul_q5_1,
    T.Q2_K: matmul_q2_k,
    T.Q3_K: matmul_q3_k,
    T.Q4_K: matmul_q4_k,
    T.Q5_K: matmul_q5_k,
    T.Q6_K: matmul_q6_k,
}

# What each weight type's activations are quantized to (ggml-cpu.c's type_traits_cpu), and how.
VEC_DOT_TYPES = {
    T.F32: T.F32,
    T.F16: T.F16,
    T.BF16: T.BF16,
    T.Q8_0: T.Q8_0,
    T.Q4_0: T.Q8_0,
    T.Q5_0: T.Q8_0,
    T.Q4_1: T.Q8_1,
    T.Q5_1: T.Q8_1,
    T.Q2_K: T.Q8_K,
    T.Q3_K: T.Q8_K,
    T.Q4_K: T.Q8_K,
    T.Q5_K: T.Q8_K,
    T.Q6_K: T.Q8_K,
}

ACTIVATION_KERNELS = {T.Q8_0: activations_q8_0, T.Q8_1: activations_q8_1, T.Q8_K: activations_q8_k}
