"""Quantizers: float32 rows to Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (and F16).

Each kernel is a port of ggml's reference row quantizer (quantize_row_*_ref in
ggml-quants.c), the function llama_model_quantize reaches for these types when
no importance matrix is given, and its output is byte-identical to ggml's
(tests/test_quantize.py holds it to that against the live library and golden
files). Every kernel has the signature of a dequantizer reversed,
    kernel(x (n_blocks, block_size) float32, out (n_blocks, type_size) uint8)
and runs parallel over blocks; every byte of `out` is written. The block
layouts are those drawn in legacy.py and kquants.py.

What byte-exactness takes:
  * Every value is float32 and every operation one float32 operation in the C
    source's order: ints are cast to float32 where C converts them (numba would
    otherwise promote int * float32 to float64), float literals are written
    np.float32, and nothing is reassociated (the kernel decorator's default).
  * No fused multiply-add. ggml's libggml-base.so, which holds these functions,
    is built for baseline x86-64 (objdump finds no FMA, nor any AVX, instruction
    in it), so GCC had nothing to contract `a * b + c` into.
  * C's conversions, replicated: nearest_int's magic-number rounding, float to
    int truncation as x86's cvttss2si does it (c_int), narrowing to 8 bits by
    keeping the low byte, roundf (half away from zero), and GGML_FP32_TO_FP16
    (round to nearest even), whose decoded value the k-quants read back.
"""

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import f16_to_f32, kernel, prange, u32_as_f32
from .kquants import q3_k_scale, scale_min_k4

f32 = np.float32
GROUP_MAX_EPS = f32(1e-15)  # ggml's threshold below which a group counts as all zeros
FLT_MAX = f32(np.finfo(np.float32).max)


# -- scalar conversions, as ggml's C does them ------------------------------------------------


@intrinsic
def f32_bits(typingctx, value):
    """The IEEE bits of a float32 as a uint32 (a bitcast, no conversion)."""
    if not (isinstance(value, types.Float) and value.bitwidth == 32):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@kernel
def nearest_int(v):
    """ggml's nearest_int: add 1.5 * 2**23 so the float adder rounds to an integer (half to even),
    then read it from the mantissa. Exact for |v| < 2**22; beyond that it returns what ggml's does."""
    bits = np.int64(f32_bits(v + f32(12582912.0)))
    return (bits & 0x007FFFFF) - 0x00400000


@kernel
def c_int(v):
    """C's (int)v on x86-64 (cvttss2si): toward zero; NaN and values outside int32 give INT_MIN."""
    if v >= -2147483648.0 and v < 2147483648.0:
        return np.int64(np.int32(v))
    return -2147483648


@kernel
def low_byte_signed(i):
    """An int narrowed to int8_t, as C keeps the low byte."""
    return ((i + 128) & 0xFF) - 128


@kernel
def c_roundf(v):
    """C's roundf: halves away from zero (np.round would round them to even).

    |v| + 0.5 is exact in float64 for any float32 below 2**23; at or above that v is already whole."""
    a = abs(v)
    if not a < f32(8388608.0):  # also NaN and inf
        return v
    r = f32(np.floor(np.float64(a) + 0.5))
    return -r if v < 0 else r


@kernel
def fp32_to_fp16(f):
    """GGML_FP32_TO_FP16 (ggml_compute_fp32_to_fp16): the half's bits, rounded to nearest even.

    Scaling by 2**112 then 2**-110 and adding a power of two aligned on the
    half's exponent makes the float adder do the rounding, subnormals included;
    NaN becomes 0x7E00 with its sign."""
    base = (abs(f) * f32(2.0**112)) * f32(2.0**-110)
    w = np.int64(f32_bits(f))
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = u32_as_f32((bias >> 1) + 0x07800000) + base
    bits = np.int64(f32_bits(base))
    nonsign = ((bits >> 13) & 0x7C00) + (bits & 0x0FFF)
    return ((sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)) & 0xFFFF


@kernel
def put_f16(out, b, at, value):
    """Store `value` as a little-endian half at out[b, at:at + 2]; return the float32 it decodes to,
    which is what ggml's k-quants go on with (GGML_FP16_TO_FP32(y[i].d))."""
    h = fp32_to_fp16(value)
    out[b, at] = h & 0xFF
    out[b, at + 1] = h >> 8
    return f16_to_f32(out[b, at], out[b, at + 1])


# -- the shared scale searches of the k-quants (ggml-quants.c, without quant weights) ----------


@kernel
def make_qx_quants(x, L, nmax):
    """Signed quants L in [0, 2 nmax) and the scale of x, as ggml's make_qx_quants with rmse_type 1
    and no weights (each value weighted by its square): start from -nmax / (the value of largest
    magnitude) and try 18 nearby scales, keeping the one with the best weighted least-squares fit."""
    n = x.shape[0]
    amax, max_ = f32(0), f32(0)
    for i in range(n):
        if abs(x[i]) > amax:
            amax, max_ = abs(x[i]), x[i]
    if amax < GROUP_MAX_EPS:
        L[:] = 0
        return f32(0)
    iscale = f32(-nmax) / max_
    sumlx, suml2 = f32(0), f32(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l + nmax
        w = x[i] * x[i]
        sumlx += w * x[i] * f32(l)
        suml2 += w * f32(l) * f32(l)
    scale = sumlx / suml2 if suml2 != 0 else f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / max_
        sumlx, suml2 = f32(0), f32(0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            w = x[i] * x[i]
            sumlx += w * x[i] * f32(l)
            suml2 += w * f32(l) * f32(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@kernel
def make_q3_quants(x, L, nmax):
    """Signed quants L in [0, 2 nmax) and the scale of x, as ggml's make_q3_quants with do_rmse:
    quantize at -nmax / (the value of largest magnitude), then up to 5 passes that move single
    quants wherever that improves the x**2-weighted least-squares fit."""
    n = x.shape[0]
    amax, max_ = f32(0), f32(0)
    for i in range(n):
        if abs(x[i]) > amax:
            amax, max_ = abs(x[i]), x[i]
    if amax < GROUP_MAX_EPS:
        L[:] = 0
        return f32(0)
    iscale = f32(-nmax) / max_
    sumlx, suml2 = f32(0), f32(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l
        w = x[i] * x[i]
        sumlx += w * x[i] * f32(l)
        suml2 += w * f32(l) * f32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * f32(L[i])
            if slx > 0:
                sl2 = suml2 - w * f32(L[i]) * f32(L[i])
                new_l = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    slx += w * x[i] * f32(new_l)
                    sl2 += w * f32(new_l) * f32(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx, suml2 = slx, sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else f32(0)


@kernel
def make_qkx2_quants(x, weights, L, Laux, nmax, rmin, rdelta, nstep, use_mad):
    """Unsigned quants L in [0, nmax], a scale and a min for x = scale * L - min, as ggml's
    make_qkx2_quants: fit over the range [min(x, 0), max(x)], then try nstep + 1 stretched grids
    (nmax + rmin + rdelta * step levels over the range) and keep the fit with the smallest
    weighted error (absolute if use_mad, else squared). Returns (scale, min)."""
    n = x.shape[0]
    min_, max_ = x[0], x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < min_:
            min_ = x[i]
        if x[i] > max_:
            max_ = x[i]
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    if min_ > 0:
        min_ = f32(0)
    if max_ == min_:
        L[:] = 0
        return f32(0), -min_
    iscale = f32(nmax) / (max_ - min_)
    scale = f32(1) / iscale
    best_error = f32(0)
    for i in range(n):
        L[i] = max(0, min(nmax, nearest_int(iscale * (x[i] - min_))))
        diff = scale * f32(L[i]) + min_ - x[i]
        best_error += weights[i] * (abs(diff) if use_mad else diff * diff)
    if nstep < 1:
        return scale, -min_
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * f32(step) + f32(nmax)) / (max_ - min_)
        sum_l, sum_l2, sum_xl = f32(0), f32(0), f32(0)
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * (x[i] - min_))))
            Laux[i] = l
            w = weights[i]
            sum_l += w * f32(l)
            sum_l2 += w * f32(l) * f32(l)
            sum_xl += w * f32(l) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = f32(0)
                this_scale = sum_xl / sum_l2
            cur_error = f32(0)
            for i in range(n):
                diff = this_scale * f32(Laux[i]) + this_min - x[i]
                cur_error += weights[i] * (abs(diff) if use_mad else diff * diff)
            if cur_error < best_error:
                L[:] = Laux
                best_error = cur_error
                scale, min_ = this_scale, this_min
    return scale, -min_


# -- legacy 32-element blocks ------------------------------------------------------------------


# Q4_0, 18 bytes:  | d: f16 | qs: 16 B, two 4-bit quants a byte |   x[i] ~ d * (q - 8)
#   d = -(the value of largest magnitude) / 8, so that value maps to q = 0; q = trunc(x / d + 8.5).
@kernel(parallel=True)
def quantize_q4_0(x, out):  # (n_blocks, 32) float32 -> (n_blocks, 18) uint8;  as quantize_row_q4_0_ref
    for b in prange(x.shape[0]):
        half = x.shape[1] // 2
        amax, max_ = f32(0), f32(0)
        for j in range(x.shape[1]):
            if amax < abs(x[b, j]):
                amax, max_ = abs(x[b, j]), x[b, j]
        d = max_ / f32(-8)
        id_ = f32(1) / d if d != 0 else f32(0)
        put_f16(out, b, 0, d)
        for j in range(half):
            q0 = min(15, low_byte_signed(c_int(x[b, j] * id_ + f32(8.5)))) & 0xFF
            q1 = min(15, low_byte_signed(c_int(x[b, half + j] * id_ + f32(8.5)))) & 0xFF
            out[b, 2 + j] = (q0 | (q1 << 4)) & 0xFF


# Q4_1, 20 bytes:  | d: f16 | m: f16 | qs: 16 B, two 4-bit quants a byte |   x[i] ~ d * q + m
#   m = min(x), d = (max(x) - min(x)) / 15; q = trunc((x - m) / d + 0.5).
@kernel(parallel=True)
def quantize_q4_1(x, out):  # (n_blocks, 32) float32 -> (n_blocks, 20) uint8;  as quantize_row_q4_1_ref
    for b in prange(x.shape[0]):
        half = x.shape[1] // 2
        min_, max_ = FLT_MAX, -FLT_MAX
        for j in range(x.shape[1]):
            if x[b, j] < min_:
                min_ = x[b, j]
            if x[b, j] > max_:
                max_ = x[b, j]
        d = (max_ - min_) / f32(15)
        id_ = f32(1) / d if d != 0 else f32(0)
        put_f16(out, b, 0, d)
        put_f16(out, b, 2, min_)
        for j in range(half):
            q0 = min(15, low_byte_signed(c_int((x[b, j] - min_) * id_ + f32(0.5)))) & 0xFF
            q1 = min(15, low_byte_signed(c_int((x[b, half + j] - min_) * id_ + f32(0.5)))) & 0xFF
            out[b, 4 + j] = (q0 | (q1 << 4)) & 0xFF


# Q5_0, 22 bytes:  | d: f16 | qh: u32, bit i = 5th bit of q[i] | qs: 16 B, low 4 bits |   x[i] ~ d * (q - 16)
#   d = -(the value of largest magnitude) / 16; q = trunc(x / d + 16.5).
@kernel(parallel=True)
def quantize_q5_0(x, out):  # (n_blocks, 32) float32 -> (n_blocks, 22) uint8;  as quantize_row_q5_0_ref
    for b in prange(x.shape[0]):
        half = x.shape[1] // 2
        amax, max_ = f32(0), f32(0)
        for j in range(x.shape[1]):
            if amax < abs(x[b, j]):
                amax, max_ = abs(x[b, j]), x[b, j]
        d = max_ / f32(-16)
        id_ = f32(1) / d if d != 0 else f32(0)
        put_f16(out, b, 0, d)
        qh = 0
        for j in range(half):
            q0 = min(31, low_byte_signed(c_int(x[b, j] * id_ + f32(16.5)))) & 0xFF
            q1 = min(31, low_byte_signed(c_int(x[b, half + j] * id_ + f32(16.5)))) & 0xFF
            out[b, 6 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
            qh |= ((q0 >> 4) & 1) << j
            qh |= ((q1 >> 4) & 1) << (half + j)
        for k in range(4):
            out[b, 2 + k] = (qh >> (8 * k)) & 0xFF


# Q5_1, 24 bytes:  | d: f16 | m: f16 | qh: u32, bit i = 5th bit of q[i] | qs: 16 B, low 4 bits |   x[i] ~ d * q + m
#   m = min(x), d = (max(x) - min(x)) / 31; q = trunc((x - m) / d + 0.5), with no clamp (as ggml).
@kernel(parallel=True)
def quantize_q5_1(x, out):  # (n_blocks, 32) float32 -> (n_blocks, 24) uint8;  as quantize_row_q5_1_ref
    for b in prange(x.shape[0]):
        half = x.shape[1] // 2
        min_, max_ = FLT_MAX, -FLT_MAX
        for j in range(x.shape[1]):
            if x[b, j] < min_:
                min_ = x[b, j]
            if x[b, j] > max_:
                max_ = x[b, j]
        d = (max_ - min_) / f32(31)
        id_ = f32(1) / d if d != 0 else f32(0)
        put_f16(out, b, 0, d)
        put_f16(out, b, 2, min_)
        qh = 0
        for j in range(half):
            q0 = c_int((x[b, j] - min_) * id_ + f32(0.5)) & 0xFF
            q1 = c_int((x[b, half + j] - min_) * id_ + f32(0.5)) & 0xFF
            out[b, 8 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
            qh |= ((q0 >> 4) & 1) << j
            qh |= ((q1 >> 4) & 1) << (half + j)
        for k in range(4):
            out[b, 4 + k] = (qh >> (8 * k)) & 0xFF


# Q8_0, 34 bytes:  | d: f16 | qs: int8 x 32 |   x[i] ~ d * qs[i];  d = max|x| / 127, qs = roundf(x / d)
@kernel(parallel=True)
def quantize_q8_0(x, out):  # (n_blocks, 32) float32 -> (n_blocks, 34) uint8;  as quantize_row_q8_0_ref
    for b in prange(x.shape[0]):
        amax = f32(0)
        for j in range(x.shape[1]):
            a = abs(x[b, j])
            amax = amax if amax > a else a  # ggml's MAX(amax, a), operand order and all
        d = amax / f32(127)
        id_ = f32(1) / d if d != 0 else f32(0)
        put_f16(out, b, 0, d)
        for j in range(x.shape[1]):
            out[b, 2 + j] = c_int(c_roundf(x[b, j] * id_)) & 0xFF


# -- k-quants: 256-element super-blocks --------------------------------------------------------


# Q2_K, 84 bytes: | scales: 16 B (scale | min << 4) | qs: 64 B (2-bit) | d: f16 | dmin: f16 |
#   16 sub-blocks of 16: x ~ (d * scale) * q - (dmin * min). Each sub-block's (scale, min) comes from
#   make_qkx2_quants weighted by |x|; they are quantized to 4 bits against the largest of each, and
#   the values requantized against the 4-bit scales. qs packs values 128h + 32s + l at bits 2s of qs[32h + l].
@kernel(parallel=True)
def quantize_q2_k(x, out):  # (n_blocks, 256) float32 -> (n_blocks, 84) uint8;  as quantize_row_q2_K_ref
    for b in prange(x.shape[0]):
        xb = x[b]
        L = np.empty(256, np.uint8)  # quants, 0..3
        Laux = np.empty(16, np.uint8)
        weights = np.empty(16, np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        max_scale, max_min = f32(0), f32(0)
        for j in range(16):
            xs = xb[16 * j : 16 * j + 16]
            for l in range(16):
                weights[l] = abs(xs[l])
            scale, min_ = make_qkx2_quants(xs, weights, L[16 * j : 16 * j + 16], Laux, 3, f32(-0.5), f32(0.1), 15, True)
            scales[j], mins[j] = scale, min_
            if scale > max_scale:
                max_scale = scale
            if min_ > max_min:
                max_min = min_
        if max_scale > 0:
            iscale = f32(15) / max_scale
            for j in range(16):
                out[b, j] = nearest_int(iscale * scales[j]) & 0xFF
            d = put_f16(out, b, 80, max_scale / f32(15))
        else:
            out[b, 0:16] = 0
            d = put_f16(out, b, 80, f32(0))
        if max_min > 0:
            iscale = f32(15) / max_min
            for j in range(16):
                out[b, j] = (out[b, j] | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
            dmin = put_f16(out, b, 82, max_min / f32(15))
        else:
            dmin = put_f16(out, b, 82, f32(0))
        for j in range(16):
            dj = d * f32(out[b, j] & 0xF)
            if dj == 0:
                continue
            mj = dmin * f32(out[b, j] >> 4)
            for i in range(16):
                L[16 * j + i] = max(0, min(3, nearest_int((xb[16 * j + i] + mj) / dj)))
        for h in range(2):
            for l in range(32):
                y = 128 * h + l
                out[b, 16 + 32 * h + l] = L[y] | (L[y + 32] << 2) | (L[y + 64] << 4) | (L[y + 96] << 6)


# Q3_K, 110 bytes: | hmask: 32 B (3rd bit) | qs: 64 B (low 2 bits) | scales: 12 B (16 x 6-bit) | d: f16 |
#   16 sub-blocks of 16: x ~ (d * (scale - 32)) * (q - 4). Each sub-block's signed scale comes from
#   make_q3_quants; they are quantized to 6 bits against the one of largest magnitude (mapped to -32),
#   and the values requantized. Value j's 3rd bit is bit j // 32 of hmask[j % 32]; the low bits are packed as Q2_K.
@kernel(parallel=True)
def quantize_q3_k(x, out):  # (n_blocks, 256) float32 -> (n_blocks, 110) uint8;  as quantize_row_q3_K_ref
    for b in prange(x.shape[0]):
        xb = x[b]
        L = np.empty(256, np.int8)  # quants, 0..7
        scales = np.empty(16, np.float32)
        amax, max_scale = f32(0), f32(0)
        for j in range(16):
            scale = make_q3_quants(xb[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], 4)
            scales[j] = scale
            if abs(scale) > amax:
                amax, max_scale = abs(scale), scale
        out[b, 96:108] = 0
        if max_scale != 0:
            iscale = f32(-32) / max_scale
            for j in range(16):
                l = max(-32, min(31, low_byte_signed(nearest_int(iscale * scales[j])))) + 32  # 0..63
                if j < 8:
                    out[b, 96 + j] = l & 0xF
                else:
                    out[b, 96 + j - 8] |= (l & 0xF) << 4
                out[b, 104 + j % 4] |= (l >> 4) << (2 * (j // 4))
            d = put_f16(out, b, 108, f32(1) / iscale)
        else:
            d = put_f16(out, b, 108, f32(0))
        for j in range(16):
            dj = d * f32(q3_k_scale(out, b, j))
            if dj == 0:
                continue
            for i in range(16):
                L[16 * j + i] = max(-4, min(3, nearest_int(xb[16 * j + i] / dj))) + 4
        out[b, 0:32] = 0
        for j in range(256):
            if L[j] > 3:
                out[b, j % 32] |= 1 << (j // 32)
                L[j] -= 4
        for h in range(2):
            for l in range(32):
                y = 128 * h + l
                out[b, 32 + 32 * h + l] = L[y] | (L[y + 32] << 2) | (L[y + 64] << 4) | (L[y + 96] << 6)


@kernel
def quantize_scale_min_k4(x, out, b, nmax, rmin, rdelta, nstep, L, Laux, weights, scales, mins):
    """The first half of quantize_row_q4_K_ref and _q5_K_ref: each 32-value sub-block's (scale, min)
    from make_qkx2_quants, weighted by sqrt(mean of x**2) + |x|, quantized to 6 bits against the
    largest of each and packed as scale_min_k4 reads them; d and dmin stored. Returns (d, dmin)
    as decoded from their halves. x is one super-block (256,), L its quants."""
    max_scale, max_min = f32(0), f32(0)
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        sum_x2 = f32(0)
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / f32(32))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        scale, min_ = make_qkx2_quants(xs, weights, L[32 * j : 32 * j + 32], Laux, nmax, rmin, rdelta, nstep, False)
        scales[j], mins[j] = scale, min_
        if scale > max_scale:
            max_scale = scale
        if min_ > max_min:
            max_min = min_
    inv_scale = f32(63) / max_scale if max_scale > 0 else f32(0)
    inv_min = f32(63) / max_min if max_min > 0 else f32(0)
    # 12 bytes at 4..15: sub-blocks 0-3 keep scale and min whole in bytes 0-3 and 4-7; 4-7 put their
    # low nibbles in bytes 8-11 and their top 2 bits in the spare bits 6-7 of bytes 0-7.
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            out[b, 4 + j] = ls
            out[b, 8 + j] = lm
        else:
            out[b, 8 + j] = (ls & 0xF) | ((lm & 0xF) << 4)
            out[b, j] |= (ls >> 4) << 6
            out[b, 4 + j] |= (lm >> 4) << 6
    d = put_f16(out, b, 0, max_scale / f32(63))
    dmin = put_f16(out, b, 2, max_min / f32(63))
    return d, dmin


@kernel
def requantize_k4(x, out, b, nmax, d, dmin, L):
    """Each value against its sub-block's 6-bit scale and min: L = round((x + dmin * m) / (d * sc))."""
    for j in range(8):
        sc, m = scale_min_k4(out, b, j)
        dj = d * f32(sc)
        if dj == 0:
            continue
        mj = dmin * f32(m)
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, nearest_int((x[32 * j + i] + mj) / dj)))


# Q4_K, 144 bytes: | d: f16 | dmin: f16 | scales: 12 B (8 x 6-bit scale, 8 x 6-bit min) | qs: 128 B (4-bit) |
#   8 sub-blocks of 32: x ~ (d * scale) * q - (dmin * min). Value 64c + l is the low nibble of
#   qs[32c + l], value 64c + 32 + l its high nibble.
@kernel(parallel=True)
def quantize_q4_k(x, out):  # (n_blocks, 256) float32 -> (n_blocks, 144) uint8;  as quantize_row_q4_K_ref
    for b in prange(x.shape[0]):
        L = np.empty(256, np.uint8)  # quants, 0..15
        Laux = np.empty(32, np.uint8)
        weights = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        d, dmin = quantize_scale_min_k4(x[b], out, b, 15, f32(-1), f32(0.1), 20, L, Laux, weights, scales, mins)
        requantize_k4(x[b], out, b, 15, d, dmin, L)
        for c in range(4):
            for l in range(32):
                out[b, 16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


# Q5_K, 176 bytes: | d: f16 | dmin: f16 | scales: 12 B (as Q4_K) | qh: 32 B (bit 4) | qs: 128 B (bits 0-3) |
#   8 sub-blocks of 32: x ~ (d * scale) * q - (dmin * min). Value 64c + l: low nibble of qs[32c + l],
#   5th bit in bit 2c of qh[l]; value 64c + 32 + l: high nibble, bit 2c + 1.
@kernel(parallel=True)
def quantize_q5_k(x, out):  # (n_blocks, 256) float32 -> (n_blocks, 176) uint8;  as quantize_row_q5_K_ref
    for b in prange(x.shape[0]):
        L = np.empty(256, np.uint8)  # quants, 0..31
        Laux = np.empty(32, np.uint8)
        weights = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        d, dmin = quantize_scale_min_k4(x[b], out, b, 31, f32(-0.5), f32(0.1), 15, L, Laux, weights, scales, mins)
        requantize_k4(x[b], out, b, 31, d, dmin, L)
        out[b, 16:48] = 0
        for c in range(4):
            for l in range(32):
                q0, q1 = L[64 * c + l], L[64 * c + 32 + l]
                out[b, 16 + l] |= ((q0 >> 4) << (2 * c)) | ((q1 >> 4) << (2 * c + 1))
                out[b, 48 + 32 * c + l] = (q0 & 0xF) | ((q1 & 0xF) << 4)


# Q6_K, 210 bytes: | ql: 128 B (low 4 bits) | qh: 64 B (high 2 bits) | scales: int8 x 16 | d: f16 |
#   16 sub-blocks of 16: x ~ (d * scale) * (q - 32). Each sub-block's signed scale comes from
#   make_qx_quants; they are quantized to int8 against the one of largest magnitude (mapped to -128),
#   and the values requantized. In half h, value 32r + l (r < 4) takes nibble r // 2 of
#   ql[64h + 32(r % 2) + l] and bits 2r..2r+1 of qh[32h + l]. An all-zero super-block is all zero bytes.
@kernel(parallel=True)
def quantize_q6_k(x, out):  # (n_blocks, 256) float32 -> (n_blocks, 210) uint8;  as quantize_row_q6_K_ref
    for b in prange(x.shape[0]):
        xb = x[b]
        L = np.empty(256, np.int8)  # quants, 0..63
        scales = np.empty(16, np.float32)
        max_abs_scale, max_scale = f32(0), f32(0)
        for j in range(16):
            scale = make_qx_quants(xb[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], 32)
            scales[j] = scale
            if abs(scale) > max_abs_scale:
                max_abs_scale, max_scale = abs(scale), scale
        if max_abs_scale < GROUP_MAX_EPS:
            out[b, :] = 0
            continue
        iscale = f32(-128) / max_scale
        d = put_f16(out, b, 208, f32(1) / iscale)
        for j in range(16):
            out[b, 192 + j] = min(127, nearest_int(iscale * scales[j])) & 0xFF
        for j in range(16):
            dj = d * f32(np.int8(out[b, 192 + j]))
            if dj == 0:
                continue
            for i in range(16):
                L[16 * j + i] = max(-32, min(31, nearest_int(xb[16 * j + i] / dj))) + 32
        for h in range(2):
            for l in range(32):
                y = 128 * h + l
                out[b, 64 * h + l] = (L[y] & 0xF) | ((L[y + 64] & 0xF) << 4)
                out[b, 64 * h + 32 + l] = (L[y + 32] & 0xF) | ((L[y + 96] & 0xF) << 4)
                out[b, 128 + 32 * h + l] = (
                    (L[y] >> 4) | ((L[y + 32] >> 4) << 2) | ((L[y + 64] >> 4) << 4) | ((L[y + 96] >> 4) << 6)
                )


# F16, 2 bytes: the IEEE half nearest each value (ties to even), as ggml_fp32_to_fp16_row. llama.cpp
# falls back to it for a tensor whose rows are not whole blocks of any candidate type.
@kernel(parallel=True)
def quantize_f16(x, out):  # (n, 1) float32 -> (n, 2) uint8
    for i in prange(x.shape[0]):
        put_f16(out, i, 0, x[i, 0])


QUANTIZE_KERNELS = {
    T.F16: quantize_f16,
    T.Q4_0: quantize_q4_0,
    T.Q4_1: quantize_q4_1,
    T.Q5_0: quantize_q5_0,
    T.Q5_1: quantize_q5_1,
    T.Q8_0: quantize_q8_0,
    T.Q2_K: quantize_q2_k,
    T.Q3_K: quantize_q3_k,
    T.Q4_K: quantize_q4_k,
    T.Q5_K: quantize_q5_k,
    T.Q6_K: quantize_q6_k,
}
