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
from .ops_ggml import fma32, reduce_add_16, rms_norm_row, rope_token, softmax_row

f32 = np.float32


@kernel
def first_visible(position, window):
    return max(0, position - window + 1) if window else 0


@kernel
def dot_cells_tinyblas(v16, head, d, p16, begin, end, n_slots):
    """sum over cells begin..end-1 of v16[head, slot, d] * p16[cell], tinyBLAS's 16 lanes from cell 0."""
    acc = np.zeros(16, dtype=np.float32)
    for chunk in range(begin - begin % 16, end, 16):
        for lane in range(16):
            p = chunk + lane
            if begin <= p < end:
                acc[lane] = fma32(half_to_f32(v16[head, p % n_slots, d]), p16[p], acc[lane])
    return reduce_add_16(acc, 0)


@kernel
def dot_cells_vec(v16, head, d, p16, begin, end, n_slots, n_cells, acc):
    """The same sum as ggml_vec_dot_f16 over n_cells cells (0 outside begin..end-1)."""
    acc[:] = 0
    steps = n_cells - n_cells % 64
    for i in range(begin - begin % 64, min(end, steps), 64):
        for k in range(64):
            p = i + k
            if begin <= p < end:
                acc[k] = fma32(half_to_f32(v16[head, p % n_slots, d]), p16[p], acc[k])
    for k in range(32):
        acc[k] = acc[k] + acc[k + 32]
    for k in range(16):
        acc[k] = acc[k] + acc[k + 16]
    wide = np.float64(reduce_add_16(acc, 0))
    for p in range(max(steps, begin), end):
        wide += np.float64(half_to_f32(v16[head, p % n_slots, d]) * p16[p])
    return f32(wide)


@kernel(parallel=True)
def attend(q, k, v, first, window, scale, n_cells, out):
    """Every query row of q against the cache (module docstring); n_cells: the cells ggml scores (its
    n_kv, a multiple of 256), which bounds ggml_vec_dot_f16's 64-element steps."""
    n_tok, n_head, dk = q.shape
    n_kv_head, n_slots, dv = v.shape
    group = n_head // n_kv_head
    batch = n_tok >= 2
    last = first + n_tok  # cells 0 .. last - 1 may be visible
    for job in prange(n_tok * n_head):
        t, h = job // n_head, job % n_head
        g = h // group
        position = first + t
        begin = first_visible(position, window)
        end = position + 1
        q16 = round_to_f16(q[t, h])
        key = np.empty(dk, dtype=np.float32)
        lanes = np.empty(64, dtype=np.float32)
        scores = np.empty(last, dtype=np.float32)
        for p in range(begin, end):
            for i in range(dk):
                key[i] = half_to_f32(k[g, p % n_slots, i])
            if batch and dk % 16 == 0:
                acc = np.zeros(16, dtype=np.float32)
                for i in range(0, dk, 16):
                    for lane in range(16):
                        acc[lane] = fma32(key[i + lane], q16[i + lane], acc[lane])
                kq = reduce_add_16(acc, 0)
            else:
                total, steps = vec_dot_lanes(key, q16, dk, lanes)
                wide = np.float64(total)
                for i in range(steps, dk):
                    wide += np.float64(key[i] * q16[i])
                kq = f32(wide)
            scores[p] = kq * scale
        probs = np.zeros(last, dtype=np.float32)
        softmax_row(scores, begin, end, n_cells, probs)
        p16 = round_to_f16(probs)
        for d in range(dv):
            if batch:
                out[t, h, d] = dot_cells_tinyblas(v, g, d, p16, begin, end, n_slots)
            else:
                out[t, h, d] = dot_cells_vec(v, g, d, p16, begin, end, n_slots, n_cells, lanes)


@kernel
def attend_token(q, k, v, position, window, scale, n_cells, out):
    """One query token, on this thread: q (n_head, dk) f32, k, v (n_kv_head, n_slots, d) f16 bits, out (n_head, dv).
    As `attend` for one token (ggml_vec_dot_f16 over head_dim, then over the n_cells cells)."""
    n_head, dk = q.shape
    n_kv_head, n_slots, dv = v.shape
    group = n_head // n_kv_head
    begin = first_visible(position, window)
    end = position + 1
    key = np.empty(dk, dtype=np.float32)
    lanes = np.empty(64, dtype=np.float32)
    scores = np.empty(end, dtype=np.float32)
    probs = np.zeros(end, dtype=np.float32)
    for h in range(n_head):
        g = h // group
        q16 = round_to_f16(q[h])
        for p in range(begin, end):
            for i in range(dk):
                key[i] = half_to_f32(k[g, p % n_slots, i])
            total, steps = vec_dot_lanes(key, q16, dk, lanes)
            wide = np.float64(total)
            for i in range(steps, dk):
                wide += np.float64(key[i] * q16[i])
            scores[p] = f32(wide) * scale
        softmax_row(scores, begin, end, n_cells, probs)
        p16 = round_to_f16(probs)
        for d in range(dv):
            out[h, d] = dot_cells_vec(v, g, d, p16, begin, end, n_slots, n_cells, lanes)


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
    out,
):
    """What llama.cpp's graph does for one token between its Q/K/V matmuls and the output projection, in one
    call (numerics ggml, decoding): QK-norm (when q_norm is not empty), rope, q * q_scale (gemma3), K and V
    stored in the F16 cache at position % n_slots, then attend_token. q (n_head, dk), k (n_kv_head, dk),
    v (n_kv_head, dv) f32; the caches' uint16 views; out (n_head, dv). q and k are overwritten."""
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
    attend_token(q, k_cache, v_cache, position, window, scale, n_cells, out)
