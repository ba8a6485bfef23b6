"""The i-quant types: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS.

Element order and arithmetic follow ggml's dequantize_row_iq* (ggml-quants.c),
which gguf.quants reproduces: our output is bit-exact with both, and each float32
product is taken in gguf.quants' order (`db * grid * signs` is (db * grid) * signs).

Vectorising: numba runs LLVM's loop vectorizer but not its SLP vectorizer, and
LLVM fully unrolls a loop whose unrolled body stays small (say 32 iterations of a
few instructions) before the vectorizer sees it, so a loop over one group of 8
values, or over one sub-block, becomes scalar code. The hot loops here therefore run over a position inside
the sub-blocks, with the sub-blocks unrolled inside: one loop, long enough to
survive, whose lanes are contiguous.

The grid types (all but IQ4) store, per group of 8 values, an index into a fixed
grid of value patterns plus a sign pattern. A table lookup per group does not
fit such a loop, so each 256-value super-block takes two passes:
  1. decode: copy every group's grid row and sign row, one 8-byte word each, into
     scratch `codes` and `signs` (256 int8 each) and the sub-block scales into
     `scales` (16 float32);
  2. scale: scale_signed or scale_shifted writes out = scales * codes * signs (or,
     for IQ1, scales * (codes + delta)) in one vectorised loop.
"""

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from ._jit import f16_to_f32, kernel, prange

# --- lookup tables, built once from gguf.quants ---------------------------------------------


def read_only(table):
    """Tables are shared by every thread and call: freeze them."""
    table.flags.writeable = False
    return table


def _packed_rows(cls):
    """cls's grid with one little-endian word per row (uint64 for rows of 8 values, uint32
    for rows of 4), each value an int8 lane, so that a kernel copies a row with one load."""
    cls.init_grid()
    rows = np.ascontiguousarray(cls.grid.reshape(cls.grid_shape).astype(np.int8))
    return read_only(rows.view(np.uint64 if rows.shape[1] == 8 else np.uint32).reshape(-1))


IQ2_XXS_GRID = _packed_rows(quants.IQ2_XXS)  # (256,) uint64, values 8, 25, 43
IQ2_XS_GRID = _packed_rows(quants.IQ2_XS)  # (512,) uint64, values 8, 25, 43
IQ2_S_GRID = _packed_rows(quants.IQ2_S)  # (1024,) uint64, values 8, 25, 43
IQ3_XXS_GRID = _packed_rows(quants.IQ3_XXS)  # (256,) uint32, values 4 .. 62
IQ3_S_GRID = _packed_rows(quants.IQ3_S)  # (512,) uint32, values 1 .. 15
IQ1_GRID = _packed_rows(quants.IQ1_S)  # (2048,) uint64, values -1, 0, 1; IQ1_M shares it

# Sign rows, one int8 lane per value: -1 where the sign bit is set, as gguf.quants'
# np.where(bit == 0, 1, -1). BIT_SIGNS is indexed by a byte of sign bits (bit j for
# value j), KSIGNS by ggml's 7-bit sign codes (ksigns_iq2xs, the eighth bit a parity).
_BITS = (np.arange(256)[:, None] >> np.arange(8)) & 1
BIT_SIGNS = read_only(np.where(_BITS == 0, 1, -1).astype(np.int8).view(np.uint64).reshape(-1))  # (256,)
KSIGNS = read_only(BIT_SIGNS[np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8)])  # (128,) uint64

IQ4_KVALUES = read_only(np.array(quants.IQ4_NL.kvalues, dtype=np.float32))  # (16,) the 4-bit levels

IQ1_DELTA = np.float32(quants.IQ1_S.delta)  # 0.125, the shift IQ1 adds to every grid value
EVERY_LANE = np.uint64(0x0101010101010101)  # a byte times this: that byte in all eight lanes

# --- shared steps ----------------------------------------------------------------------------


@kernel
def u16_at(blocks, b, o):
    """The little-endian u16 at byte o of block b. Built from bytes: blocks rows are not
    aligned, and a .view() per block would cost a call."""
    return np.uint32(blocks[b, o]) | (np.uint32(blocks[b, o + 1]) << np.uint32(8))


@kernel
def u32_at(blocks, b, o):
    """The little-endian u32 at byte o of block b."""
    return u16_at(blocks, b, o) | (u16_at(blocks, b, o + 2) << np.uint32(16))


# Grid kernels split their blocks into up to PARTS parts, which prange hands to
# threads; each part decodes into its own row of scratch, allocated once per call.
PARTS = 64


@kernel
def part_range(part, n_parts, n):
    """The [start, stop) share of range(n) of part `part` out of n_parts."""
    return part * n // n_parts, (part + 1) * n // n_parts


@kernel
def super_block_scratch(n_parts):
    """Per part: codes and signs (n_parts, 256) int8, scales (n_parts, 16) float32."""
    shape = (n_parts, 256)
    return np.empty(shape, np.int8), np.empty(shape, np.int8), np.empty((n_parts, 16), np.float32)


@kernel
def same_sign_row(negative):
    """A sign row of eight -1 lanes if `negative`, else of eight +1 lanes, as one word."""
    return EVERY_LANE * np.uint64(0xFF if negative else 0x01)


# The scaling passes loop over the position j in a sub-block of 16 values, outside,
# and over the 16 sub-blocks, inside (unrolled). Signs are applied by multiplying by
# ±1.0, as gguf.quants does, not by flipping the sign bit: a multiply passes a NaN
# operand through (quieted) with its sign, so a NaN scale stays as gguf.quants has it.
@kernel
def scale_signed(out, b, scales, codes, signs):  # out (n, 256); scales (16,) f32; codes, signs (256,) i8
    """out[b] = scales * codes * signs, gguf.quants' `db * grid * signs`."""
    for j in range(16):
        for k in range(16):
            e = 16 * k + j
            out[b, e] = scales[k] * np.float32(codes[e]) * np.float32(signs[e])


@kernel
def scale_shifted(out, b, scales, codes, signs):  # shapes as scale_signed; signs: those of the deltas
    """out[b] = scales * (codes + ±IQ1_DELTA), gguf.quants' `dl * (grid + delta)`."""
    for j in range(16):
        for k in range(16):
            e = 16 * k + j
            # IQ1_DELTA * ±1.0 is exactly gguf's ±delta, so the sum is the same float32.
            out[b, e] = scales[k] * (np.float32(codes[e]) + IQ1_DELTA * np.float32(signs[e]))


@kernel
def put_nibbles(out, b, at, n, scale, q, table):  # table (16,) float32
    """Byte q's low nibble gives out[b, at], its high nibble out[b, at + n]:
    x = scale * table[nibble], ggml's low-nibbles-first order."""
    out[b, at] = scale * table[q & 15]
    out[b, at + n] = scale * table[q >> 4]


# --- the grid types --------------------------------------------------------------------------
# Phase 1 writes a group g of 8 values to code_rows[part, g] and sign_rows[part, g]
# (IQ3: two grid rows of 4, code_quads[part, 2g] and [part, 2g + 1]).


# IQ2_XXS, 66 bytes: | d: f16 | 8 x ( grid indices: u8 x 4 | aux: u32 ) |
#   per 32 values, aux = 4-bit scale s << 28 | 4 x 7-bit sign codes
#   x = d * (0.5 + s) * 0.25 * IQ2_XXS_GRID[index] * KSIGNS[code]
#   as ggml-quants.c dequantize_row_iq2_xxs
@kernel(parallel=True)
def dequantize_iq2_xxs(blocks, out, grid, ksigns):  # (n, 66) uint8 -> (n, 256) float32
    n_blocks = blocks.shape[0]
    n_parts = min(n_blocks, PARTS)
    codes, signs, scales = super_block_scratch(n_parts)
    code_rows, sign_rows = codes.view(np.uint64), signs.view(np.uint64)  # (n_parts, 32)
    for part in prange(n_parts):
        start, stop = part_range(part, n_parts, n_blocks)
        for b in range(start, stop):
            d = f16_to_f32(blocks[b, 0], blocks[b, 1])
            for ib in range(8):
                aux = u32_at(blocks, b, 2 + 8 * ib + 4)
                db = d * (np.float32(0.5) + np.float32(aux >> 28)) * np.float32(0.25)
                scales[part, 2 * ib] = scales[part, 2 * ib + 1] = db
                for g in range(4 * ib, 4 * ib + 4):
                    code_rows[part, g] = grid[blocks[b, 2 + 8 * ib + g % 4]]
                    sign_rows[part, g] = ksigns[(aux >> (7 * (g % 4))) & 127]
            scale_signed(out, b, scales[part], codes[part], signs[part])


# IQ2_XS, 74 bytes: | d: f16 | qs: u16 x 32 | scales: 4-bit x 16 |
#   per 8 values, qs = 7-bit sign code << 9 | 9-bit grid index; per 16 values, a scale s
#   x = d * (0.5 + s) * 0.25 * IQ2_XS_GRID[index] * KSIGNS[code]
#   as ggml-quants.c dequantize_row_iq2_xs
@kernel(parallel=True)
def dequantize_iq2_xs(blocks, out, grid, ksigns):  # (n, 74) uint8 -> (n, 256) float32
    n_blocks = blocks.shape[0]
    n_parts = min(n_blocks, PARTS)
    codes, signs, scales = super_block_scratch(n_parts)
    code_rows, sign_rows = codes.view(np.uint64), signs.view(np.uint64)  # (n_parts, 32)
    for part in prange(n_parts):
        start, stop = part_range(part, n_parts, n_blocks)
        for b in range(start, stop):
            d = f16_to_f32(blocks[b, 0], blocks[b, 1])
            for k in range(16):
                s = (blocks[b, 66 + k // 2] >> (4 * (k % 2))) & 15
                scales[part, k] = d * (np.float32(0.5) + np.float32(s)) * np.float32(0.25)
            for g in range(32):
                q = u16_at(blocks, b, 2 + 2 * g)
                code_rows[part, g] = grid[q & 511]
                sign_rows[part, g] = ksigns[q >> 9]
            scale_signed(out, b, scales[part], codes[part], signs[part])


# IQ2_S, 82 bytes: | d: f16 | qs: 32 B | signs: 32 B | qh: 2-bit x 32 | scales: 4-bit x 16 |
#   per 8 values, grid index = qh << 8 | qs and a byte of sign bits; per 16 values, a scale s
#   x = d * (0.5 + s) * 0.25 * IQ2_S_GRID[index] * BIT_SIGNS[sign byte]
#   as ggml-quants.c dequantize_row_iq2_s
@kernel(parallel=True)
def dequantize_iq2_s(blocks, out, grid, bit_signs):  # (n, 82) uint8 -> (n, 256) float32
    n_blocks = blocks.shape[0]
    n_parts = min(n_blocks, PARTS)
    codes, signs, scales = super_block_scratch(n_parts)
    code_rows, sign_rows = codes.view(np.uint64), signs.view(np.uint64)  # (n_parts, 32)
    for part in prange(n_parts):
        start, stop = part_range(part, n_parts, n_blocks)
        for b in range(start, stop):
            d = f16_to_f32(blocks[b, 0], blocks[b, 1])
            for k in range(16):
                s = (blocks[b, 74 + k // 2] >> (4 * (k % 2))) & 15
                scales[part, k] = d * (np.float32(0.5) + np.float32(s)) * np.float32(0.25)
            for g in range(32):
                high = (blocks[b, 66 + g // 4] >> (2 * (g % 4))) & 3
                code_rows[part, g] = grid[blocks[b, 2 + g] | (high << 8)]
                sign_rows[part, g] = bit_signs[blocks[b, 34 + g]]
            scale_signed(out, b, scales[part], codes[part], signs[part])


# IQ3_XXS, 98 bytes: | d: f16 | qs: grid indices u8 x 64 | aux: u32 x 8 |
#   per 4 values, a grid index; per 32 values, aux = 4-bit scale s << 28 | 4 x 7-bit sign codes
#   x = d * (0.5 + s) * 0.5 * IQ3_XXS_GRID[index] * KSIGNS[code]
#   as ggml-quants.c dequantize_row_iq3_xxs
@kernel(parallel=True)
def dequantize_iq3_xxs(blocks, out, grid, ksigns):  # (n, 98) uint8 -> (n, 256) float32
    n_blocks = blocks.shape[0]
    n_parts = min(n_blocks, PARTS)
    codes, signs, scales = super_block_scratch(n_parts)
    code_quads, sign_rows = codes.view(np.uint32), signs.view(np.uint64)  # (n_parts, 64), (n_parts, 32)
    for part in prange(n_parts):
        start, stop = part_range(part, n_parts, n_blocks)
        for b in range(start, stop):
            d = f16_to_f32(blocks[b, 0], blocks[b, 1])
            for i in range(64):
                code_quads[part, i] = grid[blocks[b, 2 + i]]
            for ib in range(8):
                aux = u32_at(blocks, b, 66 + 4 * ib)
                db = d * (np.float32(0.5) + np.float32(aux >> 28)) * np.float32(0.5)
                scales[part, 2 * ib] = scales[part, 2 * ib + 1] = db
                for g in range(4 * ib, 4 * ib + 4):
                    sign_rows[part, g] = ksigns[(aux >> (7 * (g % 4))) & 127]
            scale_signed(out, b, scales[part], codes[part], signs[part])


# IQ3_S, 110 bytes: | d: f16 | qs: 64 B | qh: 1-bit x 64 | signs: 32 B | scales: 4-bit x 8 |
#   per 4 values, grid index = qh << 8 | qs; per 8, a byte of sign bits; per 32, a scale s
#   x = d * (1 + 2 * s) * IQ3_S_GRID[index] * BIT_SIGNS[sign byte]
#   as ggml-quants.c dequantize_row_iq3_s
@kernel(parallel=True)
def dequantize_iq3_s(blocks, out, grid, bit_signs):  # (n, 110) uint8 -> (n, 256) float32
    n_blocks = blocks.shape[0]
    n_parts = min(n_blocks, PARTS)
    codes, signs, scales = super_block_scratch(n_parts)
    code_quads, sign_rows = codes.view(np.uint32), signs.view(np.uint64)  # (n_parts, 64), (n_parts, 32)
    for part in prange(n_parts):
        start, stop = part_range(part, n_parts, n_blocks)
        for b in range(start, stop):
            d = f16_to_f32(blocks[b, 0], blocks[b, 1])
            for ib in range(8):
                s = (blocks[b, 106 + ib // 2] >> (4 * (ib % 2))) & 15
                scales[part, 2 * ib] = scales[part, 2 * ib + 1] = d * np.float32(1 + 2 * s)
            for i in range(64):
                high = (blocks[b, 66 + i // 8] >> (i % 8)) & 1
                code_quads[part, i] = grid[blocks[b, 2 + i] | (high << 8)]
            for g in range(32):
                sign_rows[part, g] = bit_signs[blocks[b, 74 + g]]
            scale_signed(out, b, scales[part], codes[part], signs[part])


# IQ1_S, 50 bytes: | d: f16 | qs: 32 B | qh: u16 x 8 |
#   per 32 values, qh = delta sign << 15 | 3-bit scale s << 12 | 4 x 3 high index bits;
#   per 8 values, grid index = high bits << 8 | qs;  delta = -0.125 if its sign bit is set, else 0.125
#   x = d * (2 * s + 1) * (IQ1_GRID[index] + delta)
#   as ggml-quants.c dequantize_row_iq1_s
@kernel(parallel=True)
def dequantize_iq1_s(blocks, out, grid):  # (n, 50) uint8 -> (n, 256) float32
    n_blocks = blocks.shape[0]
    n_parts = min(n_blocks, PARTS)
    codes, signs, scales = super_block_scratch(n_parts)
    code_rows, sign_rows = codes.view(np.uint64), signs.view(np.uint64)  # (n_parts, 32)
    for part in prange(n_parts):
        start, stop = part_range(part, n_parts, n_blocks)
        for b in range(start, stop):
            d = f16_to_f32(blocks[b, 0], blocks[b, 1])
            for ib in range(8):
                qh = u16_at(blocks, b, 34 + 2 * ib)
                scales[part, 2 * ib] = scales[part, 2 * ib + 1] = d * np.float32(2 * ((qh >> 12) & 7) + 1)
                delta_signs = same_sign_row(qh & 0x8000)
                for g in range(4 * ib, 4 * ib + 4):
                    high = (qh >> (3 * (g % 4))) & 7
                    code_rows[part, g] = grid[blocks[b, 2 + g] | (high << 8)]
                    sign_rows[part, g] = delta_signs
            scale_shifted(out, b, scales[part], codes[part], signs[part])


# IQ1_M, 56 bytes: | qs: 32 B | qh: 4-bit x 32 | scales: u16 x 4 |
#   per 8 values, qh = delta sign << 3 | 3 high index bits, grid index = high bits << 8 | qs;
#   per 16 values, a 3-bit scale s in the low 12 bits of a scales u16; the four top
#   nibbles of the scales, lowest u16 first, are the f16 d
#   x = d * (2 * s + 1) * (IQ1_GRID[index] + delta),  delta = ±0.125 as for IQ1_S
#   as ggml-quants.c dequantize_row_iq1_m
@kernel(parallel=True)
def dequantize_iq1_m(blocks, out, grid):  # (n, 56) uint8 -> (n, 256) float32
    n_blocks = blocks.shape[0]
    n_parts = min(n_blocks, PARTS)
    codes, signs, scales = super_block_scratch(n_parts)
    code_rows, sign_rows = codes.view(np.uint64), signs.view(np.uint64)  # (n_parts, 32)
    for part in prange(n_parts):
        start, stop = part_range(part, n_parts, n_blocks)
        for b in range(start, stop):
            d_bits = (
                (u16_at(blocks, b, 48) >> 12)
                | ((u16_at(blocks, b, 50) >> 8) & 0x00F0)
                | ((u16_at(blocks, b, 52) >> 4) & 0x0F00)
                | (u16_at(blocks, b, 54) & 0xF000)
            )
            d = f16_to_f32(d_bits & 0xFF, d_bits >> 8)
            for k in range(16):
                s = (u16_at(blocks, b, 48 + 2 * (k // 4)) >> (3 * (k % 4))) & 7
                scales[part, k] = d * np.float32(2 * s + 1)
            for g in range(32):
                qh = blocks[b, 32 + g // 2] >> (4 * (g % 2))
                code_rows[part, g] = grid[blocks[b, g] | ((qh & 7) << 8)]
                sign_rows[part, g] = same_sign_row(qh & 8)
            scale_shifted(out, b, scales[part], codes[part], signs[part])


# --- the non-linear 4-bit types --------------------------------------------------------------


# IQ4_NL, 18 bytes: | d: f16 | qs: 16 B |
#   x[j] = d * IQ4_KVALUES[qs[j] & 15],  x[16 + j] = d * IQ4_KVALUES[qs[j] >> 4]
#   as ggml-quants.c dequantize_row_iq4_nl
@kernel(parallel=True)
def dequantize_iq4_nl(blocks, out, kvalues):  # (n, 18) uint8 -> (n, 32) float32
    for b in prange(blocks.shape[0]):
        d = f16_to_f32(blocks[b, 0], blocks[b, 1])
        for j in range(16):
            put_nibbles(out, b, j, 16, d, blocks[b, 2 + j], kvalues)


@kernel
def iq4_xs_scale(blocks, b, ib):
    """Sub-block ib's scale: scales_h bits 2ib, 2ib + 1 over scales_l nibble ib, minus 32."""
    low = (blocks[b, 4 + ib // 2] >> (4 * (ib % 2))) & 15
    high = (u16_at(blocks, b, 2) >> (2 * ib)) & 3
    return (low | (high << 4)) - 32


# IQ4_XS, 136 bytes: | d: f16 | scales_h: u16 | scales_l: 4 B | qs: 128 B |
#   8 sub-blocks of 32 values, each with a 6-bit scale (iq4_xs_scale) and 16 bytes of qs
#   x[32ib + j] = d * scale * IQ4_KVALUES[qs[16ib + j] & 15],  x[32ib + 16 + j] = ... [qs[16ib + j] >> 4]
#   as ggml-quants.c dequantize_row_iq4_xs
@kernel(parallel=True)
def dequantize_iq4_xs(blocks, out, kvalues):  # (n, 136) uint8 -> (n, 256) float32
    for b in prange(blocks.shape[0]):
        d = f16_to_f32(blocks[b, 0], blocks[b, 1])
        for j in range(16):  # byte j of every sub-block: a loop long enough to be vectorised
            for ib in range(8):
                dl = d * np.float32(iq4_xs_scale(blocks, b, ib))  # the same for every j; LLVM hoists it
                put_nibbles(out, b, 32 * ib + j, 16, dl, blocks[b, 8 + 16 * ib + j], kvalues)


DEQUANTIZE_KERNELS = {
    T.IQ1_S: dequantize_iq1_s,
    T.IQ1_M: dequantize_iq1_m,
    T.IQ2_XXS: dequantize_iq2_xxs,
    T.IQ2_XS: dequantize_iq2_xs,
    T.IQ2_S: dequantize_iq2_s,
    T.IQ3_XXS: dequantize_iq3_xxs,
    T.IQ3_S: dequantize_iq3_s,
    T.IQ4_NL: dequantize_iq4_nl,
    T.IQ4_XS: dequantize_iq4_xs,
}

KERNEL_TABLES = {
    T.IQ1_S: (IQ1_GRID,),
    T.IQ1_M: (IQ1_GRID,),
    T.IQ2_XXS: (IQ2_XXS_GRID, KSIGNS),
    T.IQ2_XS: (IQ2_XS_GRID, KSIGNS),
    T.IQ2_S: (IQ2_S_GRID, BIT_SIGNS),
    T.IQ3_XXS: (IQ3_XXS_GRID, KSIGNS),
    T.IQ3_S: (IQ3_S_GRID, BIT_SIGNS),
    T.IQ4_NL: (IQ4_KVALUES,),
    T.IQ4_XS: (IQ4_KVALUES,),
}
