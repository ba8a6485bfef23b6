"""Dot products of float vectors in the orders ggml-cpu adds them (x86, AVX-512 build), for numerics="ggml":
the matmuls of F32 and F16 weights, and attention's K*Q and V*softmax over an F16 KV cache.

Two orders, chosen by ggml_compute_forward_mul_mat:

  tinyBLAS    llamafile's sgemm (llamafile/sgemm.cpp), for a batch (n >= 2 tokens) when k % 16 == 0
              and m % 4 == 0: one 16-lane accumulator per output, acc = fma(a[l:l+16], b[l:l+16], acc)
              chunk after chunk, then _mm512_reduce_add_ps (reduce_add_16).
  vec_dot     ggml_vec_dot_f32 / _f16 (vec.cpp), one token or any other shape: four 16-lane
              accumulators over steps of 64 (accumulator j takes elements 64s + 16j + lane), added
              0 + 2, 1 + 3, then 0 + 1, reduce_add_16, then the n % 64 leftovers one by one: in float
              for F32 (fused with their products), in double for F16.

F16 operands are f16 values held in float32 (exact), so every product is exact and only the sums
round. The KV cache stores keys and values as f16 (ggml's default cache type); a query or a row of
probabilities is rounded to f16 first, as mul_mat converts src1 to the weight's vec_dot_type.
"""

import numpy as np

from ._jit import f16_to_f32, kernel, prange
from .activations import cpu_fp32_to_fp16
from .gemv import half_to_f32
from .ops_ggml import fma32, reduce_add_16

f32 = np.float32


@kernel
def dot_tinyblas(a, b, n):
    """a[:n] . b[:n] (float32, n % 16 == 0) as tinyBLAS<16, __m512> sums one output."""
    acc = np.zeros(16, dtype=np.float32)
    for i in range(0, n, 16):
        for lane in range(16):
            acc[lane] = fma32(a[i + lane], b[i + lane], acc[lane])
    return reduce_add_16(acc, 0)


@kernel
def vec_dot_lanes(a, b, n, acc):
    """The 64-element steps of ggml_vec_dot_f32 / _f16 into acc (64,) float32, reduced: sum[j] = acc[16j:]."""
    acc[:] = 0
    steps = n - n % 64
    for i in range(0, steps, 64):
        for k in range(64):
            acc[k] = fma32(a[i + k], b[i + k], acc[k])
    for k in range(32):  # GGML_F32x16_REDUCE: sum[0] += sum[2], sum[1] += sum[3], then sum[0] += sum[1]
        acc[k] = acc[k] + acc[k + 32]
    for k in range(16):
        acc[k] = acc[k] + acc[k + 16]
    return reduce_add_16(acc, 0), steps


@kernel
def dot_vec_f32(a, b, n, acc):
    """ggml_vec_dot_f32: the leftovers added in float, each fused with its product."""
    total, steps = vec_dot_lanes(a, b, n, acc)
    for i in range(steps, n):
        total = fma32(a[i], b[i], total)
    return total


@kernel
def dot_vec_f16(a, b, n, acc):
    """ggml_vec_dot_f16 on values already f16: the sum and the leftovers in double, rounded at the end."""
    total, steps = vec_dot_lanes(a, b, n, acc)
    wide = np.float64(total)
    for i in range(steps, n):
        wide += np.float64(a[i] * b[i])
    return f32(wide)


@kernel
def round_to_f16(x):  # (n,) f32 -> (n,) f32, each value rounded to the nearest half (GGML_CPU_FP32_TO_FP16)
    rounded = np.empty_like(x)
    for i in range(x.shape[0]):
        h = cpu_fp32_to_fp16(x[i])
        rounded[i] = f16_to_f32(h & 0xFF, h >> 8)
    return rounded


@kernel
def halves_to_f32(h):  # (n,) uint16 (f16 bits) -> (n,) float32
    out = np.empty(h.shape[0], dtype=np.float32)
    for i in range(h.shape[0]):
        out[i] = half_to_f32(h[i])
    return out


@kernel(parallel=True)
def matvec_f32_ggml(rows, x, out):  # (n_out, 4 n_in) uint8, (n_in,) f32 -> (n_out,): ggml_vec_dot_f32 per row
    w = rows.reshape(-1).view(np.float32).reshape((rows.shape[0], x.shape[0]))
    for r in prange(w.shape[0]):
        acc = np.empty(64, dtype=np.float32)
        out[r] = dot_vec_f32(w[r], x, x.shape[0], acc)


@kernel(parallel=True)
def matmul_f32_ggml(rows, x, out):  # (n_out, 4 n_in) uint8, (n_tok, n_in) f32 -> (n_tok, n_out)
    """mul_mat of F32 weights: tinyBLAS where llamafile_sgemm takes the shape, else vec_dot per output."""
    n_tok, n_in = x.shape
    w = rows.reshape(-1).view(np.float32).reshape((rows.shape[0], n_in))
    tiny = n_tok >= 2 and n_in % 16 == 0 and w.shape[0] % 4 == 0
    for r in prange(w.shape[0]):
        acc = np.empty(64, dtype=np.float32)
        for t in range(n_tok):
            out[t, r] = dot_tinyblas(w[r], x[t], n_in) if tiny else dot_vec_f32(w[r], x[t], n_in, acc)


@kernel(parallel=True)
def matmul_id_f32_ggml(rows, x, out):  # one expert of a MUL_MAT_ID: vec_dot per output (llamafile is not used)
    n_tok, n_in = x.shape
    w = rows.reshape(-1).view(np.float32).reshape((rows.shape[0], n_in))
    for r in prange(w.shape[0]):
        acc = np.empty(64, dtype=np.float32)
        for t in range(n_tok):
            out[t, r] = dot_vec_f32(w[r], x[t], n_in, acc)


@kernel(parallel=True)
def matmul_f16_ggml(rows, x, out):  # (n_out, 2 n_in) uint8, (n_tok, n_in) f32 -> (n_tok, n_out)
    """mul_mat of F16 weights: x rounded to f16, then tinyBLAS (F16 x F16) or ggml_vec_dot_f16."""
    n_tok, n_in = x.shape
    w = rows.reshape(-1).view(np.uint16).reshape((rows.shape[0], n_in))
    x16 = round_to_f16(x.reshape(-1)).reshape(x.shape)
    tiny = n_tok >= 2 and n_in % 16 == 0 and w.shape[0] % 4 == 0
    for r in prange(w.shape[0]):
        acc = np.empty(64, dtype=np.float32)
        row = halves_to_f32(w[r])
        for t in range(n_tok):
            out[t, r] = dot_tinyblas(row, x16[t], n_in) if tiny else dot_vec_f16(row, x16[t], n_in, acc)


@kernel(parallel=True)
def matvec_f16_ggml(rows, x, out):  # (n_out, 2 n_in) uint8, (n_in,) f32 -> (n_out,): ggml_vec_dot_f16 per row
    w = rows.reshape(-1).view(np.uint16).reshape((rows.shape[0], x.shape[0]))
    x16 = round_to_f16(x)
    for r in prange(w.shape[0]):
        acc = np.empty(64, dtype=np.float32)
        out[r] = dot_vec_f16(halves_to_f32(w[r]), x16, x.shape[0], acc)


@kernel(parallel=True)
def matvec_slices_f32_ggml(rows, n_out, slices, x, out):  # gemv_ggml.py's matvec_slices_* for F32 rows
    n_in = x.shape[1]
    w = rows.reshape(-1).view(np.float32).reshape((rows.shape[0], n_in))
    for job in prange(slices.shape[0] * n_out):
        j, r = job // n_out, job % n_out
        acc = np.empty(64, dtype=np.float32)
        out[j, r] = dot_vec_f32(w[slices[j] * n_out + r], x[j if x.shape[0] > 1 else 0], n_in, acc)
