"""K-quant matmuls in the float orders of llama.cpp's CPU backend (x86, AVX-512 build), for numerics="ggml".

The integers are those of gemv_ggml.py, exact; what differs between ggml's three K-quant paths is how
the floats meet them, and each is followed here:

  vec_dot   ggml_vec_dot_q*_K_q8_K (arch/x86/quants.c), one token or a batch of fewer than 8: per
            super-block an 8-lane integer sum, acc = fma(d_x * d_w, lanes, acc), hsum_float_8 at the
            end; Q4_K and Q5_K add the mins apart (Q4_K in 4 float lanes, Q5_K in one float).
  tiled     tiled/tiled-kernel.cpp, a batch of 8 tokens or more: per super-block the integers s1 (scaled
            dot products) and s2 (mins times activation sums), then
            buf += (s1 * d_w - d_min * s2) * d_x, super-block after super-block.
  repack    Q4_K whose row count is a multiple of 8, which llama.cpp repacks at load (repack.cpp,
            ggml_gemv/gemm_q4_K_8x8_q8_K), for any number of tokens: acc = fma(s1, d_w * d_x, acc),
            acc_min = fma(s2, d_min * d_x, acc_min), then acc - acc_min.

`matvec_<type>` and `matmul_<type>` pick the path as ggml_compute_forward_mul_mat does for the shape. A batch
runs in gemv_ggml.py's jobs (tiles of rows by chunks of tokens), one row by four tokens at a time where the
path takes tokens in groups (`<type>_tokens`: a super-block's scales and quants decoded once for the four).
Activations are quantized to Q8_K as for gemv_ggml.py's kernels (quantize_mat_q8_K, which the repacked
batches use, gives the same values in another layout).
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from ._jit import kernel, prange
from .gemv import prefetch_block
from .gemv_ggml import (
    activations_q8_k,
    batch_activations_q8_k,
    batch_jobs,
    half_at,
    job_span,
    pair_sums,
    pick,
    store_tile,
)
from .ops_ggml import fma32
from .simd import (
    add_lanes,
    bit_bytes,
    dot_bytes_scaled,
    float_lane,
    fma_lanes,
    high_nibbles,
    k4_mins,
    k4_scales,
    lane,
    load_bytes,
    load_lanes,
    low_nibbles,
    mask_bytes,
    mul_lanes,
    or_bytes,
    pair_products,
    pair_sums_as_floats,
    shift_lanes_left,
    shift_left,
    shift_right,
    sub_lanes,
    sum_floats,
    sum_lanes,
    sum_lanes_4,
    widen_bytes,
    zero_floats,
    zero_lanes,
)

f32 = np.float32
TILED_MIN_BATCH = 8  # ggml_tiled_min_batch: the tiled path takes batches of 8 tokens or more


# ---------------------------------------------------------------- one super-block's integers


@kernel(inline=True)
def q4_k_super(rows, r, b, a, sums32):
    """Q4_K super-block b of row r against activation super-block b: (lanes, mins) Int32x8, lane k of
    `lanes` the scaled products of bytes 4k..4k+3 of every 32-value chunk, mins[s] = m_s * bsum32_s."""
    base = 144 * b
    scales = k4_scales(rows, r, base + 4)
    lanes_low, lanes_high = zero_lanes(), zero_lanes()
    for c in range(4):
        packed = load_bytes(rows, r, base + 16 + 32 * c)
        low, high = lane(scales, 2 * c), lane(scales, 2 * c + 1)
        lanes_low = dot_bytes_scaled(lanes_low, low_nibbles(packed), load_bytes(a, b, 4 + 64 * c), low, low)
        lanes_high = dot_bytes_scaled(lanes_high, high_nibbles(packed), load_bytes(a, b, 36 + 64 * c), high, high)
    return add_lanes(lanes_low, lanes_high), mul_lanes(k4_mins(rows, r, base + 4), load_lanes(sums32, b, 0))


@kernel(inline=True)
def q5_k_super(rows, r, b, a, sums32):
    """Q5_K super-block b of row r: (lanes, mins) as q4_k_super."""
    base = 176 * b
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
    return add_lanes(lanes_low, lanes_high), mul_lanes(k4_mins(rows, r, base + 4), load_lanes(sums32, b, 0))


@kernel(inline=True)
def q6_k_super(rows, r, b, a):
    """Q6_K super-block b of row r: lanes of the scaled products of the unsigned quants (0..63), before
    the offset of 32 comes off."""
    signed_rows = rows.view(np.int8)
    base = 210 * b
    lanes0, lanes1, lanes2, lanes3 = zero_lanes(), zero_lanes(), zero_lanes(), zero_lanes()
    for h in range(2):
        scales = widen_bytes(signed_rows, r, base + 192 + 8 * h)  # sub-blocks 8h .. 8h + 7
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
    return add_lanes(add_lanes(lanes0, lanes1), add_lanes(lanes2, lanes3))


# ---------------------------------------------------------------- vec_dot: ggml_vec_dot_q*_K_q8_K


@kernel
def q4_k_vec_dot(rows, r, a, a_scales, sums32):
    acc = zero_floats()
    m0 = m1 = m2 = m3 = f32(0)  # _mm_madd_epi16(mins, q8s): lane k the mins of sub-blocks 2k and 2k + 1
    for b in range(a.shape[0]):
        prefetch_block(rows, r, 144 * b, 144)
        lanes, mins = q4_k_super(rows, r, b, a, sums32)
        d = a_scales[b] * half_at(rows, r, 144 * b)
        dmin = -(a_scales[b] * half_at(rows, r, 144 * b + 2))
        m0 = fma32(dmin, f32(lane(mins, 0) + lane(mins, 1)), m0)
        m1 = fma32(dmin, f32(lane(mins, 2) + lane(mins, 3)), m1)
        m2 = fma32(dmin, f32(lane(mins, 4) + lane(mins, 5)), m2)
        m3 = fma32(dmin, f32(lane(mins, 6) + lane(mins, 7)), m3)
        acc = fma_lanes(acc, lanes, d)
    return sum_floats(acc) + ((m0 + m2) + (m1 + m3))


@kernel
def q5_k_vec_dot(rows, r, a, a_scales, sums32):
    acc = zero_floats()
    summs = f32(0)
    for b in range(a.shape[0]):
        prefetch_block(rows, r, 176 * b, 176)
        lanes, mins = q5_k_super(rows, r, b, a, sums32)
        d = a_scales[b] * half_at(rows, r, 176 * b)
        dmin = -(a_scales[b] * half_at(rows, r, 176 * b + 2))
        summs = fma32(dmin, f32(sum_lanes(mins)), summs)
        acc = fma_lanes(acc, lanes, d)
    return sum_floats(acc) + summs


@kernel
def q6_k_vec_dot(rows, r, a, a_scales, a_sums):
    """Lane k takes off 32 (sc_2k bsum_2k + sc_2k+1 bsum_2k+1), as ggml's q8sclsub."""
    signed_rows = rows.view(np.int8)
    acc = zero_floats()
    for b in range(a.shape[0]):
        prefetch_block(rows, r, 210 * b, 210)
        lanes = q6_k_super(rows, r, b, a)
        offsets = shift_lanes_left(pair_products(signed_rows, r, 210 * b + 192, a_sums, b), 5)
        acc = fma_lanes(acc, sub_lanes(lanes, offsets), a_scales[b] * half_at(rows, r, 210 * b + 208))
    return sum_floats(acc)


# ---------------------------------------------------------------- tiled and repacked


@kernel(inline=True)
def q4_k_tiled_block(total, rows, r, b, a, a_scales, sums32):
    """total + super-block b's term, as tiled-kernel.cpp adds it: (s1 * d_w - d_min * s2) * d_x."""
    lanes, mins = q4_k_super(rows, r, b, a, sums32)
    result = fma32(
        -half_at(rows, r, 144 * b + 2), f32(sum_lanes(mins)), f32(sum_lanes(lanes)) * half_at(rows, r, 144 * b)
    )
    return fma32(result, a_scales[b], total)


@kernel(inline=True)
def q5_k_tiled_block(total, rows, r, b, a, a_scales, sums32):
    lanes, mins = q5_k_super(rows, r, b, a, sums32)
    result = fma32(
        -half_at(rows, r, 176 * b + 2), f32(sum_lanes(mins)), f32(sum_lanes(lanes)) * half_at(rows, r, 176 * b)
    )
    return fma32(result, a_scales[b], total)


@kernel(inline=True)
def q6_k_tiled_block(total, rows, r, b, a, a_scales, a_sums):
    lanes = q6_k_super(rows, r, b, a)
    offsets = shift_lanes_left(pair_products(rows.view(np.int8), r, 210 * b + 192, a_sums, b), 5)
    result = f32(sum_lanes(sub_lanes(lanes, offsets))) * half_at(rows, r, 210 * b + 208)
    return fma32(result, a_scales[b], total)


@kernel
def q4_k_tiled(rows, r, a, a_scales, sums32):
    total = f32(0)
    for b in range(a.shape[0]):
        total = q4_k_tiled_block(total, rows, r, b, a, a_scales, sums32)
    return total


# Four tokens against one row, each token's sum as the function above computes it alone: the row's weight
# blocks are decoded once for the four (the same loads and decoding in one loop body, which LLVM merges).
@kernel(inline=True)
def q4_k_tiled_tokens(rows, r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    total0 = total1 = total2 = total3 = f32(0)
    for b in range(a0.shape[0]):
        total0 = q4_k_tiled_block(total0, rows, r, b, a0, s0, m0)
        total1 = q4_k_tiled_block(total1, rows, r, b, a1, s1, m1)
        total2 = q4_k_tiled_block(total2, rows, r, b, a2, s2, m2)
        total3 = q4_k_tiled_block(total3, rows, r, b, a3, s3, m3)
    return total0, total1, total2, total3


@kernel(inline=True)
def q5_k_tiled_tokens(rows, r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    total0 = total1 = total2 = total3 = f32(0)
    for b in range(a0.shape[0]):
        total0 = q5_k_tiled_block(total0, rows, r, b, a0, s0, m0)
        total1 = q5_k_tiled_block(total1, rows, r, b, a1, s1, m1)
        total2 = q5_k_tiled_block(total2, rows, r, b, a2, s2, m2)
        total3 = q5_k_tiled_block(total3, rows, r, b, a3, s3, m3)
    return total0, total1, total2, total3


@kernel(inline=True)
def q6_k_tiled_tokens(rows, r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    total0 = total1 = total2 = total3 = f32(0)
    for b in range(a0.shape[0]):
        total0 = q6_k_tiled_block(total0, rows, r, b, a0, s0, m0)
        total1 = q6_k_tiled_block(total1, rows, r, b, a1, s1, m1)
        total2 = q6_k_tiled_block(total2, rows, r, b, a2, s2, m2)
        total3 = q6_k_tiled_block(total3, rows, r, b, a3, s3, m3)
    return total0, total1, total2, total3


@kernel(inline=True)
def q4_k_gemm_chunk(acc, acc_min, q_low, q_high, a, b, c, low, high, d, dmin, mins):
    """(acc, acc_min) after 64-value chunk c of super-block b (quants q_low, q_high; sub-block scales low, high;
    d = d_w d_x, dmin = dmin_w d_x; mins: the sub-blocks' m * bsum32), as ggml_gemm_q4_K_8x8_q8_K adds it."""
    lanes = dot_bytes_scaled(zero_lanes(), q_low, load_bytes(a, b, 4 + 64 * c), low, low)
    lanes = dot_bytes_scaled(lanes, q_high, load_bytes(a, b, 36 + 64 * c), high, high)
    acc = fma32(f32(sum_lanes(lanes)), d, acc)
    return acc, fma32(f32(lane(mins, 2 * c) + lane(mins, 2 * c + 1)), dmin, acc_min)


@kernel(inline=True)
def q4_k_repacked_gemm_block(acc, acc_min, rows, r, b, a, a_scales, sums32):
    """ggml_gemm_q4_K_8x8_q8_K's sums after super-block b: the float sums take each 64-value chunk's integers
    (two sub-blocks) in turn, where the gemv takes a super-block's."""
    base = 144 * b
    scales = k4_scales(rows, r, base + 4)
    mins = mul_lanes(k4_mins(rows, r, base + 4), load_lanes(sums32, b, 0))
    d = half_at(rows, r, base) * a_scales[b]
    dmin = half_at(rows, r, base + 2) * a_scales[b]
    for c in range(4):
        packed = load_bytes(rows, r, base + 16 + 32 * c)
        low, high = lane(scales, 2 * c), lane(scales, 2 * c + 1)
        acc, acc_min = q4_k_gemm_chunk(
            acc, acc_min, low_nibbles(packed), high_nibbles(packed), a, b, c, low, high, d, dmin, mins
        )
    return acc, acc_min


@kernel(inline=True)
def q4_k_chunk_lanes(q_low, q_high, a, b, c, low, high):
    """The scaled products of 64-value chunk c of super-block b (quants q_low, q_high; scales low, high)."""
    lanes = dot_bytes_scaled(zero_lanes(), q_low, load_bytes(a, b, 4 + 64 * c), low, low)
    return dot_bytes_scaled(lanes, q_high, load_bytes(a, b, 36 + 64 * c), high, high)


@kernel(inline=True)
def q4_k_repacked_gemm_tokens(rows, r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    """q4_k_repacked_gemm_block for a group of 4 tokens, chunk after chunk: a chunk's quants are unpacked once
    and go through the four tokens, whose four integer sums are reduced together (simd.sum_lanes_4); each
    token's float sums in the order of its own (the mins' pairs converted to float once a super-block)."""
    acc0 = acc1 = acc2 = acc3 = f32(0)
    min0 = min1 = min2 = min3 = f32(0)
    for b in range(a0.shape[0]):
        base = 144 * b
        scales = k4_scales(rows, r, base + 4)
        mins_w = k4_mins(rows, r, base + 4)
        pairs0 = pair_sums_as_floats(mul_lanes(mins_w, load_lanes(m0, b, 0)))
        pairs1 = pair_sums_as_floats(mul_lanes(mins_w, load_lanes(m1, b, 0)))
        pairs2 = pair_sums_as_floats(mul_lanes(mins_w, load_lanes(m2, b, 0)))
        pairs3 = pair_sums_as_floats(mul_lanes(mins_w, load_lanes(m3, b, 0)))
        d_w, dmin_w = half_at(rows, r, base), half_at(rows, r, base + 2)
        d0, d1, d2, d3 = d_w * s0[b], d_w * s1[b], d_w * s2[b], d_w * s3[b]
        dmin0, dmin1, dmin2, dmin3 = dmin_w * s0[b], dmin_w * s1[b], dmin_w * s2[b], dmin_w * s3[b]
        for c in range(4):
            packed = load_bytes(rows, r, base + 16 + 32 * c)
            q_low, q_high = low_nibbles(packed), high_nibbles(packed)
            low, high = lane(scales, 2 * c), lane(scales, 2 * c + 1)
            i0, i1, i2, i3 = sum_lanes_4(
                q4_k_chunk_lanes(q_low, q_high, a0, b, c, low, high),
                q4_k_chunk_lanes(q_low, q_high, a1, b, c, low, high),
                q4_k_chunk_lanes(q_low, q_high, a2, b, c, low, high),
                q4_k_chunk_lanes(q_low, q_high, a3, b, c, low, high),
            )
            acc0, acc1 = fma32(f32(i0), d0, acc0), fma32(f32(i1), d1, acc1)
            acc2, acc3 = fma32(f32(i2), d2, acc2), fma32(f32(i3), d3, acc3)
            min0, min1 = fma32(float_lane(pairs0, c), dmin0, min0), fma32(float_lane(pairs1, c), dmin1, min1)
            min2, min3 = fma32(float_lane(pairs2, c), dmin2, min2), fma32(float_lane(pairs3, c), dmin3, min3)
    return acc0 - min0, acc1 - min1, acc2 - min2, acc3 - min3


@kernel
def q4_k_repacked(rows, r, a, a_scales, sums32):
    """ggml_gemv_q4_K_8x8_q8_K (one token, the tokens past the last group of 4, and mul_mat_id)."""
    acc = f32(0)
    acc_min = f32(0)
    for b in range(a.shape[0]):
        prefetch_block(rows, r, 144 * b, 144)
        lanes, mins = q4_k_super(rows, r, b, a, sums32)
        acc = fma32(f32(sum_lanes(lanes)), half_at(rows, r, 144 * b) * a_scales[b], acc)
        acc_min = fma32(f32(sum_lanes(mins)), half_at(rows, r, 144 * b + 2) * a_scales[b], acc_min)
    return acc - acc_min


# Four tokens against one row in the float orders of the one-token paths above (vec_dot, the repacked gemv), as
# mul_mat_id computes an expert's tokens one by one (kernels/moe_ggml.py): a super-block's scales and quants decoded
# once for the four, whose integer sums are reduced together (simd.sum_lanes_4); each token's floats as its own.


@kernel(inline=True)
def q4_k_repacked_tokens(rows, r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    """q4_k_repacked of row r for four tokens."""
    acc0 = acc1 = acc2 = acc3 = f32(0)
    min0 = min1 = min2 = min3 = f32(0)
    for b in range(a0.shape[0]):
        lanes0, mins0 = q4_k_super(rows, r, b, a0, m0)
        lanes1, mins1 = q4_k_super(rows, r, b, a1, m1)
        lanes2, mins2 = q4_k_super(rows, r, b, a2, m2)
        lanes3, mins3 = q4_k_super(rows, r, b, a3, m3)
        i0, i1, i2, i3 = sum_lanes_4(lanes0, lanes1, lanes2, lanes3)
        n0, n1, n2, n3 = sum_lanes_4(mins0, mins1, mins2, mins3)
        d_w, dmin_w = half_at(rows, r, 144 * b), half_at(rows, r, 144 * b + 2)
        acc0, acc1 = fma32(f32(i0), d_w * s0[b], acc0), fma32(f32(i1), d_w * s1[b], acc1)
        acc2, acc3 = fma32(f32(i2), d_w * s2[b], acc2), fma32(f32(i3), d_w * s3[b], acc3)
        min0, min1 = fma32(f32(n0), dmin_w * s0[b], min0), fma32(f32(n1), dmin_w * s1[b], min1)
        min2, min3 = fma32(f32(n2), dmin_w * s2[b], min2), fma32(f32(n3), dmin_w * s3[b], min3)
    return acc0 - min0, acc1 - min1, acc2 - min2, acc3 - min3


@kernel(inline=True)
def q4_k_vec_dot_block(acc, m0, m1, m2, m3, lanes, mins, d, dmin):
    """One super-block into q4_k_vec_dot's sums: 8 float lanes and the mins' 4 pair sums."""
    m0 = fma32(dmin, f32(lane(mins, 0) + lane(mins, 1)), m0)
    m1 = fma32(dmin, f32(lane(mins, 2) + lane(mins, 3)), m1)
    m2 = fma32(dmin, f32(lane(mins, 4) + lane(mins, 5)), m2)
    m3 = fma32(dmin, f32(lane(mins, 6) + lane(mins, 7)), m3)
    return fma_lanes(acc, lanes, d), m0, m1, m2, m3


@kernel(inline=True)
def q4_k_vec_dot_tokens(rows, r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    """q4_k_vec_dot of row r for four tokens."""
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    p00 = p01 = p02 = p03 = p10 = p11 = p12 = p13 = f32(0)
    p20 = p21 = p22 = p23 = p30 = p31 = p32 = p33 = f32(0)
    for b in range(a0.shape[0]):
        d_w, dmin_w = half_at(rows, r, 144 * b), half_at(rows, r, 144 * b + 2)
        lanes, mins = q4_k_super(rows, r, b, a0, m0)
        acc0, p00, p01, p02, p03 = q4_k_vec_dot_block(acc0, p00, p01, p02, p03, lanes, mins, s0[b] * d_w,
                                                      -(s0[b] * dmin_w))  # fmt: skip
        lanes, mins = q4_k_super(rows, r, b, a1, m1)
        acc1, p10, p11, p12, p13 = q4_k_vec_dot_block(acc1, p10, p11, p12, p13, lanes, mins, s1[b] * d_w,
                                                      -(s1[b] * dmin_w))  # fmt: skip
        lanes, mins = q4_k_super(rows, r, b, a2, m2)
        acc2, p20, p21, p22, p23 = q4_k_vec_dot_block(acc2, p20, p21, p22, p23, lanes, mins, s2[b] * d_w,
                                                      -(s2[b] * dmin_w))  # fmt: skip
        lanes, mins = q4_k_super(rows, r, b, a3, m3)
        acc3, p30, p31, p32, p33 = q4_k_vec_dot_block(acc3, p30, p31, p32, p33, lanes, mins, s3[b] * d_w,
                                                      -(s3[b] * dmin_w))  # fmt: skip
    return (
        sum_floats(acc0) + ((p00 + p02) + (p01 + p03)),
        sum_floats(acc1) + ((p10 + p12) + (p11 + p13)),
        sum_floats(acc2) + ((p20 + p22) + (p21 + p23)),
        sum_floats(acc3) + ((p30 + p32) + (p31 + p33)),
    )


@kernel(inline=True)
def q5_k_vec_dot_tokens(rows, r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    """q5_k_vec_dot of row r for four tokens."""
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    summs0 = summs1 = summs2 = summs3 = f32(0)
    for b in range(a0.shape[0]):
        d_w, dmin_w = half_at(rows, r, 176 * b), half_at(rows, r, 176 * b + 2)
        lanes0, mins0 = q5_k_super(rows, r, b, a0, m0)
        lanes1, mins1 = q5_k_super(rows, r, b, a1, m1)
        lanes2, mins2 = q5_k_super(rows, r, b, a2, m2)
        lanes3, mins3 = q5_k_super(rows, r, b, a3, m3)
        n0, n1, n2, n3 = sum_lanes_4(mins0, mins1, mins2, mins3)
        summs0, summs1 = fma32(-(s0[b] * dmin_w), f32(n0), summs0), fma32(-(s1[b] * dmin_w), f32(n1), summs1)
        summs2, summs3 = fma32(-(s2[b] * dmin_w), f32(n2), summs2), fma32(-(s3[b] * dmin_w), f32(n3), summs3)
        acc0, acc1 = fma_lanes(acc0, lanes0, s0[b] * d_w), fma_lanes(acc1, lanes1, s1[b] * d_w)
        acc2, acc3 = fma_lanes(acc2, lanes2, s2[b] * d_w), fma_lanes(acc3, lanes3, s3[b] * d_w)
    return sum_floats(acc0) + summs0, sum_floats(acc1) + summs1, sum_floats(acc2) + summs2, sum_floats(acc3) + summs3


@kernel(inline=True)
def q6_k_vec_dot_tokens(rows, r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    """q6_k_vec_dot of row r for four tokens (m0..m3: the tokens' 16-value activation sums)."""
    signed_rows = rows.view(np.int8)
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    for b in range(a0.shape[0]):
        d_w = half_at(rows, r, 210 * b + 208)
        offsets0 = shift_lanes_left(pair_products(signed_rows, r, 210 * b + 192, m0, b), 5)
        offsets1 = shift_lanes_left(pair_products(signed_rows, r, 210 * b + 192, m1, b), 5)
        offsets2 = shift_lanes_left(pair_products(signed_rows, r, 210 * b + 192, m2, b), 5)
        offsets3 = shift_lanes_left(pair_products(signed_rows, r, 210 * b + 192, m3, b), 5)
        acc0 = fma_lanes(acc0, sub_lanes(q6_k_super(rows, r, b, a0), offsets0), s0[b] * d_w)
        acc1 = fma_lanes(acc1, sub_lanes(q6_k_super(rows, r, b, a1), offsets1), s1[b] * d_w)
        acc2 = fma_lanes(acc2, sub_lanes(q6_k_super(rows, r, b, a2), offsets2), s2[b] * d_w)
        acc3 = fma_lanes(acc3, sub_lanes(q6_k_super(rows, r, b, a3), offsets3), s3[b] * d_w)
    return sum_floats(acc0), sum_floats(acc1), sum_floats(acc2), sum_floats(acc3)


# ---------------------------------------------------------------- the kernels, by ggml's choice of path


@kernel(parallel=True)
def matmul_q4_k(rows, x, out):  # (n_out, n_blocks * 144) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, a_scales, a_sums = batch_activations_q8_k(x)
    m = pair_sums(a_sums)
    s = a_scales
    n_tok, n_out = x.shape[0], rows.shape[0]
    repacked = n_out % 8 == 0  # ggml_repack_get_optimal_repack_type: q4_K_8x8 on AVX2 and up
    n_gemm = n_tok - n_tok % 4 if n_tok > 3 else 0  # forward_mul_mat_one_chunk: gemm for groups of 4 rows
    grouped = n_gemm if repacked else (n_tok if n_tok >= TILED_MIN_BATCH else 0)  # tokens taken 4 at a time
    tile, n_jobs, n_chunks = batch_jobs(n_out, rows.shape[1], n_tok)
    for job in prange(n_jobs):
        r_begin, r_end, t_begin, t_end = job_span(job, tile, n_chunks, n_out, n_tok)
        for t in range(t_begin, t_end, 4):
            if t < grouped:
                t1, t2, t3 = pick(t, 1, t_end), pick(t, 2, t_end), pick(t, 3, t_end)
                for r in range(r_begin, r_end):
                    if repacked:
                        y = q4_k_repacked_gemm_tokens(rows, r, a[t], a[t1], a[t2], a[t3], s[t], s[t1], s[t2], s[t3],
                                                      m[t], m[t1], m[t2], m[t3])  # fmt: skip
                    else:
                        y = q4_k_tiled_tokens(rows, r, a[t], a[t1], a[t2], a[t3], s[t], s[t1], s[t2], s[t3],
                                              m[t], m[t1], m[t2], m[t3])  # fmt: skip
                    store_tile(out, y, r, t, 1, min(4, t_end - t))
                continue
            for u in range(t, min(t + 4, t_end)):
                for r in range(r_begin, r_end):
                    if repacked:
                        out[u, r] = q4_k_repacked(rows, r, a[u], s[u], m[u])
                    else:
                        out[u, r] = q4_k_vec_dot(rows, r, a[u], s[u], m[u])


@kernel(parallel=True)
def matmul_id_q4_k(rows, x, out):  # one expert of a MUL_MAT_ID: (n_out, n_blocks * 144) uint8, (n_tok, n_in) -> out
    """An expert's tokens as ggml_compute_forward_mul_mat_id runs them: a repacked tensor's forward_mul_mat_id
    takes every token through the gemv; otherwise tiled from 8 tokens routed to the expert, vec_dot below."""
    a, a_scales, a_sums = activations_q8_k(x)
    sums32 = pair_sums(a_sums)
    n_tok = x.shape[0]
    repacked = rows.shape[0] % 8 == 0
    for r in prange(rows.shape[0]):
        for t in range(n_tok):
            if repacked:
                out[t, r] = q4_k_repacked(rows, r, a[t], a_scales[t], sums32[t])
            elif n_tok >= TILED_MIN_BATCH:
                out[t, r] = q4_k_tiled(rows, r, a[t], a_scales[t], sums32[t])
            else:
                out[t, r] = q4_k_vec_dot(rows, r, a[t], a_scales[t], sums32[t])


@kernel(parallel=True)
def matmul_q5_k(rows, x, out):  # (n_out, n_blocks * 176) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, s, a_sums = batch_activations_q8_k(x)
    m = pair_sums(a_sums)
    n_tok, n_out = x.shape[0], rows.shape[0]
    tile, n_jobs, n_chunks = batch_jobs(n_out, rows.shape[1], n_tok)
    for job in prange(n_jobs):
        r_begin, r_end, t_begin, t_end = job_span(job, tile, n_chunks, n_out, n_tok)
        for t in range(t_begin, t_end, 4):
            if n_tok >= TILED_MIN_BATCH:
                t1, t2, t3 = pick(t, 1, t_end), pick(t, 2, t_end), pick(t, 3, t_end)
                for r in range(r_begin, r_end):
                    y = q5_k_tiled_tokens(rows, r, a[t], a[t1], a[t2], a[t3], s[t], s[t1], s[t2], s[t3],
                                          m[t], m[t1], m[t2], m[t3])  # fmt: skip
                    store_tile(out, y, r, t, 1, min(4, t_end - t))
                continue
            for u in range(t, min(t + 4, t_end)):
                for r in range(r_begin, r_end):
                    out[u, r] = q5_k_vec_dot(rows, r, a[u], s[u], m[u])


@kernel(parallel=True)
def matmul_q6_k(rows, x, out):  # (n_out, n_blocks * 210) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, s, a_sums = batch_activations_q8_k(x)
    m = a_sums
    n_tok, n_out = x.shape[0], rows.shape[0]
    tile, n_jobs, n_chunks = batch_jobs(n_out, rows.shape[1], n_tok)
    for job in prange(n_jobs):
        r_begin, r_end, t_begin, t_end = job_span(job, tile, n_chunks, n_out, n_tok)
        for t in range(t_begin, t_end, 4):
            if n_tok >= TILED_MIN_BATCH:
                t1, t2, t3 = pick(t, 1, t_end), pick(t, 2, t_end), pick(t, 3, t_end)
                for r in range(r_begin, r_end):
                    y = q6_k_tiled_tokens(rows, r, a[t], a[t1], a[t2], a[t3], s[t], s[t1], s[t2], s[t3],
                                          m[t], m[t1], m[t2], m[t3])  # fmt: skip
                    store_tile(out, y, r, t, 1, min(4, t_end - t))
                continue
            for u in range(t, min(t + 4, t_end)):
                for r in range(r_begin, r_end):
                    out[u, r] = q6_k_vec_dot(rows, r, a[u], s[u], m[u])


@kernel(parallel=True)
def matvec_q4_k(rows, x, out):  # (n_out, n_blocks * 144) uint8, (n_in,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_k(x.reshape((1, x.shape[0])))
    sums32 = pair_sums(a_sums)
    repacked = rows.shape[0] % 8 == 0
    for r in prange(rows.shape[0]):
        if repacked:
            out[r] = q4_k_repacked(rows, r, a[0], a_scales[0], sums32[0])
        else:
            out[r] = q4_k_vec_dot(rows, r, a[0], a_scales[0], sums32[0])


@kernel(parallel=True)
def matvec_q5_k(rows, x, out):  # (n_out, n_blocks * 176) uint8, (n_in,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_k(x.reshape((1, x.shape[0])))
    sums32 = pair_sums(a_sums)
    for r in prange(rows.shape[0]):
        out[r] = q5_k_vec_dot(rows, r, a[0], a_scales[0], sums32[0])


@kernel(parallel=True)
def matvec_q6_k(rows, x, out):  # (n_out, n_blocks * 210) uint8, (n_in,) float32 -> (n_out,)
    a, a_scales, a_sums = activations_q8_k(x.reshape((1, x.shape[0])))
    for r in prange(rows.shape[0]):
        out[r] = q6_k_vec_dot(rows, r, a[0], a_scales[0], a_sums[0])


@kernel(parallel=True)
def matmul_q4_k_plain(rows, x, out):  # Q4_K that llama.cpp does not repack (a 3-D tensor through mul_mat)
    a, s, a_sums = batch_activations_q8_k(x)
    m = pair_sums(a_sums)
    n_tok, n_out = x.shape[0], rows.shape[0]
    tile, n_jobs, n_chunks = batch_jobs(n_out, rows.shape[1], n_tok)
    for job in prange(n_jobs):
        r_begin, r_end, t_begin, t_end = job_span(job, tile, n_chunks, n_out, n_tok)
        for t in range(t_begin, t_end, 4):
            if n_tok >= TILED_MIN_BATCH:
                t1, t2, t3 = pick(t, 1, t_end), pick(t, 2, t_end), pick(t, 3, t_end)
                for r in range(r_begin, r_end):
                    y = q4_k_tiled_tokens(rows, r, a[t], a[t1], a[t2], a[t3], s[t], s[t1], s[t2], s[t3],
                                          m[t], m[t1], m[t2], m[t3])  # fmt: skip
                    store_tile(out, y, r, t, 1, min(4, t_end - t))
                continue
            for u in range(t, min(t + 4, t_end)):
                for r in range(r_begin, r_end):
                    out[u, r] = q4_k_vec_dot(rows, r, a[u], s[u], m[u])


@kernel(parallel=True)
def matvec_q4_k_plain(rows, x, out):
    a, a_scales, a_sums = activations_q8_k(x.reshape((1, x.shape[0])))
    sums32 = pair_sums(a_sums)
    for r in prange(rows.shape[0]):
        out[r] = q4_k_vec_dot(rows, r, a[0], a_scales[0], sums32[0])


# Slices of a 3-D tensor for one token (gemv_ggml.py's matvec_slices_*): experts through mul_mat_id (Q4_K
# repacked: the gemv), or the heads of a 3-D tensor through mul_mat (Q4_K not repacked: vec_dot).


@kernel(parallel=True)
def matvec_slices_q4_k(rows, n_out, slices, x, out):
    a, a_scales, a_sums = activations_q8_k(x)
    sums32 = pair_sums(a_sums)
    repacked = n_out % 8 == 0
    for job in prange(slices.shape[0] * n_out):
        j, r = job // n_out, job % n_out
        i = j if x.shape[0] > 1 else 0
        row = slices[j] * n_out + r
        if repacked:
            out[j, r] = q4_k_repacked(rows, row, a[i], a_scales[i], sums32[i])
        else:
            out[j, r] = q4_k_vec_dot(rows, row, a[i], a_scales[i], sums32[i])


@kernel(parallel=True)
def matvec_slices_q4_k_plain(rows, n_out, slices, x, out):
    a, a_scales, a_sums = activations_q8_k(x)
    sums32 = pair_sums(a_sums)
    for job in prange(slices.shape[0] * n_out):
        j, r = job // n_out, job % n_out
        i = j if x.shape[0] > 1 else 0
        out[j, r] = q4_k_vec_dot(rows, slices[j] * n_out + r, a[i], a_scales[i], sums32[i])


@kernel(parallel=True)
def matvec_slices_q5_k(rows, n_out, slices, x, out):
    a, a_scales, a_sums = activations_q8_k(x)
    sums32 = pair_sums(a_sums)
    for job in prange(slices.shape[0] * n_out):
        j, r = job // n_out, job % n_out
        i = j if x.shape[0] > 1 else 0
        out[j, r] = q5_k_vec_dot(rows, slices[j] * n_out + r, a[i], a_scales[i], sums32[i])


@kernel(parallel=True)
def matvec_slices_q6_k(rows, n_out, slices, x, out):
    a, a_scales, a_sums = activations_q8_k(x)
    for job in prange(slices.shape[0] * n_out):
        j, r = job // n_out, job % n_out
        i = j if x.shape[0] > 1 else 0
        out[j, r] = q6_k_vec_dot(rows, slices[j] * n_out + r, a[i], a_scales[i], a_sums[i])


KQUANT_MATVEC_SLICES_KERNELS = {T.Q4_K: matvec_slices_q4_k, T.Q5_K: matvec_slices_q5_k, T.Q6_K: matvec_slices_q6_k}
KQUANT_MATVEC_KERNELS = {T.Q4_K: matvec_q4_k, T.Q5_K: matvec_q5_k, T.Q6_K: matvec_q6_k}
KQUANT_MATMUL_KERNELS = {T.Q4_K: matmul_q4_k, T.Q5_K: matmul_q5_k, T.Q6_K: matmul_q6_k}
# MUL_MAT_ID (an expert's tokens) where it differs from MUL_MAT
KQUANT_MATMUL_ID_KERNELS = {T.Q4_K: matmul_id_q4_k}
# Types llama.cpp repacks at load when the tensor is 2-D (or an expert tensor): their kernels for the tensors it
# leaves alone (3-D ones that mul_mat broadcasts, as deepseek2's attn_v_b), (matvec, matmul).
KQUANT_UNREPACKED_KERNELS = {T.Q4_K: (matvec_q4_k_plain, matmul_q4_k_plain, matvec_slices_q4_k_plain)}
