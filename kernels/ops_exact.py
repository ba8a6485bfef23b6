"""One token's element-wise ops in numerics "exact" (decoding, on the calling thread): the float32
operations of refengine.nn's numpy code, in one kernel call each instead of a handful of numpy calls.

    rms_norm_row(x, weight, eps, out)            x / sqrt(mean(x^2) + eps) * weight     (nn.rms_norm)
    add_rms_norm(x, y, weight, eps, total, out)  total = x + y, then rms_norm_row(total)  (the residual add)
    rope_token(x, cos, sin, n_dims, neox)        Rope.apply in place, x (n_head, head_dim)
    swiglu_row(gate, up, out)                    gate / (1 + exp(-gate)) * up           (nn.swiglu)

Each output equals numpy's but for the order of the sum of squares (`sum_squares`, vectorised: within
float32 reassociation) and exp, which is libm's expf here and numpy's own SIMD expf there (within an ulp).
"""

import numpy as np

from ._jit import kernel

f32 = np.float32


@kernel(reassociate=True)
def sum_squares(x):  # (n,) f32 -> f32: sum of x^2, in an order LLVM chooses
    total = f32(0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    return total


@kernel
def rms_norm_row(x, weight, eps, out):  # (n,) f32, (n,) f32, f32 -> out (n,)
    """nn.rms_norm of one row: mean_square = sum(x^2) / n, then x / sqrt(mean_square + eps) * weight."""
    mean_square = sum_squares(x) / f32(x.shape[0])
    denominator = np.sqrt(mean_square + eps)
    for i in range(x.shape[0]):
        out[i] = x[i] / denominator * weight[i]


@kernel
def add_rms_norm(x, y, weight, eps, total, out):  # (n,) f32 each: total = x + y, out = rms_norm(total) * weight
    """The residual add and the next norm of one token; total may be x itself."""
    for i in range(x.shape[0]):
        total[i] = x[i] + y[i]
    rms_norm_row(total, weight, eps, out)


@kernel
def rope_token(x, cos, sin, n_dims, neox):  # (n_head, head_dim) f32, (n_dims / 2,) f32 tables, in place
    """Rope.apply for one token: pairs (a, b) = (x[k], x[k + n_dims / 2]) (neox) or (x[2k], x[2k + 1]) become
    (a cos - b sin, b cos + a sin), each product rounded (no fused multiply-add, as numpy)."""
    half = n_dims // 2
    for h in range(x.shape[0]):
        for k in range(half):
            i0, i1 = (k, k + half) if neox else (2 * k, 2 * k + 1)
            a, b = x[h, i0], x[h, i1]
            x[h, i0] = a * cos[k] - b * sin[k]
            x[h, i1] = b * cos[k] + a * sin[k]


@kernel
def rms_norm_heads(x, weight, eps):  # (n_head, head_dim) f32, (head_dim,) f32, in place: QK-norm
    for h in range(x.shape[0]):
        rms_norm_row(x[h].copy(), weight, eps, x[h])


@kernel
def swiglu_row(gate, up, out):  # (n,) f32 each
    """silu(gate) * up = gate / (1 + exp(-gate)) * up (nn.silu, nn.swiglu)."""
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (f32(1) + np.exp(-g)) * up[i]
