"""ggml-cpu's float32 ops outside the matmuls, bit for bit: what numerics="ggml" computes between them.

llama.cpp's CPU backend rounds activations to 8 bits at every quantized matmul, so a difference of
one ulp anywhere before one (a norm summed in another order, a cosine from another library) moves
a value across a rounding boundary now and then, and from there the two computations drift apart
by the size of that rounding: llama.cpp against itself with its weight repacking turned off differs
by a mean KL of 6e-3 on gemma3-270m. So these follow ggml-cpu's code operation for operation, as
GCC compiles it for x86 with AVX-512 (ops.cpp, vec.h, vec.cpp; llama-cpp-python 0.3.36's ggml):

  rms_norm     the squares summed in double, in order; scale = 1/sqrtf(mean + eps); x * scale * w
  rope         per position, theta = p, then theta *= powf(base, -2/n_dims) pair by pair (a float32
               running product); cosf and sinf of libm; x0 cos - x1 sin with GCC's fused multiply-add
  softmax      ggml_v_expf (a polynomial, 16 lanes), its sums in double per 16-lane block
               (_mm512_reduce_add_ps's tree), remainder by libm's expf; 1/sum in double, applied in float
  silu         x / (1 + ggml_v_expf(-x)), and for ne % 16 leftovers x / (1 + expf(-x))
  gelu         ggml's table: x rounded to f16, the table's f16 value of gelu at it (GGML_GELU_FP16)

tests/test_ggml_ops.py holds each to ggml's own op, through ctypes on the libggml of llama-cpp-python.
"""

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import f16_to_f32, kernel, prange
from .activations import cpu_fp32_to_fp16
from .simd import (
    Float32x8,
    add_floats,
    load_floats_at,
    splat_float,
    store_floats_at,
    sub_floats,
    sum_floats,
    zero_floats,
)

f32 = np.float32


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c in float32 with one rounding (llvm.fma.f32: vfmadd on x86), as ggml's _mm512_fmadd_ps
    and GCC's contracted a * b + c."""
    if not all(isinstance(v, types.Float) and v.bitwidth == 32 for v in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        fn_type = ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 3)
        return builder.call(cgutils.get_or_insert_function(builder.module, fn_type, "llvm.fma.f32"), args)

    return types.float32(a, b, c), codegen


# ---------------------------------------------------------------- exp and the 16-lane sums

EXP_SHIFTER = f32(float.fromhex("0x1.8p23"))
EXP_LOG2E = f32(float.fromhex("0x1.715476p+0"))
EXP_LN2_HI = f32(float.fromhex("0x1.62e4p-1"))
EXP_LN2_LO = f32(float.fromhex("0x1.7f7d1cp-20"))
EXP_C4 = f32(float.fromhex("0x1.0e4020p-7"))
EXP_C3 = f32(float.fromhex("0x1.573e2ep-5"))
EXP_C2 = f32(float.fromhex("0x1.555e66p-3"))
EXP_C1 = f32(float.fromhex("0x1.fffdb6p-2"))
EXP_C0 = f32(float.fromhex("0x1.ffffecp-1"))


@kernel
def v_expf(x):
    """One lane of ggml_v_expf (vec.h, the AVX-512 version): n = round(x log2 e) by the 1.5 * 2^23
    shifter, b = x - n ln 2 in two parts, exp(b) by a degree-5 polynomial, then scalef by 2^n;
    |n| > 192 gives 0 or inf."""
    z = fma32(x, EXP_LOG2E, EXP_SHIFTER)
    n = z - EXP_SHIFTER
    b = fma32(-n, EXP_LN2_LO, fma32(-n, EXP_LN2_HI, x))
    u = b * b
    j = fma32(fma32(fma32(EXP_C4, b, EXP_C3), u, fma32(EXP_C2, b, EXP_C1)), u, fma32(EXP_C0, b, f32(1)))
    if abs(n) > f32(192):
        return f32(0) if n <= f32(0) else f32(np.inf)
    return f32(np.float64(j) * 2.0 ** np.float64(n))  # _mm512_scalef_ps: one rounding of j * 2^n


@intrinsic
def v_expf_lanes(typingctx, x):
    """v_expf on 8 lanes at once (a Float32x8), operation for operation: the fused multiply-adds as
    llvm.fma, scalef as j * 2^n in double (exact) rounded once to float, |n| > 192 to 0 or inf."""
    if x is not Float32x8:
        return None

    def codegen(context, builder, signature, args):
        v8f, v8d, v8i = (
            ir.VectorType(ir.FloatType(), 8),
            ir.VectorType(ir.DoubleType(), 8),
            ir.VectorType(ir.IntType(64), 8),
        )
        fma_type = ir.FunctionType(v8f, [v8f] * 3)
        fma = cgutils.get_or_insert_function(builder.module, fma_type, "llvm.fma.v8f32")

        def splat(value):
            return ir.Constant(v8f, [ir.Constant(ir.FloatType(), float(value))] * 8)

        (xv,) = args
        n = builder.fsub(builder.call(fma, [xv, splat(EXP_LOG2E), splat(EXP_SHIFTER)]), splat(EXP_SHIFTER))
        minus_n = builder.fneg(n)
        b = builder.call(fma, [minus_n, splat(EXP_LN2_LO), builder.call(fma, [minus_n, splat(EXP_LN2_HI), xv])])
        u = builder.fmul(b, b)
        inner = builder.call(
            fma,
            [
                builder.call(fma, [splat(EXP_C4), b, splat(EXP_C3)]),
                u,
                builder.call(fma, [splat(EXP_C2), b, splat(EXP_C1)]),
            ],
        )
        j = builder.call(fma, [inner, u, builder.call(fma, [splat(EXP_C0), b, splat(1.0)])])
        magnitude = builder.call(
            cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f]), "llvm.fabs.v8f32"), [n]
        )
        big = builder.fcmp_ordered(">", magnitude, splat(192.0))
        exponent = builder.fptosi(builder.select(big, splat(0.0), n), v8i)  # NaN: poison lanes, but only where big
        exponent = builder.select(builder.fcmp_unordered("uno", n, n), ir.Constant(v8i, [0] * 8), exponent)
        power = builder.bitcast(
            builder.shl(builder.add(exponent, ir.Constant(v8i, [1023] * 8)), ir.Constant(v8i, [52] * 8)), v8d
        )
        scaled = builder.fptrunc(builder.fmul(builder.fpext(j, v8d), power), v8f)
        overflow = builder.select(builder.fcmp_ordered("<=", n, splat(0.0)), splat(0.0), splat(float("inf")))
        return builder.select(big, overflow, scaled)

    return Float32x8(x), codegen


@kernel
def reduce_add_16(v, i):
    """v[i] + ... + v[i + 15] (a float32 1-D array) in the tree of GCC's _mm512_reduce_add_ps: the
    halves 8 apart added, then 4 apart, then lanes (0 + 2) + (1 + 3)."""
    a0 = (v[i + 0] + v[i + 8]) + (v[i + 4] + v[i + 12])
    a1 = (v[i + 1] + v[i + 9]) + (v[i + 5] + v[i + 13])
    a2 = (v[i + 2] + v[i + 10]) + (v[i + 6] + v[i + 14])
    a3 = (v[i + 3] + v[i + 11]) + (v[i + 7] + v[i + 15])
    return (a0 + a2) + (a1 + a3)


@kernel
def logf(x):  # libm's logf (math.log of a float32 is a call to it), for the float32 set-up llama.cpp does in C
    return math.log(f32(x))


# ---------------------------------------------------------------- rms_norm


@kernel
def rms_norm_row(x, weight, eps, out):  # (n,) f32 -> out (n,)
    """ggml_rms_norm then ggml_mul by the weight (ops.cpp's rms_norm_f32, fused or not: the same)."""
    total = 0.0
    for i in range(x.shape[0]):
        total += np.float64(x[i] * x[i])
    scale_row(x, total, weight, eps, out)


@kernel
def scale_row(x, total, weight, eps, out):  # rms_norm_row's output from its sum of squares (double)
    mean = f32(total / x.shape[0])
    scale = f32(1) / np.sqrt(mean + eps)
    for i in range(x.shape[0]):
        out[i] = x[i] * scale * weight[i]


@kernel(parallel=True)
def rms_norm(x, weight, eps, out):  # (n_rows, n) f32, (n,) f32, f32 -> out (n_rows, n), a batch
    """rms_norm_row of every row, four rows' sums of squares side by side: each is a chain of dependent double
    adds (4 cycles each), which four chains fill."""
    n_rows = x.shape[0]
    for g in prange((n_rows + 3) // 4):
        r0, r1, r2, r3 = 4 * g, min(4 * g + 1, n_rows - 1), min(4 * g + 2, n_rows - 1), min(4 * g + 3, n_rows - 1)
        t0 = t1 = t2 = t3 = 0.0
        for i in range(x.shape[1]):
            t0 += np.float64(x[r0, i] * x[r0, i])
            t1 += np.float64(x[r1, i] * x[r1, i])
            t2 += np.float64(x[r2, i] * x[r2, i])
            t3 += np.float64(x[r3, i] * x[r3, i])
        for r, total in ((r0, t0), (r1, t1), (r2, t2), (r3, t3)):
            scale_row(x[r], total, weight, eps, out[r])


@kernel
def rms_norm_few(x, weight, eps, out):  # the same for a few rows (decoding), without waking the threads
    for r in range(x.shape[0]):
        rms_norm_row(x[r], weight, eps, out[r])


@kernel
def add_rms_norm(x, y, weight, eps, total, normed):  # (n,) f32 each: total = x + y, normed = rms_norm(total) * w
    """ggml_add then ggml_rms_norm and ggml_mul, for one token: the residual stream and the next norm's input."""
    for i in range(x.shape[0]):
        total[i] = x[i] + y[i]
    rms_norm_row(total, weight, eps, normed)


# ---------------------------------------------------------------- rope


@kernel
def rope_yarn_corr_dims(n_dims, n_ctx_orig, base, beta_fast, beta_slow):
    """ggml_rope_yarn_corr_dims (ggml.c): the pair indices where YaRN's ramp starts and ends, in float32."""
    two_pi = f32(2) * f32(math.pi)
    low = math.floor(
        f32(n_dims) * f32(math.log(f32(n_ctx_orig) / (beta_fast * two_pi))) / (f32(2) * f32(math.log(base)))
    )
    high = math.ceil(
        f32(n_dims) * f32(math.log(f32(n_ctx_orig) / (beta_slow * two_pi))) / (f32(2) * f32(math.log(base)))
    )
    return max(f32(0), f32(low)), min(f32(n_dims - 1), f32(high))


@kernel
def rope_tables(positions, n_dims, base, freq_scale, freq_factors, attn_factor, ext_factor, corr_low, corr_high):
    """cos and sin of every position and pair, (n_tok, n_dims / 2) each, as ggml_rope_cache_init and
    rope_yarn compute them. freq_factors (n_dims / 2,) divides each pair's angle (empty: none)."""
    n_tok, half = positions.shape[0], n_dims // 2
    cos = np.empty((n_tok, half), dtype=np.float32)
    sin = np.empty((n_tok, half), dtype=np.float32)
    theta_scale = base ** (f32(-2.0) / f32(n_dims))
    for t in range(n_tok):
        theta = f32(positions[t])
        for k in range(half):
            extrap = theta / freq_factors[k] if freq_factors.shape[0] else theta
            angle = freq_scale * extrap
            mscale = attn_factor
            if ext_factor != f32(0):
                y = (f32(k) - f32(corr_low)) / max(f32(0.001), f32(corr_high) - f32(corr_low))
                mix = (f32(1) - min(f32(1), max(f32(0), y))) * ext_factor
                angle = fma32(angle, f32(1) - mix, extrap * mix)
                mscale *= fma32(f32(0.1), f32(math.log(f32(1) / freq_scale)), f32(1))
            cos[t, k] = f32(math.cos(angle)) * mscale
            sin[t, k] = f32(math.sin(angle)) * mscale
            theta *= theta_scale
    return cos, sin


@kernel
def rope_token(x, cos, sin, n_dims, neox, out):  # (n_head, head_dim) f32, (n_dims / 2,) tables -> out
    """rotate_pairs: x0 cos - x1 sin and x0 sin + x1 cos with GCC's contraction (the second product
    rounded, the first fused), over pairs (2k, 2k + 1) or, neox, (k, k + n_dims / 2); the rest copied."""
    n_head, head_dim = x.shape
    half = n_dims // 2
    for h in range(n_head):
        for k in range(half):
            i0, i1 = (k, k + half) if neox else (2 * k, 2 * k + 1)
            x0, x1 = x[h, i0], x[h, i1]
            c, s = cos[k], sin[k]
            out[h, i0] = fma32(x0, c, -(x1 * s))
            out[h, i1] = fma32(x0, s, x1 * c)
        for i in range(n_dims, head_dim):
            out[h, i] = x[h, i]


@kernel(parallel=True)
def rope_apply(x, cos, sin, n_dims, neox, out):  # (n_tok, n_head, head_dim) f32, (n_tok, n_dims / 2) -> out
    for t in prange(x.shape[0]):
        rope_token(x[t], cos[t], sin[t], n_dims, neox, out[t])


@kernel
def rope_apply_few(x, cos, sin, n_dims, neox, out):  # the same for a few tokens (decoding), on this thread
    for t in range(x.shape[0]):
        rope_token(x[t], cos[t], sin[t], n_dims, neox, out[t])


# ---------------------------------------------------------------- softmax


@kernel
def softmax_row(w, begin, end, n, out):
    """ggml_vec_max_f32, ggml_vec_soft_max_f32 and the scaling by 1/sum, for a row of n scores (already
    scaled and masked) of which only w[begin:end] are not masked (-inf) and are read: the others are
    exactly 0 and add nothing to the sums. ggml's 16-lane blocks run from index 0 to n - n % 16, the
    rest by libm's expf; out[begin:end] gets the probabilities."""
    m = f32(-np.inf)
    for i in range(begin, end):
        m = max(m, w[i])
    total = 0.0
    n_full = n - n % 16
    block = np.zeros(16, dtype=np.float32)
    i = begin - begin % 16
    while i < min(end, n_full):
        if begin <= i and i + 16 <= end:  # a block of visible scores: its 16 lanes as two vectors of 8
            low = v_expf_lanes(sub_floats(load_floats_at(w, i), splat_float(m)))
            high = v_expf_lanes(sub_floats(load_floats_at(w, i + 8), splat_float(m)))
            store_floats_at(out, i, low)
            store_floats_at(out, i + 8, high)
            total += np.float64(sum_floats(add_floats(low, high)))  # reduce_add_16's tree
            i += 16
            continue
        for lane in range(16):
            p = i + lane
            block[lane] = v_expf(w[p] - m) if begin <= p < end else f32(0)
            if begin <= p < end:
                out[p] = block[lane]
        total += np.float64(reduce_add_16(block, 0))
        i += 16
    for p in range(max(n_full, begin), end):
        e = f32(math.exp(w[p] - m))
        total += np.float64(e)
        out[p] = e
    inv = f32(1.0 / total)
    for p in range(begin, end):
        out[p] *= inv


@kernel
def softmax_scaled_row(x, scale, out):  # (n,) f32 -> out: ggml_soft_max_ext(x, NULL, scale, 0) of one row
    w = np.empty(x.shape[0], dtype=np.float32)
    for i in range(x.shape[0]):
        w[i] = x[i] * scale
    softmax_row(w, 0, x.shape[0], x.shape[0], out)


@kernel(parallel=True)
def softmax_rows(x, scale, out):  # (n_rows, n) f32 -> out, row by row
    for r in prange(x.shape[0]):
        softmax_scaled_row(x[r], scale, out[r])


@kernel
def softmax_rows_few(x, scale, out):  # the same for a few rows (a router's, decoding), on this thread
    for r in range(x.shape[0]):
        softmax_scaled_row(x[r], scale, out[r])


@kernel
def sigmoid_rows(x, out):  # (n_rows, n) f32 -> out: ggml_vec_sigmoid_f32, 1 / (1 + expf(-x)) with libm's expf
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            out[r, i] = f32(1) / (f32(1) + f32(math.exp(-x[r, i])))


# ---------------------------------------------------------------- silu, gelu


@kernel
def silu_lane(x):
    return x / (f32(1) + v_expf(f32(0) - x))


@kernel
def swiglu_row(gate, up, out):  # (n,) f32 each
    """ggml_vec_swiglu_f32: ggml_v_silu 16 lanes at a time, the rest x / (1 + expf(-x))."""
    n = gate.shape[0]
    n_full = n - n % 16
    exp = np.empty(8, dtype=np.float32)  # e^-gate of 8 lanes: v_expf_lanes, each lane silu_lane's v_expf
    for i in range(0, n_full, 8):
        store_floats_at(exp, 0, v_expf_lanes(sub_floats(zero_floats(), load_floats_at(gate, i))))
        for k in range(8):
            out[i + k] = gate[i + k] / (f32(1) + exp[k]) * up[i + k]
    for i in range(n_full, n):
        g = gate[i]
        out[i] = g / (f32(1) + f32(math.exp(-g))) * up[i]


@kernel(parallel=True)
def swiglu_rows(gate, up, out):  # (n_rows, n) f32 each: ggml_swiglu_split, silu(gate) * up
    for r in prange(gate.shape[0]):
        swiglu_row(gate[r], up[r], out[r])


@kernel
def swiglu_few(gate, up, out):  # the same for a few rows (decoding), on this thread
    for r in range(gate.shape[0]):
        swiglu_row(gate[r], up[r], out[r])


GELU_COEF_A = f32(0.044715)
SQRT_2_OVER_PI = f32(0.79788456080286535587989211986876)


@kernel
def gelu_f32(x):
    """ggml_gelu_f32 as GCC compiles it: 0.5 x (1 + tanhf(sqrt(2/pi) x (1 + a x^2)))."""
    inner = fma32(GELU_COEF_A * x, x, f32(1))
    return f32(0.5) * x * (f32(1) + f32(math.tanh(SQRT_2_OVER_PI * x * inner)))


@kernel
def gelu_table():  # -> (65536,) uint16: ggml_table_gelu_f16, gelu at every half, rounded to half
    table = np.empty(65536, dtype=np.uint16)
    for h in range(65536):
        table[h] = cpu_fp32_to_fp16(gelu_f32(f16_to_f32(h & 0xFF, h >> 8)))
    return table


@kernel
def geglu_row(gate, up, table, out):  # (n,) f32 each
    """ggml_vec_geglu_f32 with GGML_GELU_FP16: 0 below -10, x above 10, else the table's value at x
    rounded to half, times up."""
    for i in range(gate.shape[0]):
        g = gate[i]
        if g <= f32(-10):
            out[i] = f32(0)
        elif g >= f32(10):
            out[i] = g * up[i]
        else:
            h = table[cpu_fp32_to_fp16(g)]
            out[i] = f16_to_f32(h & 0xFF, h >> 8) * up[i]


@kernel(parallel=True)
def geglu_rows(gate, up, table, out):  # (n_rows, n) f32 each: ggml_geglu_split, gelu(gate) * up by the table
    for r in prange(gate.shape[0]):
        geglu_row(gate[r], up[r], table, out[r])


@kernel
def geglu_few(gate, up, table, out):  # the same for a few rows (decoding), on this thread
    for r in range(gate.shape[0]):
        geglu_row(gate[r], up[r], table, out[r])


# ---------------------------------------------------------------- a batch's FFN activations on every core
# nn.py runs these on a micro-batch inside the step's thread policy, which leaves numba one thread while BLAS
# holds the cores; numerics ggml calls no BLAS, so the ops with most work take them back (threads.integer_kernels).
# The smaller ones (rms_norm, rope, softmax_rows: tenths of a millisecond) stay on one thread: on a machine
# shared with other processes every parallel region waits for both threads to be scheduled, which costs more.


def batch_op(kernel):
    """`kernel` as a batch op: run with numba's threads on every core inside a batch's step."""

    def run(*args):
        from refengine.threads import integer_kernels  # refengine.threads imports this package: not at load

        with integer_kernels():
            return kernel(*args)

    run.__name__, run.__doc__ = kernel.__name__, kernel.__doc__
    return run


swiglu = batch_op(swiglu_rows)
geglu = batch_op(geglu_rows)
