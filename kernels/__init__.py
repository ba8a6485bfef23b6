"""Numba kernels that work straight on GGUF quant blocks (installed as refengine.kernels).

Layout of this package:
  _jit.py     the numba decorator with its flags, and scalar bit tricks (f16/bf16 -> f32)
  quant_types.py  one record per ggml type: block size, type size, the named byte fields of a block,
              and its kernels (dequantize, matvec per numerics, quantize): QUANT_TYPES
  floats.py   F32, F16, BF16
  legacy.py   Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
  kquants.py  Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
  iquants.py  IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS
  ternary.py  TQ1_0, TQ2_0
  fp4.py      MXFP4, NVFP4
  quantize.py float32 -> Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K and F16: ports of ggml's
              reference quantizers (quantize_row_*_ref), byte-identical to them
  gemv.py     fused y = W @ x straight from the quant blocks, for decoding one token
              (F32, F16, BF16, the legacy types and the k-quants); `matvec` below wraps it.
  attention.py  one query token's attention over a layer's KV cache, fused (`attend_one_token`).
  simd.py     32-byte integer vectors for numba: the CPU's byte dot product (vpdpbusd, or
              vpmaddubsw + vpmaddwd), chosen at import for the CPU numba compiles for
  activations.py  float32 -> Q8_0, Q8_1, Q8_K as ggml-cpu quantizes activations, bit for bit
  gemv_ggml.py  y = W @ x in llama.cpp's CPU arithmetic (numerics="ggml"): x quantized, integer
              dot products as ggml_vec_dot_*; same signature as gemv.py's kernels, and a batch
              version (`bound_matmul`) that reads each row once for all the tokens.
  kquants_ggml.py  the same for Q4_K, Q5_K, Q6_K, in the float order of each of ggml's paths
              (vec_dot, tiled batches, repacked Q4_K)
  float_ggml.py  F32 and F16 weights, and attention's products, in ggml's float orders
  moe_ggml.py   a batch through every routed expert of a MoE layer at once, as ggml's mul_mat_id
  ops_ggml.py   rms_norm, rope, softmax, silu, gelu as ggml-cpu computes them, bit for bit
  attention_ggml.py  attention over an F16 KV cache as llama.cpp without flash attention

Every dequantize kernel has the same signature,
    kernel(blocks, out, *tables)
where `blocks` is a C-contiguous uint8 array (n_blocks, type_size), `out` a
C-contiguous float32 array (n_blocks, block_size), and `tables` the read-only
lookup tables that type needs (IQ grids), passed in rather than baked into the
compiled code. Every matvec kernel has the signature
    kernel(rows, x, out)
with `rows` the weight's raw C-contiguous (n_out, row_bytes) uint8 rows, `x` a
C-contiguous (n_in,) float32 vector and `out` a C-contiguous (n_out,) float32
vector. Every quantize kernel has the dequantizer's signature reversed,
    kernel(x, out)
with `x` C-contiguous float32 (n_blocks, block_size) and `out` C-contiguous
uint8 (n_blocks, type_size). The Python wrappers here validate; the kernels just loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numba
import numpy as np
from gguf import GGMLQuantizationType

from refengine.errors import RefengineError

from . import attention, floats, fp4, iquants, kquants, legacy, quant_types, ternary
from .gemv import MATVEC_KERNELS
from .gemv_ggml import ACTIVATION_KERNELS, VEC_DOT_TYPES, batch_activations_q8_k, pair_sums
from .gemv_ggml import GGML_MATMUL_ID_KERNELS as _LEGACY_MATMUL_ID
from .gemv_ggml import GGML_MATMUL_KERNELS as _LEGACY_MATMUL
from .gemv_ggml import GGML_MATVEC_KERNELS as _LEGACY_MATVEC
from .gemv_ggml import GGML_MATVEC_SLICES_KERNELS as _LEGACY_SLICES
from .kquants_ggml import (
    KQUANT_MATMUL_ID_KERNELS,
    KQUANT_MATMUL_KERNELS,
    KQUANT_MATVEC_KERNELS,
    KQUANT_MATVEC_SLICES_KERNELS,
    KQUANT_UNREPACKED_KERNELS,
)
from .moe_ggml import EXPERT_KERNELS, expert_jobs
from .quant_types import QuantType
from .quantize import QUANTIZE_KERNELS

# ggml numerics: ggml type -> kernel(rows, x (n_in,), out (n_out,)), and -> kernel(rows, x (n_tok, n_in), out).
GGML_MATVEC_KERNELS = {**_LEGACY_MATVEC, **KQUANT_MATVEC_KERNELS}
GGML_MATMUL_KERNELS = {**_LEGACY_MATMUL, **KQUANT_MATMUL_KERNELS}
# one token through several slices of a 3-D tensor in one call: f(rows, n_out, slices, x, out)
GGML_MATVEC_SLICES_KERNELS = {**_LEGACY_SLICES, **KQUANT_MATVEC_SLICES_KERNELS}
# an expert's batch (MUL_MAT_ID), whose path differs for repacked Q4_K and F32
GGML_MATMUL_ID_KERNELS = {**GGML_MATMUL_KERNELS, **_LEGACY_MATMUL_ID, **KQUANT_MATMUL_ID_KERNELS}

_FAMILIES = (floats, legacy, kquants, iquants, ternary, fp4)
# Every ggml type's record: its blocks' layout and its kernels. The matvec numerics:
#   exact  weights decoded exactly, x kept in float32, products summed in float32 (gemv.py)
#   ggml   llama.cpp's CPU arithmetic: x quantized to the type's vec_dot_type, integer dot products (gemv_ggml.py)
QUANT_TYPES = quant_types.build(
    dequantize={t: fn for family in _FAMILIES for t, fn in family.DEQUANTIZE_KERNELS.items()},
    tables={t: tables for family in _FAMILIES for t, tables in getattr(family, "KERNEL_TABLES", {}).items()},
    matvec={"exact": MATVEC_KERNELS, "ggml": GGML_MATVEC_KERNELS},
    quantize=QUANTIZE_KERNELS,
)
NUMERICS = ("exact", "ggml")
# The types each direction has a kernel for.
DEQUANTIZERS = {t: q for t, q in QUANT_TYPES.items() if q.dequantize is not None}
QUANTIZERS = {t: q for t, q in QUANT_TYPES.items() if q.quantize is not None}


class KernelError(RefengineError, ValueError):
    """A kernel was called with arrays of the wrong type, shape or layout."""


def quant_type(ggml_type, direction: str) -> QuantType:
    """The record of `ggml_type`, which must have a kernel for `direction` ("dequantization", "quantization")."""
    try:
        q = QUANT_TYPES[GGMLQuantizationType(ggml_type)]
    except (KeyError, ValueError):
        q = None
    kernel = None if q is None else q.dequantize if direction == "dequantization" else q.quantize
    if kernel is None:
        name = getattr(ggml_type, "name", str(ggml_type))
        raise KernelError(f"no {direction} kernel for ggml type {name}")
    return q


def dequantizer(ggml_type: GGMLQuantizationType | int) -> QuantType:
    return quant_type(ggml_type, "dequantization")


def _out_buffer(out: np.ndarray | None, shape: tuple[int, ...], dtype) -> np.ndarray:
    """`out` checked to be a C-contiguous `dtype` array of `shape`, or a new one when it is None."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.dtype != dtype or out.shape != shape or not out.flags.c_contiguous:
        raise KernelError(f"out must be C-contiguous {np.dtype(dtype)} of shape {shape}, got {out.dtype} {out.shape}")
    return out


def dequantize_rows(ggml_type, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize raw rows (n_rows, row_bytes) uint8 into float32 (n_rows, n_cols).

    `out` may be any C-contiguous float32 buffer of the right shape, typically a
    tile that a matmul reuses; rows may be a read-only view of a memory map.
    """
    dq = dequantizer(ggml_type)
    if rows.dtype != np.uint8 or rows.ndim != 2:
        raise KernelError(f"rows must be a 2-D uint8 array, got {rows.dtype} with shape {rows.shape}")
    n_rows, row_bytes = rows.shape
    if row_bytes % dq.type_size:
        raise KernelError(f"{dq.ggml_type.name} row of {row_bytes} bytes is not whole blocks of {dq.type_size}")
    n_cols = row_bytes // dq.type_size * dq.block_size
    out = _out_buffer(out, (n_rows, n_cols), np.float32)
    if n_rows == 0 or n_cols == 0:
        return out
    if not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows)
    blocks = rows.reshape(-1, dq.type_size)
    dq.dequantize(blocks, out.reshape(-1, dq.block_size), *dq.tables)
    return out


def dequantize(ggml_type, data: np.ndarray, n_cols: int) -> np.ndarray:
    """Dequantize a whole raw tensor whose rows have `n_cols` elements; returns (n_rows, n_cols)."""
    dq = dequantizer(ggml_type)
    if n_cols % dq.block_size:
        raise KernelError(f"{dq.ggml_type.name} rows of {n_cols} are not whole blocks of {dq.block_size}")
    row_bytes = n_cols // dq.block_size * dq.type_size
    flat = data.reshape(-1)
    if flat.size % row_bytes:
        raise KernelError(f"{flat.size} bytes are not whole {dq.ggml_type.name} rows of {row_bytes} bytes")
    return dequantize_rows(ggml_type, flat.reshape(-1, row_bytes))


def quantize_rows(ggml_type, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 rows (n_rows, n_cols) to raw rows (n_rows, row_bytes) uint8, written into `out` if given.

    Byte-identical to ggml_quantize_chunk without an importance matrix (which is
    what llama_model_quantize writes); n_cols must be whole blocks of the type.
    """
    q = quant_type(ggml_type, "quantization")
    if x.dtype != np.float32 or x.ndim != 2:
        raise KernelError(f"x must be a 2-D float32 array, got {x.dtype} with shape {x.shape}")
    n_rows, n_cols = x.shape
    if n_cols % q.block_size:
        raise KernelError(f"{q.ggml_type.name} rows of {n_cols} values are not whole blocks of {q.block_size}")
    row_bytes = n_cols // q.block_size * q.type_size
    out = _out_buffer(out, (n_rows, row_bytes), np.uint8)
    if n_rows and n_cols:
        x = np.ascontiguousarray(x)
        q.quantize(x.reshape(-1, q.block_size), out.reshape(-1, q.type_size))
    return out


_UINT8, _FLOAT32, _FLOAT64 = np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64)


def matvec(
    ggml_type, rows: np.ndarray, x: np.ndarray, out: np.ndarray | None = None, numerics: str = "exact"
) -> np.ndarray:
    """y = W @ x for a weight W (n_out, n_in) of `ggml_type`, given as its raw rows (n_out, row_bytes) uint8.

    x is a C-contiguous (n_in,) float32 vector; the result goes into `out`, a
    C-contiguous (n_out,) float32 vector, allocated if not given, and is returned.
    rows may be a read-only view of a memory map. numerics="exact": weights are
    decoded exactly and products summed in float32, in an order of our choosing
    (see gemv.py). numerics="ggml": x is quantized and the dot products run on
    integers, as llama.cpp's CPU backend computes them (see gemv_ggml.py).

    Decoding calls this hundreds of times per token, often on small matrices,
    so the checks are the few that keep the kernel from reading out of bounds
    or compiling a new specialisation, each a field compare.
    """
    kernel, n_in = _matvec_kernel(ggml_type, rows, numerics)
    n_out, row_bytes = rows.shape
    if x.dtype != _FLOAT32 or x.shape != (n_in,) or not x.flags.c_contiguous:
        raise KernelError(
            f"{_type_name(ggml_type)} rows of {row_bytes} bytes need x of shape ({n_in},) float32; "
            f"got x {x.dtype} {x.shape}"
        )
    out = _out_buffer(out, (n_out,), _FLOAT32)
    if n_out and n_in:
        kernel(rows, x, out)
    else:
        out[:] = 0
    return out


def bound_matvec(
    ggml_type, rows: np.ndarray, numerics: str = "exact", repacked: bool = True
) -> Callable[[np.ndarray, np.ndarray], None]:
    """`matvec` for one weight, its rows checked once: call it as f(x, out).

    Decoding calls the same few hundred weights every token, so the rows' checks move here and
    the caller keeps only its promise: x a C-contiguous (n_in,) float32 vector and out a
    (n_out,) float32 one. nn.Linear makes that promise after checking x's width. repacked=False (ggml
    numerics): a tensor llama.cpp does not repack although its type would be (see kquants_ggml.py), as a
    3-D weight that mul_mat broadcasts.
    """
    kernel, _ = _matvec_kernel(ggml_type, rows, numerics)
    if numerics == "ggml" and not repacked and ggml_type in KQUANT_UNREPACKED_KERNELS:
        kernel = KQUANT_UNREPACKED_KERNELS[ggml_type][0]
    return functools.partial(kernel, rows)


def _matvec_kernel(ggml_type, rows: np.ndarray, numerics: str = "exact") -> tuple[Callable, int]:
    """The matvec kernel of `ggml_type` in `numerics`, and n_in, once `rows` is checked to be whole blocks of it."""
    if numerics not in NUMERICS:
        raise KernelError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    q = QUANT_TYPES.get(ggml_type)
    kernel = None if q is None else q.matvec.get(numerics)
    if kernel is None:
        name = getattr(ggml_type, "name", str(ggml_type))
        kind = "matvec" if numerics == "exact" else f"{numerics} matvec"
        raise KernelError(f"no {kind} kernel for ggml type {name}")
    block_size, type_size = q.block_size, q.type_size
    if rows.dtype != _UINT8 or rows.ndim != 2 or not rows.flags.c_contiguous:
        raise KernelError(f"rows must be C-contiguous 2-D uint8, got {rows.dtype} with shape {rows.shape}")
    if rows.shape[1] % type_size:
        raise KernelError(f"{_type_name(ggml_type)} rows of {rows.shape[1]} bytes are not whole blocks of {type_size}")
    return kernel, rows.shape[1] // type_size * block_size


def bound_matmul(
    ggml_type, rows: np.ndarray, expert: bool = False, repacked: bool = True
) -> Callable[[np.ndarray, np.ndarray], None]:
    """Y = X @ W.T in numerics="ggml" for one weight and a batch of tokens: call it as f(x, out), x a
    C-contiguous (n_tok, n_in) float32 array and out (n_tok, n_out) float32, each token's activations
    quantized as for `matvec` and every row read once for all the tokens (gemv_ggml.py). What ggml's
    mul_mat computes for a batch, in the same integers and float orders; expert=True: as mul_mat_id
    computes one expert's tokens; repacked=False as for bound_matvec. The exact numerics' batches are BLAS
    on dequantized tiles (nn.Linear)."""
    kernels = GGML_MATMUL_ID_KERNELS if expert else GGML_MATMUL_KERNELS
    if ggml_type not in kernels:
        raise KernelError(f"no ggml matmul kernel for ggml type {_type_name(ggml_type)}")
    _matvec_kernel(ggml_type, rows, "ggml")  # the same checks of the rows
    kernel = kernels[ggml_type]
    if not (repacked or expert) and ggml_type in KQUANT_UNREPACKED_KERNELS:
        kernel = KQUANT_UNREPACKED_KERNELS[ggml_type][1]
    return functools.partial(kernel, rows)


def bound_matvec_slices(
    ggml_type, rows: np.ndarray, n_out: int, repacked: bool = True
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """One token through several slices of a 3-D tensor in ggml numerics, as f(slices, x, out): slices (k,) int64
    indices of n_out-row slices of `rows` (experts of an ffn_*_exps tensor, heads of a 3-D attention weight),
    x (k, n_in) float32 (one row per slice) or (1, n_in) (the same for all), out (k, n_out) float32. Each
    output equals bound_matvec's for its slice and row, to the bit. None for a type without such a kernel."""
    kernel = GGML_MATVEC_SLICES_KERNELS.get(ggml_type)
    if kernel is None or rows.shape[0] % n_out:
        return None
    if not repacked and ggml_type in KQUANT_UNREPACKED_KERNELS:
        kernel = KQUANT_UNREPACKED_KERNELS[ggml_type][2]
    _matvec_kernel(ggml_type, rows, "ggml")  # the rows' checks
    return functools.partial(kernel, rows, n_out)


def bound_expert_matmul(
    ggml_type, rows: np.ndarray, n_out: int, up_rows: np.ndarray | None = None
) -> Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None] | None:
    """A batch through every chosen expert of a 3-D expert tensor of `ggml_type` in one call, as ggml's mul_mat_id
    computes it (moe_ggml.py): f(experts, starts, src, x, out). rows (n_expert * n_out, row_bytes) uint8, expert e
    its rows e * n_out .. (e + 1) * n_out - 1. experts (n_groups,) and starts (n_groups + 1,) int64: the entries
    starts[g] .. starts[g + 1] - 1 go through expert experts[g]; src (n_entries,) int64: the row of x, (n_src, n_in)
    float32, each entry reads; out (n_entries, n_out) float32. Each output is what bound_matmul(..., expert=True) on
    its expert's rows and tokens gives it, to the bit. up_rows: an ffn_up_exps tensor of the same type and shape
    as rows (ffn_gate_exps), and out = silu(gate) * up as ggml_swiglu_split computes it. None for a type without
    such a kernel."""
    if ggml_type not in EXPERT_KERNELS or rows.shape[0] % n_out:
        return None
    _, n_in = _matvec_kernel(ggml_type, rows, "ggml")  # the rows' checks
    if up_rows is not None and up_rows.shape != rows.shape:
        raise KernelError(f"expert batch: up rows {up_rows.shape} are not shaped as the gate's, {rows.shape}")
    kernel, paired_sums = EXPERT_KERNELS[ggml_type]
    glu = up_rows is not None

    def run(experts, starts, src, x, out) -> None:
        if x.dtype != _FLOAT32 or x.ndim != 2 or x.shape[1] != n_in or not x.flags.c_contiguous:
            raise KernelError(f"expert batch: x must be C-contiguous float32 (n_src, {n_in}), got {x.dtype} {x.shape}")
        n_entries = starts[-1]
        if out.shape != (n_entries, n_out) or out.dtype != _FLOAT32 or not out.flags.c_contiguous:
            raise KernelError(f"expert batch: out must be C-contiguous float32 ({n_entries}, {n_out}), got {out.shape}")
        a, scales, sums = batch_activations_q8_k(x)
        up_out = np.empty_like(out) if glu else out
        kernel(rows, up_rows if glu else rows, n_out, glu, expert_jobs(starts, n_out), experts, starts, src, a, scales,
               pair_sums(sums) if paired_sums else sums, out, up_out)  # fmt: skip

    return run


def _type_name(ggml_type) -> str:
    return GGMLQuantizationType(ggml_type).name


def quantize_activations(ggml_type, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n,) float32 quantized as ggml-cpu quantizes a matvec's activations for weights of `ggml_type`
    (to its vec_dot_type: Q8_0, Q8_1 or Q8_K; activations.py): (blocks, scales, sums), `blocks` the raw
    ggml blocks (n_blocks, block bytes) uint8, bit for bit what ggml's quantize_row_q8_* writes."""
    vec_dot_type = VEC_DOT_TYPES.get(GGMLQuantizationType(ggml_type))
    if vec_dot_type not in ACTIVATION_KERNELS:
        raise KernelError(f"ggml type {_type_name(ggml_type)} takes float activations, not quantized ones")
    block_size = 256 if vec_dot_type == GGMLQuantizationType.Q8_K else 32
    if x.dtype != _FLOAT32 or x.ndim != 1 or x.size % block_size:
        raise KernelError(f"x must be float32 (n,) with n a multiple of {block_size}, got {x.dtype} {x.shape}")
    blocks, scales, sums = ACTIVATION_KERNELS[vec_dot_type](np.ascontiguousarray(x).reshape(1, -1))
    return blocks[0], scales[0], sums[0]


# Keys per thread's range below which attend_one_token does not split the keys further.
MIN_KEYS_PER_RANGE = 256


def attend_one_token(q, k, v, first: int, n_keys: int, scale: float, out: np.ndarray) -> np.ndarray:
    """One query token's attention over positions first .. first + n_keys - 1 of a layer's cache.

    q (n_kv_head, group, dk) and out (n_kv_head, group, dv) C-contiguous, k (n_kv_head, n_slots, dk)
    and v (n_kv_head, n_slots, dv) with the last axis contiguous (v may be a view of k's first dv
    columns), all float32 or all float64; position p is in slot p % n_slots (see attention.py).
    The keys are split into ranges so that every thread has work even with one KV head.
    """
    n_kv_head, group, dk = q.shape
    if not (k.shape[0] == v.shape[0] == out.shape[0] == n_kv_head and k.shape[1] == v.shape[1]):
        raise KernelError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}, out {out.shape} do not match")
    if k.shape[2] != dk or out.shape[1:] != (group, v.shape[2]) or not 0 < n_keys <= k.shape[1]:
        raise KernelError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}, out {out.shape}, {n_keys} keys")
    if not (q.dtype == k.dtype == v.dtype == out.dtype) or q.dtype not in (_FLOAT32, _FLOAT64):
        raise KernelError(f"attention: q, k, v, out must all be float32 or all float64, got {q.dtype}, {k.dtype}")
    threads = numba.get_num_threads()
    # Enough ranges to keep every thread busy (4 per thread evens out uneven head counts), none tiny.
    n_split = max(1, min(-(-4 * threads // n_kv_head), n_keys // MIN_KEYS_PER_RANGE))
    attention.attend_one_token(q, k, v, first, n_keys, q.dtype.type(scale), n_split, out)
    return out


@contextmanager
def kernel_threads(n: int) -> Iterator[None]:
    """Run this thread's kernels on `n` threads inside the block (numba's setting is per thread).

    A batch (prefill) spends its time in BLAS, whose own threads spin between
    calls; a parallel kernel run between two BLAS calls would fight them for the
    cores and stall for whole scheduler ticks (measured: 6 prompt tokens of
    gemma3-270m took 3.5 s instead of 0.12 s). So batches decode tiles on one
    thread and leave the cores to BLAS, and one-token decoding, which is all
    kernels, gets every thread.
    """
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)
