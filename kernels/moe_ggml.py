"""A batch through a MoE layer's routed experts in two kernel calls, as ggml's mul_mat_id computes it (numerics "ggml";
ggml-cpu.c ggml_compute_forward_mul_mat_id, repack.cpp forward_mul_mat_id): every chosen expert's gate, up and swiglu
in one, every down in the other; and the router's logits and the weighted sum of the experts' outputs around them.

mul_mat_id quantizes every token's activations once, groups the (token, slot) pairs routed to each expert
(its matrix_rows: an expert's tokens in token order) and runs one small matmul per expert over its group, which
reads the expert's rows once for all its tokens. The same here, every expert's group in one parallel loop:

    entries   the n_tok * n_expert_used (token, slot) pairs, sorted by expert (tokens in order within one)
    groups    experts (n_groups,): the experts chosen at least once; starts (n_groups + 1,): their runs of entries
    src       (n_entries,): the row of x each entry reads (its token for gate and up, itself for down)
    out       (n_entries, n_out): entry i's output in row i

The loop runs jobs (expert_jobs): a tile of one expert's rows by a run of its entries, sized to about the same work
whatever the expert's number of tokens, so that numba's static split of the jobs over the threads stays even. A
job takes its entries four at a time over the tile (a super-block decoded once for the four) and gives each
(entry, row) the number the one-expert kernel of kquants_ggml.py gives it (matmul_id_q4_k, matmul_q5_k,
matmul_q6_k over that expert's tokens), to the bit: the path is ggml's for the expert's token count (repacked
Q4_K: the gemv for every token; otherwise tiled from TILED_MIN_BATCH tokens, vec_dot below). A job's loops are
inlined into the parallel loop (kernel(inline=True)): compiled as functions of their own, called once a job,
they ran at half the speed (Q6_K tiled, one thread: 32 against 67 GMAC/s).

The experts' outputs are then weighted and added per token as build_moe_ffn does (weighted_sum).
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from ._jit import kernel, prange
from .gemv_ggml import pick
from .kquants_ggml import (
    TILED_MIN_BATCH,
    q4_k_repacked,
    q4_k_repacked_tokens,
    q4_k_tiled_tokens,
    q4_k_vec_dot_tokens,
    q5_k_tiled_tokens,
    q5_k_vec_dot_tokens,
    q6_k_tiled_tokens,
    q6_k_vec_dot_tokens,
)
from .ops_ggml import swiglu_row
from .simd import add_floats, float_lane, fma_floats, load_floats, zero_floats

f32 = np.float32

# A job is about this many (row, token) dot products: 32 rows by 64 tokens, or a whole 512-row expert for one
# to four tokens (a group of four tokens costs about what one does: the super-block's decoding is shared).
# 1024, 2048 and 4096 ran alike (one thread, 16 experts of 1024 x 512 with 3 to 64 tokens each).
JOB_WORK = 2048
JOB_ROWS = 16  # a job's rows are a multiple of this: whole 16-value blocks of ggml_vec_swiglu_f32
TOKEN_CHUNK = 64  # at most this many entries a job, whose quantized activations stay in L2 while the tile passes
# ggml's paths of an expert's matmul
REPACKED, TILED, VEC_DOT = 0, 1, 2


@kernel
def job_rows(n_entries, n_out):
    """The rows of a job over n_entries entries: JOB_WORK / max(n_entries, 4), a multiple of JOB_ROWS, at most n_out."""
    rows = JOB_WORK // max(n_entries, 4) // JOB_ROWS * JOB_ROWS
    return min(max(rows, JOB_ROWS), n_out)


@kernel
def expert_jobs(starts, n_out):  # (n_groups + 1,) int64 -> (n_jobs, 5) int64
    """Jobs of every group, in order: (group, first row, end row, first entry, end entry)."""
    n_jobs = 0
    for g in range(starts.shape[0] - 1):
        for t in range(starts[g], starts[g + 1], TOKEN_CHUNK):
            tile = job_rows(min(TOKEN_CHUNK, starts[g + 1] - t), n_out)
            n_jobs += (n_out + tile - 1) // tile
    jobs = np.empty((n_jobs, 5), dtype=np.int64)
    j = 0
    for g in range(starts.shape[0] - 1):
        for t in range(starts[g], starts[g + 1], TOKEN_CHUNK):
            t_end = min(t + TOKEN_CHUNK, starts[g + 1])
            tile = job_rows(t_end - t, n_out)
            for r in range(0, n_out, tile):
                jobs[j, 0], jobs[j, 1], jobs[j, 2], jobs[j, 3], jobs[j, 4] = g, r, min(r + tile, n_out), t, t_end
                j += 1
    return jobs


@kernel
def store_tokens(out, y, t, r, n):
    """out[t + k, r] = y[k] for the n real entries of a group of four (the clamped ones are dropped)."""
    for k in range(n):
        out[t + k, r] = y[k]


# ---------------------------------------------------------------- one job of each type
# rows: the whole 3-D tensor's rows (n_expert * n_out, row bytes), the expert's first .. first + n_out - 1;
# job: a row of expert_jobs, the expert's rows r_begin .. r_end - 1 by entries t_begin .. t_end - 1. a, s, m: the
# quantized activations (blocks, scales, sums) of x's rows, which entry t reads at src[t].


@kernel(inline=True)
def q4_k_job(rows, first, job, path, src, a, s, m, out):
    r_begin, r_end, t_begin, t_end = job[1], job[2], job[3], job[4]
    for t in range(t_begin, t_end, 4):
        u0, u1, u2, u3 = src[t], src[pick(t, 1, t_end)], src[pick(t, 2, t_end)], src[pick(t, 3, t_end)]
        a0, a1, a2, a3, s0, s1, s2, s3 = a[u0], a[u1], a[u2], a[u3], s[u0], s[u1], s[u2], s[u3]
        m0, m1, m2, m3, n = m[u0], m[u1], m[u2], m[u3], min(4, t_end - t)
        if path == REPACKED and n == 1:  # a lone token: its gemv alone, not four copies of it
            for r in range(r_begin, r_end):
                out[t, r] = q4_k_repacked(rows, first + r, a0, s0, m0)
        elif path == REPACKED:
            for r in range(r_begin, r_end):
                y = q4_k_repacked_tokens(rows, first + r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3)
                store_tokens(out, y, t, r, n)
        elif path == TILED:
            for r in range(r_begin, r_end):
                y = q4_k_tiled_tokens(rows, first + r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3)
                store_tokens(out, y, t, r, n)
        else:
            for r in range(r_begin, r_end):
                y = q4_k_vec_dot_tokens(rows, first + r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3)
                store_tokens(out, y, t, r, n)


@kernel(inline=True)
def q5_k_job(rows, first, job, path, src, a, s, m, out):
    r_begin, r_end, t_begin, t_end = job[1], job[2], job[3], job[4]
    for t in range(t_begin, t_end, 4):
        u0, u1, u2, u3 = src[t], src[pick(t, 1, t_end)], src[pick(t, 2, t_end)], src[pick(t, 3, t_end)]
        a0, a1, a2, a3, s0, s1, s2, s3 = a[u0], a[u1], a[u2], a[u3], s[u0], s[u1], s[u2], s[u3]
        m0, m1, m2, m3, n = m[u0], m[u1], m[u2], m[u3], min(4, t_end - t)
        if path == TILED:
            for r in range(r_begin, r_end):
                y = q5_k_tiled_tokens(rows, first + r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3)
                store_tokens(out, y, t, r, n)
        else:
            for r in range(r_begin, r_end):
                y = q5_k_vec_dot_tokens(rows, first + r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3)
                store_tokens(out, y, t, r, n)


@kernel(inline=True)
def q6_k_job(rows, first, job, path, src, a, s, m, out):
    r_begin, r_end, t_begin, t_end = job[1], job[2], job[3], job[4]
    for t in range(t_begin, t_end, 4):
        u0, u1, u2, u3 = src[t], src[pick(t, 1, t_end)], src[pick(t, 2, t_end)], src[pick(t, 3, t_end)]
        a0, a1, a2, a3, s0, s1, s2, s3 = a[u0], a[u1], a[u2], a[u3], s[u0], s[u1], s[u2], s[u3]
        m0, m1, m2, m3, n = m[u0], m[u1], m[u2], m[u3], min(4, t_end - t)
        if path == TILED:
            for r in range(r_begin, r_end):
                y = q6_k_tiled_tokens(rows, first + r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3)
                store_tokens(out, y, t, r, n)
        else:
            for r in range(r_begin, r_end):
                y = q6_k_vec_dot_tokens(rows, first + r, a0, a1, a2, a3, s0, s1, s2, s3, m0, m1, m2, m3)
                store_tokens(out, y, t, r, n)


# ---------------------------------------------------------------- swiglu


@kernel(inline=True)
def swiglu_tile(out, up, job):
    """out = silu(out) * up over a job's entries and rows (out holding the gate's outputs), as ggml_vec_swiglu_f32
    (ops_ggml.swiglu_row). A job's first row is a multiple of JOB_ROWS (16), so the 16-value blocks of its part of a
    row are the row's own, and its part's leftover values past them the row's."""
    r_begin, r_end, t_begin, t_end = job[1], job[2], job[3], job[4]
    for t in range(t_begin, t_end):
        swiglu_row(out[t, r_begin:r_end], up[t, r_begin:r_end], out[t, r_begin:r_end])


# ---------------------------------------------------------------- every chosen expert of a tensor
# experts_<type>(rows, up_rows, n_out, glu, jobs, experts, starts, src, a, s, m, out, up_out): every job of rows
# into out, in one parallel loop; glu: also up_rows into up_out, on the same activations, then out = silu(out) *
# up_out (an expert's ffn_gate and ffn_up, then ggml_swiglu_split), the tile still in cache.


@kernel
def path_of(starts, g, repacked):
    """ggml's path for group g's matmul: the repacked gemv, or tiled from TILED_MIN_BATCH tokens, else vec_dot."""
    if repacked:
        return REPACKED
    return TILED if starts[g + 1] - starts[g] >= TILED_MIN_BATCH else VEC_DOT


@kernel(parallel=True)
def experts_q4_k(rows, up_rows, n_out, glu, jobs, experts, starts, src, a, s, m, out, up_out):
    repacked = n_out % 8 == 0  # ggml_repack_get_optimal_repack_type: q4_K_8x8 (the rows of one expert)
    for j in prange(jobs.shape[0]):
        g = jobs[j, 0]
        path = path_of(starts, g, repacked)
        q4_k_job(rows, experts[g] * n_out, jobs[j], path, src, a, s, m, out)
        if glu:
            q4_k_job(up_rows, experts[g] * n_out, jobs[j], path, src, a, s, m, up_out)
            swiglu_tile(out, up_out, jobs[j])


@kernel(parallel=True)
def experts_q5_k(rows, up_rows, n_out, glu, jobs, experts, starts, src, a, s, m, out, up_out):
    for j in prange(jobs.shape[0]):
        g = jobs[j, 0]
        path = path_of(starts, g, False)
        q5_k_job(rows, experts[g] * n_out, jobs[j], path, src, a, s, m, out)
        if glu:
            q5_k_job(up_rows, experts[g] * n_out, jobs[j], path, src, a, s, m, up_out)
            swiglu_tile(out, up_out, jobs[j])


@kernel(parallel=True)
def experts_q6_k(rows, up_rows, n_out, glu, jobs, experts, starts, src, a, s, m, out, up_out):
    for j in prange(jobs.shape[0]):
        g = jobs[j, 0]
        path = path_of(starts, g, False)
        q6_k_job(rows, experts[g] * n_out, jobs[j], path, src, a, s, m, out)
        if glu:
            q6_k_job(up_rows, experts[g] * n_out, jobs[j], path, src, a, s, m, up_out)
            swiglu_tile(out, up_out, jobs[j])


# ggml type -> its kernel, and whether its activation sums are taken in pairs (32-value sub-blocks: Q4_K, Q5_K)
# or as quantize_row_q8_K writes them (16 values: Q6_K)
EXPERT_KERNELS = {T.Q4_K: (experts_q4_k, True), T.Q5_K: (experts_q5_k, True), T.Q6_K: (experts_q6_k, False)}


# ---------------------------------------------------------------- the router


@kernel(inline=True)
def tinyblas_sum(lo, hi):
    """_mm512_reduce_add_ps of a 16-lane accumulator held as lanes 0-7 (lo) and 8-15 (hi): ops_ggml.reduce_add_16."""
    v = add_floats(lo, hi)  # lane i: v_i + v_(i+8)
    return ((float_lane(v, 0) + float_lane(v, 4)) + (float_lane(v, 2) + float_lane(v, 6))) + (
        (float_lane(v, 1) + float_lane(v, 5)) + (float_lane(v, 3) + float_lane(v, 7))
    )


@kernel(inline=True)
def tinyblas_step(lo, hi, w_lo, w_hi, x, t, i):
    """The accumulator after values i .. i + 15 of token t: fma(w, x, acc) lane by lane."""
    return fma_floats(w_lo, load_floats(x, t, i), lo), fma_floats(w_hi, load_floats(x, t, i + 8), hi)


@kernel(parallel=True)
def router_logits(w, x, out):  # (n_expert, n_in) f32, (n_tok, n_in) f32 -> out (n_tok, n_expert)
    """A batch's router logits, an F32 ffn_gate_inp by x, as llamafile's tinyBLAS sums them for mul_mat (n_tok >= 2,
    n_in % 16 == 0, n_expert % 4 == 0; float_ggml.dot_tinyblas): per output one 16-lane accumulator, acc =
    fma(w, x, acc) 16 values at a time, then _mm512_reduce_add_ps. Four tokens share each row's loads, so eight
    chains of fused multiply-adds are in flight instead of one (each waits 4 cycles for the last)."""
    n_tok, n_in = x.shape
    for r in prange(w.shape[0]):
        for t in range(0, n_tok, 4):
            t1, t2, t3 = pick(t, 1, n_tok), pick(t, 2, n_tok), pick(t, 3, n_tok)
            lo0, hi0, lo1, hi1 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
            lo2, hi2, lo3, hi3 = zero_floats(), zero_floats(), zero_floats(), zero_floats()
            for i in range(0, n_in, 16):
                w_lo, w_hi = load_floats(w, r, i), load_floats(w, r, i + 8)
                lo0, hi0 = tinyblas_step(lo0, hi0, w_lo, w_hi, x, t, i)
                lo1, hi1 = tinyblas_step(lo1, hi1, w_lo, w_hi, x, t1, i)
                lo2, hi2 = tinyblas_step(lo2, hi2, w_lo, w_hi, x, t2, i)
                lo3, hi3 = tinyblas_step(lo3, hi3, w_lo, w_hi, x, t3, i)
            store_tokens(out, (tinyblas_sum(lo0, hi0), tinyblas_sum(lo1, hi1), tinyblas_sum(lo2, hi2),
                               tinyblas_sum(lo3, hi3)), t, r, min(4, n_tok - t))  # fmt: skip


# ---------------------------------------------------------------- the weighted sum


@kernel(parallel=True)
def weighted_sum(y, position, weights, out):  # (n_entries, n) f32, (n_tok, k) int64, (n_tok, k) f32 -> (n_tok, n)
    """out[t] = sum over the slots k of y[position[t, k]] * weights[t, k], as build_moe_ffn: each product rounded
    (ggml_mul), then the slots added in the order chosen (its chain of ggml_add)."""
    for t in prange(out.shape[0]):
        first, w = position[t, 0], weights[t, 0]
        for i in range(out.shape[1]):
            out[t, i] = y[first, i] * w
        for k in range(1, position.shape[1]):
            entry, w = position[t, k], weights[t, k]
            for i in range(out.shape[1]):
                out[t, i] += y[entry, i] * w
