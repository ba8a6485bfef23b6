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

Each type's work on one weight block is a `<type>_block` function (or a `<type>_row` one);
`matvec_<type>` runs it over the rows for one token, and `matmul_<type>`, kernel(rows, x (n_tok, n_in),
out (n_tok, n_out)), over a batch in jobs of a tile of rows by a chunk of tokens, two rows by four
tokens at a time (`<type>_tile`), each weight block decoded once for the four tokens: what ggml's
mul_mat computes for a batch (x quantized token by token, vec_dot or tinyBLAS for every row and
token), in the same integers and, output by output, the same float operations as one token's.
Block layouts are those of legacy.py and kquants.py; each block function restates its own.
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from ._jit import f16_to_f32, kernel, prange, u32_as_f32
from .activations import (
    Q8_0_BYTES,
    Q8_1_BYTES,
    Q8_K_BYTES,
    quantize_q8_0,
    quantize_q8_1,
    quantize_q8_k,
)
from .float_ggml import (
    matmul_f16_ggml,
    matmul_f32_ggml,
    matmul_id_f32_ggml,
    matvec_f16_ggml,
    matvec_f32_ggml,
    matvec_slices_f32_ggml,
)
from .gemv import half_to_f32, prefetch_block
from .quantize import f32_bits
from .simd import (
    HAS_F16C,
    add_lanes,
    and_lanes,
    bit_bytes,
    bits_to_bytes,
    dot_bytes,
    dot_bytes_scaled,
    dot_signed_bytes,
    fma_lanes,
    lane,
    load_bytes,
    load_lanes,
    load_nibbles,
    load_u16,
    load_u32,
    mask_bytes,
    mul_lanes,
    or_bytes,
    q3k_scales,
    shift_lanes_right,
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


# A batch's tokens are quantized on every thread (each token on its own, so the same blocks as one by one).


@kernel(parallel=True)
def batch_activations_q8_0(x):  # activations_q8_0 of a batch
    n_tok, n_blocks = x.shape[0], x.shape[1] // 32
    blocks = np.empty((n_tok, n_blocks, Q8_0_BYTES), dtype=np.uint8)
    scales = np.empty((n_tok, n_blocks), dtype=np.float32)
    sums = np.empty((n_tok, n_blocks, 8), dtype=np.int32)
    for t in prange(n_tok):
        quantize_q8_0(x[t].reshape((n_blocks, 32)), blocks[t], scales[t], sums[t])
    return blocks, scales, sums


@kernel(parallel=True)
def batch_activations_q8_1(x):  # activations_q8_1 of a batch
    n_tok, n_blocks = x.shape[0], x.shape[1] // 32
    blocks = np.empty((n_tok, n_blocks, Q8_1_BYTES), dtype=np.uint8)
    scales = np.empty((n_tok, n_blocks), dtype=np.float32)
    sums = np.empty((n_tok, n_blocks), dtype=np.float32)
    for t in prange(n_tok):
        quantize_q8_1(x[t].reshape((n_blocks, 32)), blocks[t], scales[t], sums[t])
    return blocks, scales, sums


@kernel(parallel=True)
def batch_activations_q8_k(x):  # activations_q8_k of a batch
    n_tok, n_blocks = x.shape[0], x.shape[1] // 256
    blocks = np.empty((n_tok, n_blocks, Q8_K_BYTES), dtype=np.uint8)
    scales = np.empty((n_tok, n_blocks), dtype=np.float32)
    sums = np.empty((n_tok, n_blocks, 16), dtype=np.int32)
    for t in prange(n_tok):
        quantize_q8_k(x[t].reshape((n_blocks, 256)), blocks[t], scales[t], sums[t])
    return blocks, scales, sums


# ---------------------------------------------------------------- a batch's jobs
# A batch is cut into jobs, each a tile of rows by a chunk of tokens, as ggml_compute_forward_mul_mat cuts
# its output into chunks. Within a job, token groups of four take turns over the tile: the group's quantized
# activations stay in L1 while the tile's rows pass, and the tile (ROW_TILE_BYTES of weights) stays in L2 for
# the next group; each weight block is decoded once for the four tokens of a group. Every output is still
# its own (row, token) dot product, in the same order of integer and float operations as one token's.
ROW_TILE_BYTES = 32768
TOKEN_CHUNK = 64


@kernel
def batch_jobs(n_out, row_bytes, n_tok):
    """(rows per tile, jobs, token chunks) of a batch: tiles of a multiple of 4 rows, at least 4."""
    tile = max(4, ROW_TILE_BYTES // max(row_bytes, 1) // 4 * 4)
    n_chunks = (n_tok + TOKEN_CHUNK - 1) // TOKEN_CHUNK
    return tile, (n_out + tile - 1) // tile * n_chunks, n_chunks


@kernel
def job_span(job, tile, n_chunks, n_out, n_tok):
    """Rows r_begin .. r_end - 1 and tokens t_begin .. t_end - 1 of a job."""
    i, c = job // n_chunks, job % n_chunks
    return i * tile, min(n_out, (i + 1) * tile), c * TOKEN_CHUNK, min(n_tok, (c + 1) * TOKEN_CHUNK)


@kernel
def store_tile(out, y, r, t, n_rows, n_tokens):
    """out[t + k, r + i] = y[4 i + k] for the tile's real rows and tokens (the clamped ones are dropped)."""
    for i in range(n_rows):
        for k in range(n_tokens):
            out[t + k, r + i] = y[4 * i + k]


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


# A row's dot product, as ggml_vec_dot_<type>_q8_* (and llamafile's tinyBLAS_Q0_AVX, whose sum for
# one output is the same) add it: one 8-lane float accumulator, acc = fma(d_w * d_x, lanes, acc) block
# after block, then hsum_float_8; the min types add their m * s terms in a float of their own, after.
# One chain of dependent fused multiply-adds per output is slow (4 cycles a block), so four outputs
# run side by side: four rows against one token (a matvec), or one row against four tokens (a batch).
# `pick` clamps a group's last indices to the last row or token: the extra work is thrown away.


@kernel
def pick(i, k, n):
    return min(i + k, n - 1)


@kernel(inline=True)
def q8_0_dots(rows, r0, r1, r2, r3, a0, a1, a2, a3, s0, s1, s2, s3):
    """Q8_0 rows r0..r3 of `rows` against quantized activations a0..a3 (n_blocks, 34), scales s0..s3."""
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    for b in range(a0.shape[0]):
        prefetch_block(rows, r0, 34 * b, 34)
        prefetch_block(rows, r1, 34 * b, 34)
        prefetch_block(rows, r2, 34 * b, 34)
        prefetch_block(rows, r3, 34 * b, 34)
        acc0 = q8_0_block(acc0, rows, r0, b, a0, s0)
        acc1 = q8_0_block(acc1, rows, r1, b, a1, s1)
        acc2 = q8_0_block(acc2, rows, r2, b, a2, s2)
        acc3 = q8_0_block(acc3, rows, r3, b, a3, s3)
    return sum_floats(acc0), sum_floats(acc1), sum_floats(acc2), sum_floats(acc3)


@kernel(parallel=True)
def matvec_q8_0(rows, x, out):  # (n_out, n_blocks * 34) uint8, (n_blocks * 32,) float32 -> (n_out,)
    a, a_scales, _ = activations_q8_0(x.reshape((1, x.shape[0])))
    n = rows.shape[0]
    for g in prange((n + 3) // 4):
        r = 4 * g
        y = q8_0_dots(rows, r, pick(r, 1, n), pick(r, 2, n), pick(r, 3, n), a[0], a[0], a[0], a[0],
                      a_scales[0], a_scales[0], a_scales[0], a_scales[0])  # fmt: skip
        for k in range(min(4, n - r)):
            out[r + k] = y[k]


@kernel(inline=True)
def q8_0_tile(rows, r0, r1, a0, a1, a2, a3, s0, s1, s2, s3):
    """Q8_0 rows r0, r1 by four tokens (activations a0..a3, scales s0..s3): the 8 dots of
    q8_0_dots, row by row. Each weight block is decoded once for the four tokens (LLVM merges the loads)."""
    acc00, acc01, acc02, acc03 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    acc10, acc11, acc12, acc13 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    for b in range(a0.shape[0]):
        acc00 = q8_0_block(acc00, rows, r0, b, a0, s0)
        acc01 = q8_0_block(acc01, rows, r0, b, a1, s1)
        acc02 = q8_0_block(acc02, rows, r0, b, a2, s2)
        acc03 = q8_0_block(acc03, rows, r0, b, a3, s3)
        acc10 = q8_0_block(acc10, rows, r1, b, a0, s0)
        acc11 = q8_0_block(acc11, rows, r1, b, a1, s1)
        acc12 = q8_0_block(acc12, rows, r1, b, a2, s2)
        acc13 = q8_0_block(acc13, rows, r1, b, a3, s3)
    return (
        sum_floats(acc00), sum_floats(acc01), sum_floats(acc02), sum_floats(acc03),
        sum_floats(acc10), sum_floats(acc11), sum_floats(acc12), sum_floats(acc13),
    )  # fmt: skip


@kernel(parallel=True)
def matmul_q8_0(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, s, _ = batch_activations_q8_0(x)
    n_tok, n_out = x.shape[0], rows.shape[0]
    tile, n_jobs, n_chunks = batch_jobs(n_out, rows.shape[1], n_tok)
    for job in prange(n_jobs):
        r_begin, r_end, t_begin, t_end = job_span(job, tile, n_chunks, n_out, n_tok)
        for t in range(t_begin, t_end, 4):
            t1, t2, t3 = pick(t, 1, t_end), pick(t, 2, t_end), pick(t, 3, t_end)
            for r in range(r_begin, r_end, 2):
                y = q8_0_tile(rows, r, pick(r, 1, n_out), a[t], a[t1], a[t2], a[t3], s[t], s[t1], s[t2], s[t3])
                store_tile(out, y, r, t, min(2, r_end - r), min(4, t_end - t))


# Q4_0, 18 bytes, as ggml_vec_dot_q4_0_q8_0
@kernel(inline=True)
def q4_0_dots(rows, r0, r1, r2, r3, a0, a1, a2, a3, s0, s1, s2, s3, o0, o1, o2, o3):
    """Q4_0 rows r0..r3 against activations a0..a3, scales s0..s3, offsets o0..o3 (-8 x lane sums)."""
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    for b in range(a0.shape[0]):
        prefetch_block(rows, r0, 18 * b, 18)
        prefetch_block(rows, r1, 18 * b, 18)
        prefetch_block(rows, r2, 18 * b, 18)
        prefetch_block(rows, r3, 18 * b, 18)
        acc0 = q4_0_block(acc0, rows, r0, b, a0, s0, o0)
        acc1 = q4_0_block(acc1, rows, r1, b, a1, s1, o1)
        acc2 = q4_0_block(acc2, rows, r2, b, a2, s2, o2)
        acc3 = q4_0_block(acc3, rows, r3, b, a3, s3, o3)
    return sum_floats(acc0), sum_floats(acc1), sum_floats(acc2), sum_floats(acc3)


@kernel(parallel=True)
def matvec_q4_0(rows, x, out):  # (n_out, n_blocks * 18) uint8, (n_blocks * 32,) float32 -> (n_out,)
    a, s, a_sums = activations_q8_0(x.reshape((1, x.shape[0])))
    o = scaled(a_sums, -8)
    n = rows.shape[0]
    for g in prange((n + 3) // 4):
        r = 4 * g
        y = q4_0_dots(rows, r, pick(r, 1, n), pick(r, 2, n), pick(r, 3, n), a[0], a[0], a[0], a[0],
                      s[0], s[0], s[0], s[0], o[0], o[0], o[0], o[0])  # fmt: skip
        for k in range(min(4, n - r)):
            out[r + k] = y[k]


@kernel(inline=True)
def q4_0_tile(rows, r0, r1, a0, a1, a2, a3, s0, s1, s2, s3, o0, o1, o2, o3):
    """Q4_0 rows r0, r1 by four tokens (activations a0..a3, scales s0..s3, offsets o0..o3): the 8 dots of
    q4_0_dots, row by row. Each weight block is decoded once for the four tokens (LLVM merges the loads)."""
    acc00, acc01, acc02, acc03 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    acc10, acc11, acc12, acc13 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    for b in range(a0.shape[0]):
        acc00 = q4_0_block(acc00, rows, r0, b, a0, s0, o0)
        acc01 = q4_0_block(acc01, rows, r0, b, a1, s1, o1)
        acc02 = q4_0_block(acc02, rows, r0, b, a2, s2, o2)
        acc03 = q4_0_block(acc03, rows, r0, b, a3, s3, o3)
        acc10 = q4_0_block(acc10, rows, r1, b, a0, s0, o0)
        acc11 = q4_0_block(acc11, rows, r1, b, a1, s1, o1)
        acc12 = q4_0_block(acc12, rows, r1, b, a2, s2, o2)
        acc13 = q4_0_block(acc13, rows, r1, b, a3, s3, o3)
    return (
        sum_floats(acc00), sum_floats(acc01), sum_floats(acc02), sum_floats(acc03),
        sum_floats(acc10), sum_floats(acc11), sum_floats(acc12), sum_floats(acc13),
    )  # fmt: skip


@kernel(parallel=True)
def matmul_q4_0(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, s, a_sums = batch_activations_q8_0(x)
    o = scaled(a_sums, -8)
    n_tok, n_out = x.shape[0], rows.shape[0]
    tile, n_jobs, n_chunks = batch_jobs(n_out, rows.shape[1], n_tok)
    for job in prange(n_jobs):
        r_begin, r_end, t_begin, t_end = job_span(job, tile, n_chunks, n_out, n_tok)
        for t in range(t_begin, t_end, 4):
            t1, t2, t3 = pick(t, 1, t_end), pick(t, 2, t_end), pick(t, 3, t_end)
            for r in range(r_begin, r_end, 2):
                y = q4_0_tile(rows, r, pick(r, 1, n_out), a[t], a[t1], a[t2], a[t3], s[t], s[t1], s[t2], s[t3],
                              o[t], o[t1], o[t2], o[t3])  # fmt: skip
                store_tile(out, y, r, t, min(2, r_end - r), min(4, t_end - t))


# Q5_0, 22 bytes, as ggml_vec_dot_q5_0_q8_0
@kernel(inline=True)
def q5_0_dots(rows, r0, r1, r2, r3, a0, a1, a2, a3, s0, s1, s2, s3, o0, o1, o2, o3):
    """Q5_0 rows r0..r3 against activations a0..a3, scales s0..s3, offsets o0..o3 (-16 x lane sums)."""
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    for b in range(a0.shape[0]):
        prefetch_block(rows, r0, 22 * b, 22)
        prefetch_block(rows, r1, 22 * b, 22)
        prefetch_block(rows, r2, 22 * b, 22)
        prefetch_block(rows, r3, 22 * b, 22)
        acc0 = q5_0_block(acc0, rows, r0, b, a0, s0, o0)
        acc1 = q5_0_block(acc1, rows, r1, b, a1, s1, o1)
        acc2 = q5_0_block(acc2, rows, r2, b, a2, s2, o2)
        acc3 = q5_0_block(acc3, rows, r3, b, a3, s3, o3)
    return sum_floats(acc0), sum_floats(acc1), sum_floats(acc2), sum_floats(acc3)


@kernel(parallel=True)
def matvec_q5_0(rows, x, out):  # (n_out, n_blocks * 22) uint8, (n_blocks * 32,) float32 -> (n_out,)
    a, s, a_sums = activations_q8_0(x.reshape((1, x.shape[0])))
    o = scaled(a_sums, -16)
    n = rows.shape[0]
    for g in prange((n + 3) // 4):
        r = 4 * g
        y = q5_0_dots(rows, r, pick(r, 1, n), pick(r, 2, n), pick(r, 3, n), a[0], a[0], a[0], a[0],
                      s[0], s[0], s[0], s[0], o[0], o[0], o[0], o[0])  # fmt: skip
        for k in range(min(4, n - r)):
            out[r + k] = y[k]


@kernel(inline=True)
def q5_0_tile(rows, r0, r1, a0, a1, a2, a3, s0, s1, s2, s3, o0, o1, o2, o3):
    """Q5_0 rows r0, r1 by four tokens (activations a0..a3, scales s0..s3, offsets o0..o3): the 8 dots of
    q5_0_dots, row by row. Each weight block is decoded once for the four tokens (LLVM merges the loads)."""
    acc00, acc01, acc02, acc03 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    acc10, acc11, acc12, acc13 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    for b in range(a0.shape[0]):
        acc00 = q5_0_block(acc00, rows, r0, b, a0, s0, o0)
        acc01 = q5_0_block(acc01, rows, r0, b, a1, s1, o1)
        acc02 = q5_0_block(acc02, rows, r0, b, a2, s2, o2)
        acc03 = q5_0_block(acc03, rows, r0, b, a3, s3, o3)
        acc10 = q5_0_block(acc10, rows, r1, b, a0, s0, o0)
        acc11 = q5_0_block(acc11, rows, r1, b, a1, s1, o1)
        acc12 = q5_0_block(acc12, rows, r1, b, a2, s2, o2)
        acc13 = q5_0_block(acc13, rows, r1, b, a3, s3, o3)
    return (
        sum_floats(acc00), sum_floats(acc01), sum_floats(acc02), sum_floats(acc03),
        sum_floats(acc10), sum_floats(acc11), sum_floats(acc12), sum_floats(acc13),
    )  # fmt: skip


@kernel(parallel=True)
def matmul_q5_0(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, s, a_sums = batch_activations_q8_0(x)
    o = scaled(a_sums, -16)
    n_tok, n_out = x.shape[0], rows.shape[0]
    tile, n_jobs, n_chunks = batch_jobs(n_out, rows.shape[1], n_tok)
    for job in prange(n_jobs):
        r_begin, r_end, t_begin, t_end = job_span(job, tile, n_chunks, n_out, n_tok)
        for t in range(t_begin, t_end, 4):
            t1, t2, t3 = pick(t, 1, t_end), pick(t, 2, t_end), pick(t, 3, t_end)
            for r in range(r_begin, r_end, 2):
                y = q5_0_tile(rows, r, pick(r, 1, n_out), a[t], a[t1], a[t2], a[t3], s[t], s[t1], s[t2], s[t3],
                              o[t], o[t1], o[t2], o[t3])  # fmt: skip
                store_tile(out, y, r, t, min(2, r_end - r), min(4, t_end - t))


# Q4_1, 20 bytes, and Q5_1, 24 bytes: y = hsum(lanes) + summs, summs the m_w * s_x of each block added
# in a float of its own (each product is exact: two halves), as ggml_vec_dot_q4_1_q8_1 / _q5_1_q8_1.
@kernel(inline=True)
def q4_1_dots(rows, r0, r1, r2, r3, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    """Q4_1 rows r0..r3 against activations a0..a3, scales s0..s3 and block sums m0..m3 (Q8_1's s)."""
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    sum0 = sum1 = sum2 = sum3 = f32(0)
    for b in range(a0.shape[0]):
        prefetch_block(rows, r0, 20 * b, 20)
        prefetch_block(rows, r1, 20 * b, 20)
        prefetch_block(rows, r2, 20 * b, 20)
        prefetch_block(rows, r3, 20 * b, 20)
        sum0 += half_at(rows, r0, 20 * b + 2) * m0[b]
        sum1 += half_at(rows, r1, 20 * b + 2) * m1[b]
        sum2 += half_at(rows, r2, 20 * b + 2) * m2[b]
        sum3 += half_at(rows, r3, 20 * b + 2) * m3[b]
        acc0 = q4_1_block(acc0, rows, r0, b, a0, s0)
        acc1 = q4_1_block(acc1, rows, r1, b, a1, s1)
        acc2 = q4_1_block(acc2, rows, r2, b, a2, s2)
        acc3 = q4_1_block(acc3, rows, r3, b, a3, s3)
    return sum_floats(acc0) + sum0, sum_floats(acc1) + sum1, sum_floats(acc2) + sum2, sum_floats(acc3) + sum3


@kernel(parallel=True)
def matvec_q4_1(rows, x, out):  # (n_out, n_blocks * 20) uint8, (n_blocks * 32,) float32 -> (n_out,)
    a, s, m = activations_q8_1(x.reshape((1, x.shape[0])))
    n = rows.shape[0]
    for g in prange((n + 3) // 4):
        r = 4 * g
        y = q4_1_dots(rows, r, pick(r, 1, n), pick(r, 2, n), pick(r, 3, n), a[0], a[0], a[0], a[0],
                      s[0], s[0], s[0], s[0], m[0], m[0], m[0], m[0])  # fmt: skip
        for k in range(min(4, n - r)):
            out[r + k] = y[k]


@kernel(inline=True)
def q4_1_tile(rows, r0, r1, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    """Q4_1 rows r0, r1 by four tokens (activations a0..a3, scales s0..s3, block sums m0..m3 (Q8_1's s)): the 8 dots of
    q4_1_dots, row by row. Each weight block is decoded once for the four tokens (LLVM merges the loads)."""
    acc00, acc01, acc02, acc03 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    acc10, acc11, acc12, acc13 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    sum00 = sum01 = sum02 = sum03 = sum10 = sum11 = sum12 = sum13 = f32(0)
    for b in range(a0.shape[0]):
        sum00 += half_at(rows, r0, 20 * b + 2) * m0[b]
        sum01 += half_at(rows, r0, 20 * b + 2) * m1[b]
        sum02 += half_at(rows, r0, 20 * b + 2) * m2[b]
        sum03 += half_at(rows, r0, 20 * b + 2) * m3[b]
        sum10 += half_at(rows, r1, 20 * b + 2) * m0[b]
        sum11 += half_at(rows, r1, 20 * b + 2) * m1[b]
        sum12 += half_at(rows, r1, 20 * b + 2) * m2[b]
        sum13 += half_at(rows, r1, 20 * b + 2) * m3[b]
        acc00 = q4_1_block(acc00, rows, r0, b, a0, s0)
        acc01 = q4_1_block(acc01, rows, r0, b, a1, s1)
        acc02 = q4_1_block(acc02, rows, r0, b, a2, s2)
        acc03 = q4_1_block(acc03, rows, r0, b, a3, s3)
        acc10 = q4_1_block(acc10, rows, r1, b, a0, s0)
        acc11 = q4_1_block(acc11, rows, r1, b, a1, s1)
        acc12 = q4_1_block(acc12, rows, r1, b, a2, s2)
        acc13 = q4_1_block(acc13, rows, r1, b, a3, s3)
    return (
        sum_floats(acc00) + sum00, sum_floats(acc01) + sum01, sum_floats(acc02) + sum02, sum_floats(acc03) + sum03,
        sum_floats(acc10) + sum10, sum_floats(acc11) + sum11, sum_floats(acc12) + sum12, sum_floats(acc13) + sum13,
    )  # fmt: skip


@kernel(parallel=True)
def matmul_q4_1(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, s, m = batch_activations_q8_1(x)
    n_tok, n_out = x.shape[0], rows.shape[0]
    tile, n_jobs, n_chunks = batch_jobs(n_out, rows.shape[1], n_tok)
    for job in prange(n_jobs):
        r_begin, r_end, t_begin, t_end = job_span(job, tile, n_chunks, n_out, n_tok)
        for t in range(t_begin, t_end, 4):
            t1, t2, t3 = pick(t, 1, t_end), pick(t, 2, t_end), pick(t, 3, t_end)
            for r in range(r_begin, r_end, 2):
                y = q4_1_tile(rows, r, pick(r, 1, n_out), a[t], a[t1], a[t2], a[t3], s[t], s[t1], s[t2], s[t3],
                              m[t], m[t1], m[t2], m[t3])  # fmt: skip
                store_tile(out, y, r, t, min(2, r_end - r), min(4, t_end - t))


@kernel(inline=True)
def q5_1_dots(rows, r0, r1, r2, r3, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    """Q5_1 rows r0..r3 against activations a0..a3, scales s0..s3 and block sums m0..m3 (Q8_1's s)."""
    acc0, acc1, acc2, acc3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    sum0 = sum1 = sum2 = sum3 = f32(0)
    for b in range(a0.shape[0]):
        prefetch_block(rows, r0, 24 * b, 24)
        prefetch_block(rows, r1, 24 * b, 24)
        prefetch_block(rows, r2, 24 * b, 24)
        prefetch_block(rows, r3, 24 * b, 24)
        sum0 += half_at(rows, r0, 24 * b + 2) * m0[b]
        sum1 += half_at(rows, r1, 24 * b + 2) * m1[b]
        sum2 += half_at(rows, r2, 24 * b + 2) * m2[b]
        sum3 += half_at(rows, r3, 24 * b + 2) * m3[b]
        acc0 = q5_1_block(acc0, rows, r0, b, a0, s0)
        acc1 = q5_1_block(acc1, rows, r1, b, a1, s1)
        acc2 = q5_1_block(acc2, rows, r2, b, a2, s2)
        acc3 = q5_1_block(acc3, rows, r3, b, a3, s3)
    return sum_floats(acc0) + sum0, sum_floats(acc1) + sum1, sum_floats(acc2) + sum2, sum_floats(acc3) + sum3


@kernel(parallel=True)
def matvec_q5_1(rows, x, out):  # (n_out, n_blocks * 24) uint8, (n_blocks * 32,) float32 -> (n_out,)
    a, s, m = activations_q8_1(x.reshape((1, x.shape[0])))
    n = rows.shape[0]
    for g in prange((n + 3) // 4):
        r = 4 * g
        y = q5_1_dots(rows, r, pick(r, 1, n), pick(r, 2, n), pick(r, 3, n), a[0], a[0], a[0], a[0],
                      s[0], s[0], s[0], s[0], m[0], m[0], m[0], m[0])  # fmt: skip
        for k in range(min(4, n - r)):
            out[r + k] = y[k]


@kernel(inline=True)
def q5_1_tile(rows, r0, r1, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3):
    """Q5_1 rows r0, r1 by four tokens (activations a0..a3, scales s0..s3, block sums m0..m3 (Q8_1's s)): the 8 dots of
    q5_1_dots, row by row. Each weight block is decoded once for the four tokens (LLVM merges the loads)."""
    acc00, acc01, acc02, acc03 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    acc10, acc11, acc12, acc13 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
    sum00 = sum01 = sum02 = sum03 = sum10 = sum11 = sum12 = sum13 = f32(0)
    for b in range(a0.shape[0]):
        sum00 += half_at(rows, r0, 24 * b + 2) * m0[b]
        sum01 += half_at(rows, r0, 24 * b + 2) * m1[b]
        sum02 += half_at(rows, r0, 24 * b + 2) * m2[b]
        sum03 += half_at(rows, r0, 24 * b + 2) * m3[b]
        sum10 += half_at(rows, r1, 24 * b + 2) * m0[b]
        sum11 += half_at(rows, r1, 24 * b + 2) * m1[b]
        sum12 += half_at(rows, r1, 24 * b + 2) * m2[b]
        sum13 += half_at(rows, r1, 24 * b + 2) * m3[b]
        acc00 = q5_1_block(acc00, rows, r0, b, a0, s0)
        acc01 = q5_1_block(acc01, rows, r0, b, a1, s1)
        acc02 = q5_1_block(acc02, rows, r0, b, a2, s2)
        acc03 = q5_1_block(acc03, rows, r0, b, a3, s3)
        acc10 = q5_1_block(acc10, rows, r1, b, a0, s0)
        acc11 = q5_1_block(acc11, rows, r1, b, a1, s1)
        acc12 = q5_1_block(acc12, rows, r1, b, a2, s2)
        acc13 = q5_1_block(acc13, rows, r1, b, a3, s3)
    return (
        sum_floats(acc00) + sum00, sum_floats(acc01) + sum01, sum_floats(acc02) + sum02, sum_floats(acc03) + sum03,
        sum_floats(acc10) + sum10, sum_floats(acc11) + sum11, sum_floats(acc12) + sum12, sum_floats(acc13) + sum13,
    )  # fmt: skip


@kernel(parallel=True)
def matmul_q5_1(rows, x, out):  # (n_out, row bytes) uint8, (n_tok, n_in) float32 -> (n_tok, n_out)
    a, s, m = batch_activations_q8_1(x)
    n_tok, n_out = x.shape[0], rows.shape[0]
    tile, n_jobs, n_chunks = batch_jobs(n_out, rows.shape[1], n_tok)
    for job in prange(n_jobs):
        r_begin, r_end, t_begin, t_end = job_span(job, tile, n_chunks, n_out, n_tok)
        for t in range(t_begin, t_end, 4):
            t1, t2, t3 = pick(t, 1, t_end), pick(t, 2, t_end), pick(t, 3, t_end)
            for r in range(r_begin, r_end, 2):
                y = q5_1_tile(rows, r, pick(r, 1, n_out), a[t], a[t1], a[t2], a[t3], s[t], s[t1], s[t2], s[t3],
                              m[t], m[t1], m[t2], m[t3])  # fmt: skip
                store_tile(out, y, r, t, min(2, r_end - r), min(4, t_end - t))


# ---------------------------------------------------------------- slices of a 3-D tensor, one token
# matvec_slices_<type>(rows, n_out, slices, x, out): for each j, out[j] = W_j @ x[j] (or @ x[0] when x has one
# row), W_j the rows slices[j] * n_out .. (slices[j] + 1) * n_out of `rows`: the chosen experts of an ffn_*_exps
# tensor, or every head of deepseek2's attn_k_b / attn_v_b, in one call. Each output is its row's dot product
# as the matvec computes it, to the bit: only the calls are fewer.


@kernel
def slice_rows(slices, j, g, n_out):
    """The four rows of group g of slice j (the last ones clamped to the slice's end), and how many count."""
    base, r = slices[j] * n_out, 4 * g
    return base + r, base + pick(r, 1, n_out), base + pick(r, 2, n_out), base + pick(r, 3, n_out), min(4, n_out - r)


@kernel(parallel=True)
def matvec_slices_q8_0(rows, n_out, slices, x, out):
    a, s, _ = activations_q8_0(x)
    n_groups = (n_out + 3) // 4
    for job in prange(slices.shape[0] * n_groups):
        j, g = job // n_groups, job % n_groups
        i = j if x.shape[0] > 1 else 0
        r0, r1, r2, r3, n = slice_rows(slices, j, g, n_out)
        y = q8_0_dots(rows, r0, r1, r2, r3, a[i], a[i], a[i], a[i], s[i], s[i], s[i], s[i])
        for k in range(n):
            out[j, 4 * g + k] = y[k]


@kernel(parallel=True)
def matvec_slices_q4_0(rows, n_out, slices, x, out):
    a, s, a_sums = activations_q8_0(x)
    o = scaled(a_sums, -8)
    n_groups = (n_out + 3) // 4
    for job in prange(slices.shape[0] * n_groups):
        j, g = job // n_groups, job % n_groups
        i = j if x.shape[0] > 1 else 0
        r0, r1, r2, r3, n = slice_rows(slices, j, g, n_out)
        y = q4_0_dots(rows, r0, r1, r2, r3, a[i], a[i], a[i], a[i], s[i], s[i], s[i], s[i], o[i], o[i], o[i], o[i])
        for k in range(n):
            out[j, 4 * g + k] = y[k]


@kernel(parallel=True)
def matvec_slices_q5_0(rows, n_out, slices, x, out):
    a, s, a_sums = activations_q8_0(x)
    o = scaled(a_sums, -16)
    n_groups = (n_out + 3) // 4
    for job in prange(slices.shape[0] * n_groups):
        j, g = job // n_groups, job % n_groups
        i = j if x.shape[0] > 1 else 0
        r0, r1, r2, r3, n = slice_rows(slices, j, g, n_out)
        y = q5_0_dots(rows, r0, r1, r2, r3, a[i], a[i], a[i], a[i], s[i], s[i], s[i], s[i], o[i], o[i], o[i], o[i])
        for k in range(n):
            out[j, 4 * g + k] = y[k]


@kernel(parallel=True)
def matvec_slices_q4_1(rows, n_out, slices, x, out):
    a, s, m = activations_q8_1(x)
    n_groups = (n_out + 3) // 4
    for job in prange(slices.shape[0] * n_groups):
        j, g = job // n_groups, job % n_groups
        i = j if x.shape[0] > 1 else 0
        r0, r1, r2, r3, n = slice_rows(slices, j, g, n_out)
        y = q4_1_dots(rows, r0, r1, r2, r3, a[i], a[i], a[i], a[i], s[i], s[i], s[i], s[i], m[i], m[i], m[i], m[i])
        for k in range(n):
            out[j, 4 * g + k] = y[k]


@kernel(parallel=True)
def matvec_slices_q5_1(rows, n_out, slices, x, out):
    a, s, m = activations_q8_1(x)
    n_groups = (n_out + 3) // 4
    for job in prange(slices.shape[0] * n_groups):
        j, g = job // n_groups, job % n_groups
        i = j if x.shape[0] > 1 else 0
        r0, r1, r2, r3, n = slice_rows(slices, j, g, n_out)
        y = q5_1_dots(rows, r0, r1, r2, r3, a[i], a[i], a[i], a[i], s[i], s[i], s[i], s[i], m[i], m[i], m[i], m[i])
        for k in range(n):
            out[j, 4 * g + k] = y[k]


# ---------------------------------------------------------------- k-quants, 256-value super-blocks, by Q8_K
# Activation super-block b: d = a_scales[b], qs at a[b, 4:260] (value v at 4 + v), bsums a_sums[b, k]
# (sum of the quants of values 16k .. 16k + 15). In ggml_vec_dot_q*_K_q8_K a super-block adds
#   d_x * d_w * isum  +  (-d_x * dmin_w) * msum,
# isum = sum_k sc_k * (sum over sub-block k of q y), msum = sum_k m_k * (sum of y over sub-block k).
# The sub-block scales and mins are decoded eight at a time into vector lanes (simd.k4_scales, ...),
# and a sub-block's 8 lane sums are multiplied by its scale before the lanes are added up, once
# per super-block.


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
def matvec_bf16_by_bf16(rows, x, out):  # (n_out, 2 n_in) uint8, (n_in,) float32 -> (n_out,)
    w = rows.reshape(-1).view(np.uint16).reshape((rows.shape[0], x.shape[0]))
    rounded = round_to_bf16(x)
    for r in prange(w.shape[0]):
        acc = f32(0)
        for i in range(w.shape[1]):
            acc += u32_as_f32(np.uint32(w[r, i]) << np.uint32(16)) * rounded[i]
        out[r] = acc


# A batch of BF16 weights: each row read once for all the tokens, as in the quantized kernels.
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
    T.F32: matvec_f32_ggml,
    T.F16: matvec_f16_ggml,
    T.BF16: matvec_bf16_by_bf16,
    T.Q8_0: matvec_q8_0,
    T.Q4_0: matvec_q4_0,
    T.Q4_1: matvec_q4_1,
    T.Q5_0: matvec_q5_0,
    T.Q5_1: matvec_q5_1,
    T.Q2_K: matvec_q2_k,
    T.Q3_K: matvec_q3_k,
}
GGML_MATMUL_KERNELS = {
    T.F32: matmul_f32_ggml,
    T.F16: matmul_f16_ggml,
    T.BF16: matmul_bf16,
    T.Q8_0: matmul_q8_0,
    T.Q4_0: matmul_q4_0,
    T.Q4_1: matmul_q4_1,
    T.Q5_0: matmul_q5_0,
    T.Q5_1: matmul_q5_1,
    T.Q2_K: matmul_q2_k,
    T.Q3_K: matmul_q3_k,
}

GGML_MATVEC_SLICES_KERNELS = {
    T.F32: matvec_slices_f32_ggml,
    T.Q8_0: matvec_slices_q8_0,
    T.Q4_0: matvec_slices_q4_0,
    T.Q4_1: matvec_slices_q4_1,
    T.Q5_0: matvec_slices_q5_0,
    T.Q5_1: matvec_slices_q5_1,
}

# MUL_MAT_ID (an expert's tokens) where it differs from MUL_MAT: no llamafile sgemm for F32.
GGML_MATMUL_ID_KERNELS = {T.F32: matmul_id_f32_ggml}

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
