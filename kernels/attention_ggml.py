"""Attention as llama.cpp computes it on the CPU without flash attention (numerics="ggml"), over an F16
KV cache: llm_graph_context::build_attn_mha's

    kq  = mul_mat(k, q)              q rounded to f16; products summed as float_ggml's orders say
    kq  = soft_max_ext(kq, mask, kq_scale)       ops_ggml.softmax_row: ggml_v_expf, sums in double
    kqv = mul_mat(v^T, kq)           the probabilities rounded to f16, summed over the cache's cells

    kernel(q, k, v, first, window, scale, out)

    q    (n_tok, n_head, dk) float32         the queries at positions first, first + 1, ...
    k    (n_kv_head, n_slots, dk) uint16     one layer's keys (the bits of f16), position p in slot p % n_slots
    v    (n_kv_head, n_slots, dv) uint16     its values
    out  (n_tok, n_head, dv) float32

Query head h reads KV head h // (n_head / n_kv_head), as ggml's broadcast of mul_mat. ggml scores every
cell of the cache and masks the future and the positions behind a sliding window with -inf; a masked
cell's probability is exactly 0, so it adds nothing to any sum, and only the visible cells are visited
here. The sums keep ggml's lanes: cell p is lane p % 16 of a chain that starts at cell 0, which is the
position as long as llama.cpp's cache has not wrapped (as ours, one cell per position).
A batch (n_tok >= 2) is llamafile's tinyBLAS when the sum's length is a multiple of 16, else
ggml_vec_dot_f16; one token is ggml_vec_dot_f16 (float_ggml.py).
"""

import numpy as np

from ._jit import kernel, prange
from .activations import cpu_fp32_to_fp16
from .float_ggml import round_to_f16, vec_dot_lanes
from .gemv import half_to_f32
from .ops_ggml import fma32, rms_norm_row, rope_token, softmax_row
from .simd import add_floats, fma_floats, load_floats, load_halves, splat_float, store_floats, sum_floats, zero_floats

f32 = np.float32


@kernel
def first_visible(position, window):
    return max(0, position - window + 1) if window else 0


@kernel
def f16_rounded(x, out):  # (n,) f32 -> out (n,): each value rounded to the nearest half, as float32
    """GGML_CPU_FP32_TO_FP16 and back, as float_ggml.round_to_f16 but by the CPU's conversions both ways
    (vcvtps2ph, vcvtph2ps: exact back), which vectorise, into a buffer the caller keeps."""
    for i in range(x.shape[0]):
        out[i] = half_to_f32(cpu_fp32_to_fp16(x[i]))


@kernel
def visible_to_f16(probs, begin, end):
    """probs[begin:end] rounded to f16 (mul_mat's conversion of src1) into an array of end cells, the others
    unwritten: a sliding window's cells start long after cell 0, which nothing reads."""
    p16 = np.empty(end, dtype=np.float32)
    f16_rounded(probs[begin:end], p16[begin:end])
    return p16


@kernel
def reduce_rows_16(acc):
    """Rows 0-15 of acc added column by column in _mm512_reduce_add_ps's tree (ops_ggml.reduce_add_16), into
    row 0: whole rows added, k and k + 8, then k and k + 4, then (0 + 2) + (1 + 3), which vectorises along
    the row (a column at a time did not). Overwrites rows 0-7."""
    dv = acc.shape[1]
    for k in range(8):
        for d in range(dv):
            acc[k, d] = acc[k, d] + acc[k + 8, d]
    for k in range(4):
        for d in range(dv):
            acc[k, d] = acc[k, d] + acc[k + 4, d]
    for d in range(dv):
        acc[0, d] = (acc[0, d] + acc[2, d]) + (acc[1, d] + acc[3, d])


@kernel
def weighted_values(v16, g, p16, begin, end, n_slots, n_cells, tinyblas, acc, out):
    """out[d] = sum over cells begin..end-1 of v16[g, slot, d] * p16[cell], for every d at once: per d the
    lanes of one output of tinyBLAS (16, cell % 16) or of ggml_vec_dot_f16 (64, cell % 64, then reduced as
    GGML_F32x16_REDUCE), each lane adding its cells in order from cell 0. acc: (64, dv) float32 scratch."""
    dv = out.shape[0]
    n_lanes = 16 if tinyblas else 64
    acc[:n_lanes] = 0
    steps = n_cells - n_cells % 64
    stop = end if tinyblas else min(end, steps)
    values = v16[g]  # (n_slots, dv) f16 bits, rows contiguous
    dv8 = dv - dv % 8
    for p in range(begin, stop):  # 8 value dimensions an instruction (fma_floats), the rest one by one
        lane = p % n_lanes
        weight = p16[p]
        slot = p % n_slots
        lanes = splat_float(weight)
        for d in range(0, dv8, 8):
            store_floats(acc, lane, d, fma_floats(load_halves(values, slot, d), lanes, load_floats(acc, lane, d)))
        for d in range(dv8, dv):
            acc[lane, d] = fma32(half_to_f32(values[slot, d]), weight, acc[lane, d])
    if tinyblas:
        reduce_rows_16(acc)
        out[:] = acc[0]
        return
    for k in range(32):
        for d in range(dv):
            acc[k, d] = acc[k, d] + acc[k + 32, d]
    for k in range(16):
        for d in range(dv):
            acc[k, d] = acc[k, d] + acc[k + 16, d]
    reduce_rows_16(acc)
    if max(steps, begin) >= end:  # no cell past ggml's last 64-value step: nothing left for the double sum
        for d in range(dv):
            out[d] = acc[0, d]
        return
    for d in range(dv):
        wide = np.float64(acc[0, d])
        for p in range(max(steps, begin), end):
            wide += np.float64(half_to_f32(v16[g, p % n_slots, d]) * p16[p])
        out[d] = f32(wide)


@kernel
def key_dot(key, q16, lanes):
    """key . q16 (dk,) float32 as ggml_vec_dot_f16 sums it (lanes (64,) scratch, the leftovers in double)."""
    dk = key.shape[0]
    total, steps = vec_dot_lanes(key, q16, dk, lanes)
    wide = np.float64(total)
    for i in range(steps, dk):
        wide += np.float64(key[i] * q16[i])
    return f32(wide)


@kernel(inline=True)
def head_dot_steps(keys, slot, q16, j):
    """The 64-value steps of ggml_vec_dot_f16 of keys[slot] (f16 bits) and q16[j], in registers: its four
    16-lane accumulators (here eight of 8 lanes, a0l a0h = sum[0], ...), GGML_F32x16_REDUCE's (sum[0] +
    sum[2]) + (sum[1] + sum[3]), then _mm512_reduce_add_ps (sum_floats of the halves added), as a double.
    The operations of key_dot in its order, so the same bits, without key_dot's 64-float scratch."""
    steps = q16.shape[1] - q16.shape[1] % 64
    a0l = a0h = a1l = a1h = a2l = a2h = a3l = a3h = zero_floats()
    for i in range(0, steps, 64):
        a0l = fma_floats(load_halves(keys, slot, i), load_floats(q16, j, i), a0l)
        a0h = fma_floats(load_halves(keys, slot, i + 8), load_floats(q16, j, i + 8), a0h)
        a1l = fma_floats(load_halves(keys, slot, i + 16), load_floats(q16, j, i + 16), a1l)
        a1h = fma_floats(load_halves(keys, slot, i + 24), load_floats(q16, j, i + 24), a1h)
        a2l = fma_floats(load_halves(keys, slot, i + 32), load_floats(q16, j, i + 32), a2l)
        a2h = fma_floats(load_halves(keys, slot, i + 40), load_floats(q16, j, i + 40), a2h)
        a3l = fma_floats(load_halves(keys, slot, i + 48), load_floats(q16, j, i + 48), a3l)
        a3h = fma_floats(load_halves(keys, slot, i + 56), load_floats(q16, j, i + 56), a3h)
    low = add_floats(add_floats(a0l, a2l), add_floats(a1l, a3l))
    high = add_floats(add_floats(a0h, a2h), add_floats(a1h, a3h))
    return np.float64(sum_floats(add_floats(low, high)))


@kernel(inline=True)
def key_dots_f16(keys, slot, q16, j0, j1, j2, j3):
    """keys[slot] (f16 bits) . q16[j] for four query rows j0..j3 as key_dot sums each: head_dot_steps, then
    the dk % 64 leftovers added in double one by one (ggml_vec_dot_f16's tail). The four sums run side by
    side: one tail is a chain of dependent double adds (4 cycles each), which four chains fill."""
    dk = q16.shape[1]
    w0 = head_dot_steps(keys, slot, q16, j0)
    w1 = head_dot_steps(keys, slot, q16, j1)
    w2 = head_dot_steps(keys, slot, q16, j2)
    w3 = head_dot_steps(keys, slot, q16, j3)
    for i in range(dk - dk % 64, dk):
        key = half_to_f32(keys[slot, i])
        w0 += np.float64(key * q16[j0, i])
        w1 += np.float64(key * q16[j1, i])
        w2 += np.float64(key * q16[j2, i])
        w3 += np.float64(key * q16[j3, i])
    return f32(w0), f32(w1), f32(w2), f32(w3)


@kernel(inline=True)
def key_dot_lanes(keys, slot, q16, j, i, low, high):
    """One 16-value step of tinyBLAS's sum of keys[slot] (f16 bits) . q16[j]: its 16-lane accumulator as two
    vectors of 8 (lanes 0-7, 8-15), acc = fma(k, q, acc)."""
    low = fma_floats(load_halves(keys, slot, i), load_floats(q16, j, i), low)
    return low, fma_floats(load_halves(keys, slot, i + 8), load_floats(q16, j, i + 8), high)


@kernel
def key_dots_tinyblas(keys, s0, s1, s2, s3, q16, j):
    """keys[s0..s3] . q16[j] (dk % 16 == 0) as tinyBLAS sums each output, four keys side by side (one chain
    of fused multiply-adds waits 4 cycles a step); each sum ends in _mm512_reduce_add_ps, which is
    sum_floats of the two halves added (ops_ggml.reduce_add_16's tree)."""
    l0 = h0 = l1 = h1 = l2 = h2 = l3 = h3 = zero_floats()
    for i in range(0, q16.shape[1], 16):
        l0, h0 = key_dot_lanes(keys, s0, q16, j, i, l0, h0)
        l1, h1 = key_dot_lanes(keys, s1, q16, j, i, l1, h1)
        l2, h2 = key_dot_lanes(keys, s2, q16, j, i, l2, h2)
        l3, h3 = key_dot_lanes(keys, s3, q16, j, i, l3, h3)
    return (
        sum_floats(add_floats(l0, h0)), sum_floats(add_floats(l1, h1)),
        sum_floats(add_floats(l2, h2)), sum_floats(add_floats(l3, h3)),
    )  # fmt: skip


@kernel
def weighted_values_tinyblas(values, p16, begin, end, n_slots, acc, out):
    """weighted_values for a batch (tinyBLAS: lane cell % 16 of each output) with dv % 8 == 0, 8 value dimensions
    a step: values (n_slots, dv) f16 bits of one KV head, acc (16, dv) float32 scratch."""
    dv = out.shape[0]
    acc[:] = 0
    for p in range(begin, end):
        lane, slot, weight = p % 16, p % n_slots, splat_float(p16[p])
        for d in range(0, dv, 8):
            store_floats(acc, lane, d, fma_floats(load_halves(values, slot, d), weight, load_floats(acc, lane, d)))
    reduce_rows_16(acc)
    out[:] = acc[0]


@kernel
def zigzag(i, n):
    """The i-th of 0, n - 1, 1, n - 2, ...: a thread's contiguous share of the jobs (numba hands each thread
    a contiguous range) then holds early and late tokens alike, whose causal attention is short and long."""
    return i // 2 if i % 2 == 0 else n - 1 - i // 2


@kernel(parallel=True)
def attend(q, k, v, first, window, scale, n_cells, out):
    """Every query row of q against the cache (module docstring); n_cells: the cells ggml scores (its
    n_kv, a multiple of 256), which bounds ggml_vec_dot_f16's 64-element steps. A job is one token and
    one KV head, whose keys and values are read once for all the query heads that share them."""
    n_tok, n_head, dk = q.shape
    n_kv_head, n_slots, dv = v.shape
    group = n_head // n_kv_head
    batch = n_tok >= 2
    tinyblas_keys = batch and dk % 16 == 0
    last = first + n_tok  # cells 0 .. last - 1 may be visible
    for job in prange(n_tok * n_kv_head):
        t, g = zigzag(job // n_kv_head, n_tok), job % n_kv_head
        position = first + t
        begin = first_visible(position, window)
        end = position + 1
        q16 = np.empty((group, dk), dtype=np.float32)  # (group, dk) the queries of KV head g, rounded to f16
        for j in range(group):
            q16[j] = round_to_f16(q[t, g * group + j])
        key, lanes = np.empty(dk, dtype=np.float32), np.empty(64, dtype=np.float32)
        scores = np.empty((group, last), dtype=np.float32)
        if tinyblas_keys:
            for p in range(begin, end, 4):  # four keys at a time; the last group's extra ones repeat the last key
                s0, s1 = p % n_slots, min(p + 1, end - 1) % n_slots
                s2, s3 = min(p + 2, end - 1) % n_slots, min(p + 3, end - 1) % n_slots
                for j in range(group):
                    kq = key_dots_tinyblas(k[g], s0, s1, s2, s3, q16, j)
                    for c in range(min(4, end - p)):
                        scores[j, p + c] = kq[c] * scale
        else:
            for p in range(begin, end):
                for i in range(dk):
                    key[i] = half_to_f32(k[g, p % n_slots, i])
                for j in range(group):
                    scores[j, p] = key_dot(key, q16[j], lanes) * scale
        probs = np.empty(last, dtype=np.float32)  # only cells begin .. end - 1 are written and read
        acc = np.empty((64, dv), dtype=np.float32)
        for j in range(group):
            softmax_row(scores[j], begin, end, n_cells, probs)
            p16 = visible_to_f16(probs, begin, end)
            if batch and dv % 8 == 0:
                weighted_values_tinyblas(v[g], p16, begin, end, n_slots, acc[:16], out[t, g * group + j])
            else:
                weighted_values(v, g, p16, begin, end, n_slots, n_cells, batch, acc, out[t, g * group + j])


@kernel
def attend_heads(q, k, v, g, j0, j1, begin, end, scale, n_cells, out):
    """Query heads j0 .. j1 - 1 of KV head g's group, one token, on this thread, into out (n_head, dv): each
    head ggml_vec_dot_f16 over head_dim (key_dot_f16), then over the n_cells cells. A key row is read once
    for all the heads (in cache while they pass)."""
    n_head, dk = q.shape
    n_kv_head, n_slots, dv = v.shape
    h0 = g * (n_head // n_kv_head) + j0
    n_q = j1 - j0
    q16 = np.empty((n_q, dk), dtype=np.float32)  # (n_q, dk) the queries rounded to f16
    for j in range(n_q):
        f16_rounded(q[h0 + j], q16[j])
    keys = k[g]  # (n_slots, dk) f16 bits
    scores = np.empty((n_q, end), dtype=np.float32)  # only cells begin .. end - 1 are written and read
    for p in range(begin, end):
        for j in range(0, n_q, 4):  # four heads at a time; a last group's extra ones repeat its last head
            j1, j2, j3 = min(j + 1, n_q - 1), min(j + 2, n_q - 1), min(j + 3, n_q - 1)
            kq = key_dots_f16(keys, p % n_slots, q16, j, j1, j2, j3)
            for c in range(min(4, n_q - j)):
                scores[j + c, p] = kq[c] * scale
    probs = np.zeros(end, dtype=np.float32)
    values = np.empty((64, dv), dtype=np.float32)
    for j in range(n_q):
        softmax_row(scores[j], begin, end, n_cells, probs)
        p16 = visible_to_f16(probs, begin, end)
        weighted_values(v, g, p16, begin, end, n_slots, n_cells, False, values, out[h0 + j])


@kernel
def attend_token(q, k, v, position, window, scale, n_cells, out):
    """One query token, on this thread: q (n_head, dk) f32, k, v (n_kv_head, n_slots, d) f16 bits, out (n_head, dv).
    As `attend` for one token."""
    n_head = q.shape[0]
    n_kv_head = k.shape[0]
    begin, end = first_visible(position, window), position + 1
    for g in range(n_kv_head):
        attend_heads(q, k, v, g, 0, n_head // n_kv_head, begin, end, scale, n_cells, out)


@kernel(parallel=True)
def attend_token_heads(q, k, v, position, window, scale, n_cells, out, n_threads=1):
    """attend_token with the heads shared among n_threads threads: for a long context, where a head's work is
    large. A KV head's group is cut into as few parts as give every thread one, so that each key row is
    converted as few times as possible (MLA: one KV head for every query head)."""
    n_head = q.shape[0]
    n_kv_head = k.shape[0]
    group = n_head // n_kv_head
    n_parts = min(group, max(1, -(-n_threads // n_kv_head)))
    begin, end = first_visible(position, window), position + 1
    for task in prange(n_kv_head * n_parts):
        g, part = task // n_parts, task % n_parts
        j0, j1 = part * group // n_parts, (part + 1) * group // n_parts
        attend_heads(q, k, v, g, j0, j1, begin, end, scale, n_cells, out)


# Multiply-adds of one token's attention (heads x visible cells x (dk + dv)) from which its heads are shared
# among the threads rather than computed on the calling one (waking them costs a few microseconds).
PARALLEL_ATTENTION_WORK = 1 << 17


@kernel
def decode_attention(
    q,
    k,
    v,
    q_norm,
    k_norm,
    eps,
    cos,
    sin,
    n_dims,
    neox,
    q_scale,
    k_cache,
    v_cache,
    position,
    window,
    scale,
    n_cells,
    attend_here,
    out,
):
    """What llama.cpp's graph does for one token between its Q/K/V matmuls and the output projection, in one
    call (numerics ggml, decoding): QK-norm (when q_norm is not empty), rope, q * q_scale (gemma3), K and V
    stored in the F16 cache at position % n_slots, then attend_token if attend_here (else the caller runs
    attend_token_heads). q (n_head, dk), k (n_kv_head, dk), v (n_kv_head, dv) f32; the caches' uint16 views;
    out (n_head, dv). q and k are overwritten (q ends roped and scaled, as attention takes it)."""
    if q_norm.shape[0]:
        for h in range(q.shape[0]):
            rms_norm_row(q[h].copy(), q_norm, eps, q[h])
        for h in range(k.shape[0]):
            rms_norm_row(k[h].copy(), k_norm, eps, k[h])
    rope_token(q.copy(), cos, sin, n_dims, neox, q)
    rope_token(k.copy(), cos, sin, n_dims, neox, k)
    if q_scale != f32(1):
        for h in range(q.shape[0]):
            for i in range(q.shape[1]):
                q[h, i] *= q_scale
    slot = position % k_cache.shape[1]
    for g in range(k.shape[0]):
        for i in range(k.shape[1]):
            k_cache[g, slot, i] = cpu_fp32_to_fp16(k[g, i])
        for i in range(v.shape[1]):
            v_cache[g, slot, i] = cpu_fp32_to_fp16(v[g, i])
    if attend_here:
        attend_token(q, k_cache, v_cache, position, window, scale, n_cells, out)


@kernel
def mla_prepare(q, kv, kv_norm, eps, cos, sin, n_rot, neox, k_cache, slot, q_nope, q_full):
    """deepseek2's MLA for one token between its projections and attn_k_b (numerics ggml): the latent
    rms-normed, k_pe roped, both stored in the F16 cache at `slot` ([latent; k_pe], one KV head), q_nope
    copied out for attn_k_b, q_pe roped into q_full's last n_rot columns. q (n_head, nope + n_rot), kv
    (1, kv_lora + n_rot) f32; k_cache (1, n_slots, kv_lora + n_rot) f16 bits; q_nope (n_head, nope) and
    q_full (n_head, kv_lora + n_rot) f32, written. The operations of rms_norm, Rope.apply and LayerCache.store."""
    n_head = q.shape[0]
    nope = q.shape[1] - n_rot
    kv_lora = kv.shape[1] - n_rot
    latent = np.empty(kv_lora, dtype=np.float32)
    rms_norm_row(kv[0, :kv_lora], kv_norm, eps, latent)
    k_pe = np.empty((1, n_rot), dtype=np.float32)
    rope_token(kv[:, kv_lora:], cos, sin, n_rot, neox, k_pe)
    for i in range(kv_lora):
        k_cache[0, slot, i] = cpu_fp32_to_fp16(latent[i])
    for i in range(n_rot):
        k_cache[0, slot, kv_lora + i] = cpu_fp32_to_fp16(k_pe[0, i])
    for h in range(n_head):
        for i in range(nope):
            q_nope[h, i] = q[h, i]
    rope_token(q[:, nope:], cos, sin, n_rot, neox, q_full[:, kv_lora:])
