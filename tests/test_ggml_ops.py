"""numerics="ggml" op by op against ggml itself, to the bit: each kernel of kernels/ops_ggml.py,
float_ggml.py, kquants_ggml.py, attention_ggml.py and gemv_ggml.py's legacy types against the same op
computed by ggml-cpu through ctypes (refengine.libggml.Graph, on the libggml of llama-cpp-python).

ggml's own results are the reference, so every comparison is array_equal (NaN against NaN allowed):
one ulp anywhere is a failure. The paths that only a model loaded by llama.cpp takes (weights repacked
at load: Q4_K) are held to llama.cpp by tests/test_ggml_forward.py instead.
"""

from __future__ import annotations

import ctypes

import ggml_oracle as oracle  # noqa: E402  (tests/ is on sys.path)
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from refengine.kernels import attention_ggml as ggml_attention
from refengine.kernels import bound_matmul, bound_matvec, matvec, ops_ggml, quantize_rows

from refengine.libggml import Graph, cpu

try:
    oracle.cpu_features()
except oracle.LibggmlMissing as e:
    pytest.skip(str(e), allow_module_level=True)

f32 = np.float32


def assert_bitwise(ours: np.ndarray, theirs: np.ndarray, label: str) -> None:
    ours, theirs = np.asarray(ours, dtype=np.float32), np.asarray(theirs, dtype=np.float32).reshape(ours.shape)
    same = (ours == theirs) | (np.isnan(ours) & np.isnan(theirs))
    if not same.all():
        i = np.unravel_index(np.argmin(same), ours.shape)
        pytest.fail(
            f"{label}: {(~same).sum()} of {same.size} values differ; at {i}: ours {ours[i]!r}, ggml {theirs[i]!r}"
        )


def activations(rng, shape, scale=3.0) -> np.ndarray:
    """Normal values with a few extremes mixed in: zeros, tiny, huge, and values on rounding ties."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    flat = x.reshape(-1)
    flat[: min(6, flat.size)] = [0.0, -0.0, 1e-30, 2.5, -1e4, 65504.0][: min(6, flat.size)]
    return x


# ---------------------------------------------------------------- element-wise ops


@pytest.mark.parametrize("n", [576, 640, 33])
def test_rms_norm_times_weight_is_ggmls(n):
    rng = np.random.default_rng(n)
    x, w = activations(rng, (9, n)), rng.standard_normal(n).astype(np.float32)
    with Graph(2) as g:
        expected = g.compute(g.op("mul", g.op("rms_norm", g.input(x), ctypes.c_float(1e-6)), g.input(w)))
    ours = np.empty_like(x)
    ops_ggml.rms_norm(x, w, f32(1e-6), ours)
    assert_bitwise(ours, expected, "rms_norm")


ROPE_CASES = {
    "llama normal": (0, 64, 64, 10000.0, 1.0, None),
    "qwen neox": (2, 128, 128, 1000000.0, 1.0, None),
    "partial rotary": (2, 32, 48, 10000.0, 1.0, None),
    "linear scaling": (0, 64, 64, 10000.0, 0.25, None),
    "yarn": (0, 32, 32, 10000.0, 0.25, (64, 32.0, 1.0, 0.8783)),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_is_ggmls(case):
    """Positions past 1,000 included, where a float32 running product of the angle moves most from the exact one."""
    mode, n_dims, head_dim, base, freq_scale, yarn = ROPE_CASES[case]
    rng = np.random.default_rng(len(case))
    x = activations(rng, (24, 3, head_dim))
    positions = np.concatenate([np.arange(12), 1000 + 37 * np.arange(12)]).astype(np.int32)
    n_ctx_orig, beta_fast, beta_slow, attn_factor = yarn or (4096, 32.0, 1.0, 1.0)
    ext_factor = 1.0 if yarn else 0.0
    with Graph(2) as g:
        args = [ctypes.c_int(n_dims), ctypes.c_int(mode), ctypes.c_int(n_ctx_orig), ctypes.c_float(base)]
        args += [ctypes.c_float(freq_scale), ctypes.c_float(ext_factor), ctypes.c_float(attn_factor)]
        args += [ctypes.c_float(beta_fast), ctypes.c_float(beta_slow)]
        expected = g.compute(g.op("rope_ext", g.input(x), g.input(positions), None, *args))
    low, high = ops_ggml.rope_yarn_corr_dims(n_dims, n_ctx_orig, f32(base), f32(beta_fast), f32(beta_slow))
    cos, sin = ops_ggml.rope_tables(
        positions,
        n_dims,
        f32(base),
        f32(freq_scale),
        np.zeros(0, np.float32),
        f32(attn_factor),
        f32(ext_factor),
        low,
        high,
    )
    ours = np.empty_like(x)
    ops_ggml.rope_apply(x, cos, sin, n_dims, mode == 2, ours)
    assert_bitwise(ours, expected, f"rope {case}")


@pytest.mark.parametrize("n", [8, 37, 64, 256])
def test_softmax_is_ggmls(n):
    """Rows shorter than 16 take libm's expf in ggml, longer ones ggml_v_expf 16 lanes at a time."""
    x = activations(np.random.default_rng(n), (7, n), scale=6.0)
    with Graph(2) as g:
        expected = g.compute(g.op("soft_max_ext", g.input(x), None, ctypes.c_float(0.125), ctypes.c_float(0.0)))
    ours = np.empty_like(x)
    ops_ggml.softmax_rows(x, f32(0.125), ours)
    assert_bitwise(ours, expected, "soft_max_ext")


def test_softmax_is_ggmls_down_to_underflow():
    """Scores from the row's maximum to 150 below it, in random order: ggml_v_expf's 8-lane form (ops_ggml.
    v_expf_lanes) through the subnormal results (scalef rounds once) to 0 (|n| > 192), as ggml's own."""
    rng = np.random.default_rng(3)
    x = rng.permuted(-np.linspace(0.0, 150.0, 7 * 256, dtype=np.float32).reshape(7, 256), axis=1)
    x[:, 5] = 0.0  # each row's maximum
    with Graph(2) as g:
        expected = g.compute(g.op("soft_max_ext", g.input(x), None, ctypes.c_float(1.0), ctypes.c_float(0.0)))
    ours = np.empty_like(x)
    ops_ggml.softmax_rows(x, f32(1.0), ours)
    assert (ours == 0).any() and ((ours > 0) & (ours < np.finfo(np.float32).tiny)).any()  # both ends reached
    assert_bitwise(ours, expected, "soft_max_ext to underflow")


def test_sigmoid_is_ggmls():
    x = activations(np.random.default_rng(1), (5, 64), scale=8.0)
    with Graph(1) as g:
        expected = g.compute(g.op("sigmoid", g.input(x)))
    ours = np.empty_like(x)
    ops_ggml.sigmoid_rows(x, ours)
    assert_bitwise(ours, expected, "sigmoid")


@pytest.mark.parametrize("n", [1536, 1000])
def test_swiglu_and_geglu_are_ggmls(n):
    """n = 1000 leaves 8 values to ggml's scalar silu; GELU's table takes over between -10 and 10."""
    rng = np.random.default_rng(n)
    gate, up = activations(rng, (5, n), scale=4.0), activations(rng, (5, n), scale=1.0)
    gate[1, :6] = [-10.0, 10.0, -9.999, 9.999, 88.0, -100.0]
    with Graph(2) as g:
        expected_swiglu = g.compute(g.op("swiglu_split", g.input(gate), g.input(up)))
        expected_geglu = g.compute(g.op("geglu_split", g.input(gate), g.input(up)))
    ours = np.empty_like(gate)
    ops_ggml.swiglu(gate, up, ours)
    assert_bitwise(ours, expected_swiglu, "swiglu")
    ops_ggml.geglu(gate, up, ops_ggml.gelu_table(), ours)
    assert_bitwise(ours, expected_geglu, "geglu")


def test_gelu_table_is_ggmls():
    """ggml_table_gelu_f16 as ggml_cpu_init fills it, every finite half (NaN inputs keep some NaN either way)."""
    theirs = np.ctypeslib.as_array((ctypes.c_uint16 * 65536).in_dll(cpu(), "ggml_table_gelu_f16")).copy()
    ours = ops_ggml.gelu_table()
    finite = np.isfinite(np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16))
    assert np.array_equal(ours[finite], theirs[finite])


# ---------------------------------------------------------------- matmuls


def ggml_mul_mat(ggml_type, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml_mul_mat of raw rows (n_out, row_bytes) by x (n_tok, n_in): (n_tok, n_out)."""
    with Graph(2) as g:
        if ggml_type in (T.F32, T.F16):
            weights = g.input(rows.view(np.float32 if ggml_type == T.F32 else np.float16))
        else:
            weights = g.input(rows, ggml_type)
        return g.compute(g.op("mul_mat", weights, g.input(x))).reshape(x.shape[0], rows.shape[0])


def weight_rows(ggml_type, n_out: int, n_in: int, rng) -> np.ndarray:
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    if ggml_type == T.F32:
        return w.view(np.uint8)
    if ggml_type == T.F16:
        return w.astype(np.float16).view(np.uint8)
    return quantize_rows(ggml_type, w)


MATMUL_TYPES = [T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("ggml_type", MATMUL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok", [1, 3, 12])
def test_matmul_is_ggmls(ggml_type, n_tok):
    """Every path ggml_compute_forward_mul_mat takes for these shapes: vec_dot (one token; K-quants below 8),
    llamafile's tinyBLAS (float weights from 2 tokens), the tiled K-quant kernel (8 tokens and more).
    37 rows: not a multiple of 4 (tinyBLAS declines, as for any odd shape) nor of 8 (no repacking)."""
    rng = np.random.default_rng(list(T).index(ggml_type) * 10 + n_tok)
    for n_out in (37, 64):
        rows = weight_rows(ggml_type, n_out, 512, rng)
        x = activations(rng, (n_tok, 512))
        expected = ggml_mul_mat(ggml_type, rows, x)
        ours = np.empty((n_tok, n_out), dtype=np.float32)
        if n_tok == 1:
            bound_matvec(ggml_type, rows, "ggml", repacked=False)(x[0], ours[0])
        else:
            bound_matmul(ggml_type, rows, repacked=False)(x, ours)
        assert_bitwise(ours, expected, f"{ggml_type.name} {n_out} x 512 by {n_tok} tokens")


BATCH_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("ggml_type", BATCH_TYPES, ids=lambda t: t.name)
def test_batch_matmul_is_ggmls_at_every_batch_size(ggml_type):
    """The batch kernels take two rows by four tokens at a time, in jobs of a tile of rows (12 to 28 of these
    2048-wide rows) by a chunk of 64 tokens: every remainder of a group, a tile and a chunk, against ggml's
    mul_mat (vec_dot, tinyBLAS or the tiled K-quant kernel, as the batch's size decides), on quantized rows
    with every fifth one random bytes (any scale: subnormal, huge, inf, NaN)."""
    rng = np.random.default_rng(list(T).index(ggml_type) + 500)
    rows = weight_rows(ggml_type, 37, 2048, rng)
    rows[::5] = rng.integers(0, 256, rows[::5].shape, dtype=np.uint8)
    for n_tok in [*range(2, 14), 64, 67]:
        x = activations(rng, (n_tok, 2048))
        ours = np.full((n_tok, 37), np.nan, dtype=np.float32)
        bound_matmul(ggml_type, rows, repacked=False)(x, ours)
        assert_bitwise(ours, ggml_mul_mat(ggml_type, rows, x), f"{ggml_type.name} 37 x 2048 by {n_tok} tokens")


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_matvec_is_ggmls_vec_dot_on_extreme_blocks(ggml_type):
    """Quantized rows with every third block random bytes (any f16 scale: subnormal, huge, inf, NaN), against
    activations from tiny to huge."""
    rng = np.random.default_rng(list(T).index(ggml_type))
    rows = weight_rows(ggml_type, 24, 1024, rng)
    blocks = rows.reshape(-1, rows.shape[1] // (1024 // (256 if ggml_type in (T.Q5_K, T.Q6_K) else 32)))
    blocks[::3] = rng.integers(0, 256, blocks[::3].shape, dtype=np.uint8)
    for scale in (1e-3, 1.0, 1e3):
        x = activations(rng, (1024,), scale=scale)
        assert_bitwise(
            matvec(ggml_type, rows, x, numerics="ggml"), oracle.vec_dot_rows(ggml_type, rows, x), ggml_type.name
        )


# ---------------------------------------------------------------- attention


def ggml_attention_graph(q, k16, v16, first, scale, n_kv):
    """llama.cpp's non-flash attention as a ggml graph: kq = mul_mat(k, q), soft_max_ext with a causal mask
    over n_kv cells, kqv = mul_mat(v^T, kq). q (n_tok, n_head, dk); k16, v16 (n_kv_head, n_kv, d) f16."""
    n_tok, n_head, _ = q.shape
    mask = np.full((n_tok, n_kv), -np.inf, dtype=np.float32)
    for t in range(n_tok):
        mask[t, : first + t + 1] = 0.0
    with Graph(2) as g:
        kq = g.op("mul_mat", g.input(k16), g.input(np.ascontiguousarray(q.transpose(1, 0, 2))))
        kq = g.op("soft_max_ext", kq, g.input(mask), ctypes.c_float(scale), ctypes.c_float(0.0))
        v_t = np.ascontiguousarray(v16.transpose(0, 2, 1))  # (n_kv_head, dv, n_kv): ggml's V cache
        kqv = g.compute(g.op("mul_mat", g.input(v_t), kq))  # (n_head, n_tok, dv)
    return kqv.reshape(n_head, n_tok, -1).transpose(1, 0, 2)


@pytest.mark.parametrize("n_tok", [1, 5, 13])
@pytest.mark.parametrize("dk", [64, 96, 40])
def test_attention_is_ggmls(n_tok, dk):
    """GQA over an F16 cache of 256 cells; dk = 40 takes ggml_vec_dot_f16's leftovers (no tinyBLAS)."""
    rng = np.random.default_rng(n_tok * 100 + dk)
    n_head, n_kv_head, dv, n_kv, first = 6, 2, 64, 256, 30
    q = activations(rng, (n_tok, n_head, dk), scale=1.0)
    k16 = rng.standard_normal((n_kv_head, n_kv, dk)).astype(np.float16)
    v16 = rng.standard_normal((n_kv_head, n_kv, dv)).astype(np.float16)
    expected = ggml_attention_graph(q, k16, v16, first, 0.125, n_kv)
    ours = np.empty((n_tok, n_head, dv), dtype=np.float32)
    ggml_attention.attend(q, k16.view(np.uint16), v16.view(np.uint16), first, 0, f32(0.125), n_kv, ours)
    assert_bitwise(ours, expected, f"attention of {n_tok} tokens, dk {dk}")
    if n_tok == 1:  # decoding's two kernels: the heads on this thread, or shared among the threads
        for kernel in (ggml_attention.attend_token, ggml_attention.attend_token_heads):
            ours = np.empty((n_head, dv), dtype=np.float32)
            kernel(q[0], k16.view(np.uint16), v16.view(np.uint16), first, 0, f32(0.125), n_kv, ours)
            assert_bitwise(ours, expected[0], f"{kernel.__name__}, dk {dk}")
