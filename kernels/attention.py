"""Attention of one query token over the KV cache (decoding), fused in one pass over the keys.

    kernel(q, k, v, first, n_keys, scale, out)

    q    (n_kv_head, group, dk)     the query heads, grouped by the key/value head they share (GQA)
    k    (n_kv_head, n_slots, dk)   one layer's keys, per KV head, positions contiguous
    v    (n_kv_head, n_slots, dv)   its values (may be a view of k's first dv columns: MLA's latent)
    out  (n_kv_head, group, dv)     softmax(scale * q . k) @ v over the n_keys positions first, first+1, ...

Position p lives in slot p % n_slots, so a sliding-window layer's cache is a ring of a little more
than its window and only the window is ever read. Each key row is read once for its whole group of
query heads, and the softmax is the online (flash-attention) recurrence: keys are scored a block at a
time, and the running sum of exp(score - max) and the running output are rescaled whenever the max
grows, so no (n_head, n_kv) score array exists. The keys are split into one range per thread when
there are few KV heads (gemma3 has one), each range keeping its own max, sum and output, merged at
the end as flash-decoding does.

Arithmetic: the dot products are summed in an order LLVM chooses (kernel(reassociate=True)), within
the dtype's rounding of a sequential sum; exp is libm's. The dtype of q, k, v and out is float32, or
float64 for the exact path: every intermediate is in that dtype.
"""

import numpy as np
from numba import types
from numba.extending import overload

from ._jit import kernel, prange, u32_as_f32
from .ops_exact import rms_norm_heads, rope_token

# Keys scored per pass of the recurrence: their scores stay in L1 (group x KEY_BLOCK values), and the
# running output is rescaled once per block rather than once per key.
KEY_BLOCK = 128


# exp for float32 as Cephes' expf: exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in
# [-ln2/2, ln2/2] (ln 2 split in two so that n * EXP_LN2_HI is exact), exp(r) by a degree-7 polynomial;
# within 1 ulp of the exact value over [-87.3, 0] (tests/test_long_context.py). Unlike a call to libm's
# expf it vectorises, and the softmax takes one exp per score: with libm's, the exps were a fifth of
# smollm2's decode attention at depth 4,096. ggml's softmax approximates exp likewise (ggml_v_expf).
EXP_LOG2E = np.float32(1.44269504088896341)
EXP_LN2_HI = np.float32(0.693359375)
EXP_LN2_LO = np.float32(-2.12194440e-4)
EXP_MIN = np.float32(-87.3365448)  # below it exp(x) is not a normal float32: 0
EXP_POLY = np.array(
    [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1],
    dtype=np.float32,
)


def softmax_exp(x):
    """exp(x) for x <= 0 (a score minus the running max): libm's in float64, EXP_POLY's in float32."""
    return np.exp(x)


@overload(softmax_exp, jit_options={"fastmath": {"contract"}})
def _softmax_exp(x):
    if x != types.float32:
        return lambda x: np.exp(x)
    c0, c1, c2, c3, c4, c5 = (np.float32(c) for c in EXP_POLY)

    def exp_f32(x):
        n = np.floor(x * EXP_LOG2E + np.float32(0.5))
        r = x - n * EXP_LN2_HI - n * EXP_LN2_LO
        p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
        p = p * r * r + r + np.float32(1)
        scale = u32_as_f32(np.uint32(np.int32(max(n, np.float32(-126))) + np.int32(127)) << np.uint32(23))
        if x >= EXP_MIN:
            return p * scale
        return np.float32(0) if x < EXP_MIN else x  # -inf (a masked score) gives 0; NaN stays NaN

    return exp_f32


@kernel(reassociate=True)
def attend_range(q, k, v, h, first, lo, hi, scale, o, m, lsum, scores):
    """Keys lo .. hi - 1 (positions first + lo ..) of KV head h into its group's running output o (group, dv),
    max score m (group,) and sum of exp(score - max) lsum (group,); scores (group, KEY_BLOCK) scratch."""
    group, dk = q.shape[1], q.shape[2]
    n_slots = k.shape[1]
    dv = v.shape[2]
    zero = np.zeros(1, dtype=q.dtype)[0]
    for b0 in range(lo, hi, KEY_BLOCK):
        nb = min(KEY_BLOCK, hi - b0)
        start = (first + b0) % n_slots
        slot = start
        for t in range(nb):  # scores of the block: each key row read once for the whole group
            for g in range(group):
                acc = zero
                for d in range(dk):
                    acc += q[h, g, d] * k[h, slot, d]
                scores[g, t] = acc * scale
            slot += 1
            if slot == n_slots:
                slot = 0
        for g in range(group):  # the recurrence: rescale what came before if the max grew
            m_block = scores[g, 0]
            for t in range(1, nb):
                m_block = max(m_block, scores[g, t])
            m_new = max(m[g], m_block)
            correction = softmax_exp(m[g] - m_new)
            for d in range(dv):
                o[g, d] *= correction
            total = lsum[g] * correction
            for t in range(nb):
                p = softmax_exp(scores[g, t] - m_new)
                scores[g, t] = p
                total += p
            lsum[g] = total
            m[g] = m_new
        slot = start
        for t in range(nb):  # output: each value row read once for the whole group
            for g in range(group):
                p = scores[g, t]
                for d in range(dv):
                    o[g, d] += p * v[h, slot, d]
            slot += 1
            if slot == n_slots:
                slot = 0


@kernel(parallel=True, reassociate=True)
def attend_one_token(q, k, v, first, n_keys, scale, n_split, out):
    n_kv_head, group, dk = q.shape
    dv = v.shape[2]
    chunk = (n_keys + n_split - 1) // n_split
    zero = np.zeros(1, dtype=q.dtype)[0]
    part_o = np.zeros((n_kv_head, n_split, group, dv), dtype=q.dtype)  # each range's unnormalised output
    part_m = np.full((n_kv_head, n_split, group), -np.inf, dtype=q.dtype)  # its running max score
    part_l = np.zeros((n_kv_head, n_split, group), dtype=q.dtype)  # its running sum of exp(score - max)
    for task in prange(n_kv_head * n_split):
        h = task // n_split
        s = task - h * n_split
        lo = s * chunk
        hi = min(n_keys, lo + chunk)
        scores = np.empty((group, KEY_BLOCK), dtype=q.dtype)
        attend_range(q, k, v, h, first, lo, hi, scale, part_o[h, s], part_m[h, s], part_l[h, s], scores)
    for i in prange(n_kv_head * group):  # merge the ranges (flash-decoding's reduction)
        h = i // group
        g = i - h * group
        m_all = part_m[h, 0, g]
        for s in range(1, n_split):
            m_all = max(m_all, part_m[h, s, g])
        total = zero
        for d in range(dv):
            out[h, g, d] = total
        for s in range(n_split):
            if part_l[h, s, g] == 0:  # an empty range (more ranges than keys)
                continue
            w = softmax_exp(part_m[h, s, g] - m_all)
            total += part_l[h, s, g] * w
            for d in range(dv):
                out[h, g, d] += part_o[h, s, g, d] * w
        for d in range(dv):
            out[h, g, d] /= total


@kernel(reassociate=True)
def attend_here(q, k, v, first, n_keys, scale, out):
    """attend_one_token on this thread, in one range per KV head (a short context: waking the other threads
    costs more than the work). The same recurrence, so the same arithmetic as n_split = 1."""
    n_kv_head, group, _ = q.shape
    dv = v.shape[2]
    scores = np.empty((group, KEY_BLOCK), dtype=q.dtype)
    m = np.empty(group, dtype=q.dtype)
    lsum = np.empty(group, dtype=q.dtype)
    for h in range(n_kv_head):
        o = out[h]  # (group, dv): the running output, normalised at the end
        o[:] = 0
        m[:] = -np.inf
        lsum[:] = 0
        attend_range(q, k, v, h, first, 0, n_keys, scale, o, m, lsum, scores)
        for g in range(group):
            for d in range(dv):
                o[g, d] /= lsum[g]


@kernel
def decode_attention(q, k, v, q_norm, k_norm, eps, cos, sin, n_dims, neox, k_cache, v_cache, position, begin, scale,
                     attend, out):  # fmt: skip
    """What a decoding layer does between its Q/K/V projections and the output projection, in one call
    (numerics exact, float32): QK-norm (when q_norm is not empty), rope, k and v stored at the position's
    slot, then (attend) attend_here over positions begin .. position. q (n_head, dk), k (n_kv_head, dk),
    v (n_kv_head, dv), overwritten; the layer's caches (n_kv_head, n_slots, d); out (n_kv_head, group, dv)."""
    if q_norm.shape[0]:
        rms_norm_heads(q, q_norm, eps)
        rms_norm_heads(k, k_norm, eps)
    rope_token(q, cos, sin, n_dims, neox)
    rope_token(k, cos, sin, n_dims, neox)
    slot = position % k_cache.shape[1]
    for g in range(k.shape[0]):
        for i in range(k.shape[1]):
            k_cache[g, slot, i] = k[g, i]
        for i in range(v.shape[1]):
            v_cache[g, slot, i] = v[g, i]
    if attend:
        n_kv_head = k.shape[0]
        qg = q.reshape((n_kv_head, q.shape[0] // n_kv_head, q.shape[1]))
        attend_here(qg, k_cache, v_cache, begin, position + 1 - begin, scale, out)
