"""The blocks every architecture is built from, each written once.

Activations are numpy arrays in the model's compute dtype: float32, or float64
for the exact path. Weights stay quantized in the file mapping; `Linear`
either reads their blocks in a fused matvec (one token) or decodes them a tile
of rows at a time into a small reused buffer for BLAS (a batch), so no
dequantized copy of a whole matrix ever exists.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np

from refengine.buffers import ATTENTION_TILE_FLOATS, MIN_KEY_BLOCK, N_UBATCH, TILE_FLOATS, cache_slots
from refengine.gguf import Tensor
from refengine.kernels import (
    GGML_MATMUL_KERNELS,
    GGML_MATVEC_KERNELS,
    MATVEC_KERNELS,
    attend_one_token,
    bound_matmul,
    bound_matvec,
    dequantize_rows,
    kernel_threads,
    ops_ggml,
)
from refengine.kernels import attention as exact_attention
from refengine.kernels import attention_ggml as ggml_attention
from refengine.threads import integer_kernels

# How a float32 forward pass computes (Linear, and the ops that differ between the two: see each):
#   exact  the file's function in float32: weights decoded exactly, activations kept in float32
#   ggml   llama.cpp's CPU arithmetic: activations quantized for each matmul as ggml-cpu does, integer
#          dot products, and the roundings of its other ops (f16 KV cache, rope tables, GELU table, ...)
NUMERICS = ("exact", "ggml")
# The KV cache's type in ggml numerics, as llama.cpp's -ctk/-ctv: f16 (its default) or f32 (with flash
# attention off, what llama-eval-callback -ctk f32 -ctv f32 -fa off computes). Exact numerics caches in
# the compute dtype.
CACHE_TYPES = {"f16": np.float16, "f32": np.float32}
# Below this many rows (tokens) an element-wise op runs on the calling thread: waking the others costs more.
FEW_ROWS = 16


class Linear:
    """y = x @ W.T for a GGUF weight W of shape (n_out, n_in), quantized or not.

    numerics "exact": one token in float32 (decoding) goes through the fused matvec kernel, which
    reads the quant blocks once and never materialises W; a batch (prefill) or the float64 path
    decodes W a tile of rows at a time, exactly, and hands each tile to BLAS.
    numerics "ggml": float32 activations are quantized to the weight type's vec_dot_type and the
    dot products run on integers, as llama.cpp's CPU backend computes them, for one token
    (bound_matvec) and for a batch alike (bound_matmul, every row read once for all the tokens).
    Types ggml numerics has no kernel for take the exact path. expert=True: one expert of a 3-D
    ffn_*_exps tensor, whose batches ggml computes as mul_mat_id (another float order for some types).
    `rows` may pick a slice of the tensor's rows, which is how one expert of a 3-D ffn_*_exps
    tensor becomes a Linear of its own.
    """

    def __init__(self, weight: Tensor, rows: slice | None = None, numerics: str = "exact", expert: bool = False):
        self.weight = weight
        self.ggml_type = weight.ggml_type
        self.rows = weight.data if rows is None else weight.data[rows]  # (n_out, row_bytes) uint8, the mapping
        self.n_out, self.n_in = self.rows.shape[0], weight.n_cols
        self.tile_rows = max(1, min(self.n_out, TILE_FLOATS // max(self.n_in, 1)))
        self.numerics = numerics if numerics == "ggml" and self.ggml_type in GGML_MATVEC_KERNELS else "exact"
        kernels = GGML_MATVEC_KERNELS if self.numerics == "ggml" else MATVEC_KERNELS
        fused = self.ggml_type in kernels and self.n_out and self.n_in
        # llama.cpp repacks 2-D weights and expert tensors of some types at load, which changes its float order
        repacked = expert or len(weight.shape) == 2
        # f(x (n_in,), out (n_out,)), and in ggml numerics f(x (n_tok, n_in), out (n_tok, n_out))
        self.matvec = bound_matvec(self.ggml_type, self.rows, self.numerics, repacked) if fused else None
        self.matmul = None
        if fused and self.numerics == "ggml" and self.ggml_type in GGML_MATMUL_KERNELS:
            self.matmul = bound_matmul(self.ggml_type, self.rows, expert, repacked)

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # x: (n_tok, n_in) -> (n_tok, n_out)
        if x.shape[-1] != self.n_in:
            raise ValueError(f"{self.weight.name}: input of width {x.shape[-1]}, expected {self.n_in}")
        if out is None:
            out = np.empty((x.shape[0], self.n_out), dtype=x.dtype)
        if x.dtype == np.float32 and self.matvec is not None:
            x = x if x.flags.c_contiguous else np.ascontiguousarray(x)
            if x.shape[0] == 1:
                self.matvec(x[0], out[0])
                return out
            if self.matmul is not None:
                with integer_kernels():  # inside a batch's step BLAS holds the cores; no BLAS runs here
                    self.matmul(x, out)
                return out
        tile = np.empty((self.tile_rows, self.n_in), dtype=np.float32)
        for start in range(0, self.n_out, self.tile_rows):
            stop = min(start + self.tile_rows, self.n_out)
            w = dequantize_rows(self.ggml_type, self.rows[start:stop], tile[: stop - start])  # (rows, n_in) exact
            np.matmul(x, w.T.astype(x.dtype, copy=False), out=out[:, start:stop])
        return out


def embed(table: Tensor, tokens: np.ndarray, dtype) -> np.ndarray:
    """Rows of the embedding table for `tokens`: (n_tok,) -> (n_tok, n_embd)."""
    out = np.empty((len(tokens), table.n_cols), dtype=np.float32)
    with kernel_threads(1):  # a row is a few blocks: waking a second thread costs more than it saves
        for i, token in enumerate(tokens):
            table.dequantize(int(token), int(token) + 1, out=out[i : i + 1])
    return out.astype(dtype, copy=False)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, numerics: str = "exact") -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (as ggml_rms_norm then ggml_mul).
    numerics "ggml": ggml's float operations in its order (kernels/ops_ggml.py)."""
    if numerics == "ggml":
        rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (n_rows, n)
        out = np.empty_like(rows)
        (ops_ggml.rms_norm if len(rows) >= FEW_ROWS else ops_ggml.rms_norm_few)(rows, weight, np.float32(eps), out)
        return out.reshape(x.shape)
    # einsum's one pass over x is 30% faster than mean(square(x)), for one token and for a batch alike
    mean_square = np.einsum("...i,...i->...", x, x)[..., None] / x.dtype.type(x.shape[-1])
    return x / np.sqrt(mean_square + x.dtype.type(eps)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation, as gemma's `gelu_pytorch_tanh` and ggml_gelu."""
    c = x.dtype.type(math.sqrt(2 / math.pi))
    return 0.5 * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))


def swiglu(gate: np.ndarray, up: np.ndarray, numerics: str = "exact") -> np.ndarray:
    """silu(gate) * up, (n_tok, n) each: ggml_swiglu_split. ggml numerics: ggml_vec_swiglu_f32."""
    if numerics == "ggml":
        out = np.empty_like(gate)
        kernel = ops_ggml.swiglu if len(gate) >= FEW_ROWS else ops_ggml.swiglu_few
        kernel(np.ascontiguousarray(gate), np.ascontiguousarray(up), out)
        return out
    return silu(gate) * up


def geglu(gate: np.ndarray, up: np.ndarray, numerics: str = "exact") -> np.ndarray:
    """gelu_tanh(gate) * up, (n_tok, n) each: ggml_geglu_split. ggml numerics: ggml's GELU is a table of
    f16 values at every f16 input (GGML_GELU_FP16), which moves an FFN's output by ~1e-4."""
    if numerics == "ggml":
        out = np.empty_like(gate)
        kernel = ops_ggml.geglu if len(gate) >= FEW_ROWS else ops_ggml.geglu_few
        kernel(np.ascontiguousarray(gate), np.ascontiguousarray(up), gelu_table(), out)
        return out
    return gelu_tanh(gate) * up


_GELU_TABLE: list[np.ndarray] = []


def gelu_table() -> np.ndarray:
    """ggml_table_gelu_f16, built once: (65536,) uint16."""
    if not _GELU_TABLE:
        _GELU_TABLE.append(ops_ggml.gelu_table())
    return _GELU_TABLE[0]


def softmax(x: np.ndarray, axis: int = -1, temperature: float = 1.0) -> np.ndarray:
    """exp(x / temperature) normalised over `axis`. The maximum is subtracted before dividing, so a tiny
    temperature (1e-310) sharpens towards argmax instead of overflowing (the sampler's); where the
    maximum is infinite (a repetition penalty can push logits past float64), the entries equal to it
    share the mass."""
    top = np.max(x, axis=axis, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):  # (x - top) / 1e-310 is -inf for all but the top
        e = np.exp((x - top) / temperature) if temperature != 1.0 else np.exp(x - top)
    finite = np.isfinite(top)
    if not finite.all():
        e = np.where(finite, e, (x == top).astype(e.dtype))
    return e / np.sum(e, axis=axis, keepdims=True)


@dataclass(frozen=True)
class YaRN:
    """YaRN context extension, as llama.cpp's rope_yarn with ext_factor 1 (transformers' "yarn" rope_type).

    Frequencies that turn more than beta_fast times over the original context keep their
    value, those that turn fewer than beta_slow times are divided by `factor` (positions
    interpolated), and a linear ramp over the pair index blends the two in between.
    cos and sin are multiplied by `magnitude` (llama.cpp: attn_factor * (1 + 0.1 ln factor)).
    """

    factor: float  # context extension; the interpolated frequencies are divided by it
    n_ctx_orig: int  # rope.scaling.original_context_length
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    magnitude: float = 1.0
    attn_factor: float = 1.0  # what llama.cpp passes ggml_rope_ext as attn_factor (ggml numerics)

    def kept(self, n_dims: int, base: float) -> np.ndarray:
        """(n_dims/2,) the share of each frequency kept as it is: 1 for the fast ones, 0 for the
        interpolated ones (ggml_rope_yarn_corr_dims, then rope_yarn_ramp)."""

        def pair_turning(n_turns: float) -> float:  # the pair index whose frequency turns n_turns times
            return n_dims * math.log(self.n_ctx_orig / (n_turns * 2 * math.pi)) / (2 * math.log(base))

        low = max(0.0, math.floor(pair_turning(self.beta_fast)))
        high = min(n_dims - 1.0, math.ceil(pair_turning(self.beta_slow)))
        ramp = (np.arange(n_dims // 2, dtype=np.float64) - low) / max(0.001, high - low)
        return 1 - np.clip(ramp, 0, 1)


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding for one group of layers.

    neox=False rotates adjacent pairs (x[2i], x[2i+1]): llama.cpp's "normal" mode,
    used by the llama family, whose GGUF converter permutes Q and K rows to match.
    neox=True rotates halves (x[i], x[i + d/2]): qwen2/3, gemma3 (rotate_half in HF).
    """

    n_dims: int  # rotated dimensions, from the start of each head
    base: float
    neox: bool
    scale: float = 1.0  # linear position scaling (positions are divided by it)
    freq_factors: np.ndarray | None = None  # (n_dims/2,) llama3-style per-frequency divisors
    yarn: YaRN | None = None

    @cached_property
    def inv_freq(self) -> np.ndarray:
        """(n_dims/2,) the angle per position of each pair, computed once (decoding asks for it every token)."""
        inv = self.base ** (-np.arange(0, self.n_dims, 2, dtype=np.float64) / self.n_dims)  # (n_dims/2,)
        if self.freq_factors is not None:
            inv = inv / self.freq_factors.astype(np.float64)
        if self.yarn is not None:
            kept = self.yarn.kept(self.n_dims, self.base)
            inv = inv * kept + inv / self.yarn.factor * (1 - kept)
        return inv

    def tables(self, positions: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin at `positions`, each (n_tok, 1, n_dims/2) in `dtype`, angles in float64.

        Every layer of a forward pass asks for the same positions (twice: q and k), so the
        last pair is kept rather than recomputed.
        """
        key = (positions.tobytes(), np.dtype(dtype))
        kept = self.__dict__.get("_last_tables")
        if kept is None or kept[0] != key:
            angles = (positions.astype(np.float64) / self.scale)[:, None] * self.inv_freq[None, :]  # (n_tok, d/2)
            magnitude = 1.0 if self.yarn is None else self.yarn.magnitude
            cos = (np.cos(angles) * magnitude).astype(dtype)[:, None, :]  # (n_tok, 1, d/2)
            sin = (np.sin(angles) * magnitude).astype(dtype)[:, None, :]
            kept = self.__dict__["_last_tables"] = (key, cos, sin)  # (a frozen dataclass: as cached_property does)
        return kept[1], kept[2]

    def apply(self, x: np.ndarray, positions: np.ndarray, numerics: str = "exact") -> np.ndarray:
        """Rotate x (n_tok, n_head, head_dim) at `positions` (n_tok,), returning a new array."""
        if numerics == "ggml":
            return self.apply_ggml(x, positions)
        cos, sin = self.tables(positions, x.dtype)  # (n_tok, 1, d/2)
        out = x.copy()
        half = self.n_dims // 2
        if self.neox:
            a, b = x[..., :half], x[..., half : self.n_dims]
            out[..., :half] = a * cos - b * sin
            out[..., half : self.n_dims] = b * cos + a * sin
        else:
            a, b = x[..., 0 : self.n_dims : 2], x[..., 1 : self.n_dims : 2]
            out[..., 0 : self.n_dims : 2] = a * cos - b * sin
            out[..., 1 : self.n_dims : 2] = b * cos + a * sin
        return out

    def ggml_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin (n_tok, n_dims/2) float32 as ggml_rope_ext computes them (ops_ggml.rope_tables):
        theta a float32 running product over the pairs, libm's cosf and sinf."""
        key = ("ggml", positions.tobytes())
        kept = self.__dict__.get("_last_ggml_tables")
        if kept is None or kept[0] != key:
            f = np.float32
            factors = np.zeros(0, np.float32) if self.freq_factors is None else self.freq_factors.astype(np.float32)
            attn_factor, ext_factor, low, high = f(1), f(0), f(0), f(0)
            if self.yarn is not None:
                y = self.yarn
                attn_factor = f(y.attn_factor)
                ext_factor = f(1)
                low, high = ops_ggml.rope_yarn_corr_dims(
                    self.n_dims, y.n_ctx_orig, f(self.base), f(y.beta_fast), f(y.beta_slow)
                )
            freq_scale = f(1) / f(self.scale) if self.yarn is None else f(1) / f(self.yarn.factor)
            tables = ops_ggml.rope_tables(
                positions.astype(np.int32),
                self.n_dims,
                f(self.base),
                freq_scale,
                factors,
                attn_factor,
                ext_factor,
                low,
                high,
            )
            kept = self.__dict__["_last_ggml_tables"] = (key, *tables)
        return kept[1], kept[2]

    def apply_ggml(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        cos, sin = self.ggml_tables(positions)  # (n_tok, n_dims/2)
        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        (ops_ggml.rope_apply if len(x) >= FEW_ROWS else ops_ggml.rope_apply_few)(
            x, cos, sin, self.n_dims, self.neox, out
        )
        return out


def attention_ggml(q: np.ndarray, layer: LayerCache, first: int, scale: float) -> np.ndarray:
    """attention() in llama.cpp's CPU arithmetic (numerics "ggml"): q (n_tok, n_head, head_dim_k) ->
    (n_tok, n_head, head_dim_v). Over an F16 cache, see kernels/attention_ggml.py. Over an F32 cache
    (llama.cpp's -ctk f32 -ctv f32 with flash attention off) ggml multiplies K*Q and V*softmax in float32,
    which is attention() up to the order of float32 additions."""
    if layer.k.dtype != np.float16:
        return attention(q, layer, first, scale)
    n_tok, n_head, _ = q.shape
    n_kv_head = layer.k.shape[0]
    if n_head % n_kv_head:
        raise ValueError(f"{n_head} query heads cannot share {n_kv_head} key/value heads evenly")
    out = np.empty((n_tok, n_head, layer.v.shape[2]), dtype=np.float32)
    n_cells = -(-(first + n_tok) // 256) * 256  # llama.cpp's n_kv: the used cells, padded to 256
    k, v = layer.k.view(np.uint16), layer.v.view(np.uint16)
    if k.strides[-1] != 2 or v.strides[-1] != 2:  # the batch kernel loads 8 halves of a row at once
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
    q = np.ascontiguousarray(q)
    if n_tok == 1 and attention_work(q.shape, layer, first) < ggml_attention.PARALLEL_ATTENTION_WORK:
        ggml_attention.attend_token(q[0], k, v, first, layer.window, np.float32(scale), n_cells, out[0])
    elif n_tok == 1:
        ggml_attention.attend_token_heads(
            q[0], k, v, first, layer.window, np.float32(scale), n_cells, out[0], numba.get_num_threads()
        )
    else:
        with integer_kernels():
            ggml_attention.attend(q, k, v, first, layer.window, np.float32(scale), n_cells, out)
    return out


EMPTY = np.zeros(0, dtype=np.float32)


def decode_attention_ggml(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    layer: LayerCache,
    position: int,
    rope: Rope,
    scale: float,
    q_norm: np.ndarray | None = None,
    k_norm: np.ndarray | None = None,
    eps: float = 0.0,
    q_scale: float = 1.0,
) -> np.ndarray:
    """One token's QK-norm, rope, cache store and attention in one call (numerics ggml, no observer): q
    (n_head, dk), k (n_kv_head, dk), v (n_kv_head, dv) float32, overwritten -> (n_head, dv). The same
    operations as rms_norm, Rope.apply, LayerCache.store and attention_ggml, to the bit."""
    cos, sin = rope.ggml_tables(np.array([position]))  # (1, n_dims/2)
    out = np.empty((q.shape[0], layer.v.shape[2]), dtype=np.float32)
    n_cells = -(-(position + 1) // 256) * 256
    k_cache, v_cache = layer.k.view(np.uint16), layer.v.view(np.uint16)
    serial = attention_work(q.shape, layer, position) < ggml_attention.PARALLEL_ATTENTION_WORK
    ggml_attention.decode_attention(
        q, k, v, EMPTY if q_norm is None else q_norm, EMPTY if k_norm is None else k_norm, np.float32(eps),
        cos[0], sin[0], rope.n_dims, rope.neox, np.float32(q_scale), k_cache, v_cache,
        position, layer.window, np.float32(scale), n_cells, serial, out,
    )  # fmt: skip
    if not serial:  # a long context: the heads on every thread
        ggml_attention.attend_token_heads(
            q, k_cache, v_cache, position, layer.window, np.float32(scale), n_cells, out, numba.get_num_threads()
        )
    return out


def decode_attention_exact(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    layer: LayerCache,
    position: int,
    rope: Rope,
    scale: float,
    q_norm: np.ndarray | None = None,
    k_norm: np.ndarray | None = None,
    eps: float = 0.0,
) -> np.ndarray:
    """decode_attention_ggml in numerics exact (float32): QK-norm, rope, cache store and attention of one token,
    on this thread while the context is short: q (n_head, dk), k (n_kv_head, dk), v (n_kv_head, dv) float32,
    overwritten -> (n_head, dv). The operations of rms_norm, Rope.apply, LayerCache.store and attention,
    within float32 reassociation."""
    cos, sin = rope.tables(np.array([position]), np.float32)  # (1, 1, n_dims/2)
    n_kv_head = k.shape[0]
    out = np.empty((n_kv_head, q.shape[0] // n_kv_head, layer.v.shape[2]), dtype=np.float32)
    begin = layer.first_visible(position)
    serial = attention_work(q.shape, layer, position) < ggml_attention.PARALLEL_ATTENTION_WORK
    exact_attention.decode_attention(
        q, k, v, EMPTY if q_norm is None else q_norm, EMPTY if k_norm is None else k_norm, np.float32(eps),
        cos[0, 0], sin[0, 0], rope.n_dims, rope.neox, layer.k, layer.v, position, begin, np.float32(scale),
        serial, out,
    )  # fmt: skip
    if not serial:  # a long context: the keys split among the threads
        attention_one = attention(q[None], layer, position, scale)  # (1, n_head, dv)
        return attention_one[0]
    return out.reshape(q.shape[0], -1)


def attention_work(q_shape: tuple[int, ...], layer: LayerCache, position: int) -> int:
    """Multiply-adds of one query token's attention at `position`: heads x visible cells x (dk + dv)."""
    visible = position + 1 - layer.first_visible(position)
    return q_shape[-2] * visible * (q_shape[-1] + layer.v.shape[2])


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array whose memory becomes resident 4 KB page by page as it is written.

    np.zeros asks for transparent huge pages on large arrays, so a cache's first write to each
    layer made 2 MB of it resident: gemma3-270m's whole 144 MB cache at --ctx 4096 for a short
    prompt. An anonymous mapping (zero-filled by the kernel) does not ask for them.
    """
    count = int(np.prod(shape, dtype=np.int64))
    buffer = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))  # zero-filled by the kernel
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


class LayerCache:
    """One layer's cached keys and values, per KV head with positions contiguous (what attention reads).

    Position p is kept in slot p % n_slots. A full-attention layer has a slot for every position of
    the context; a sliding-window layer keeps a ring of window + n_ubatch slots, so a micro-batch that
    starts at p can still see the window before p (llama.cpp's iSWA cache does the same).
    """

    def __init__(self, k: np.ndarray, v: np.ndarray, window: int = 0):
        self.k = k  # (n_kv_head, n_slots, head_dim_k)
        self.v = v  # (n_kv_head, n_slots, head_dim_v); MLA: a view of k's first columns (the latent)
        self.n_slots = k.shape[1]
        self.window = window  # attend to the last `window` positions only (0: all)

    def slots(self, first: int, n: int) -> slice | np.ndarray:
        """The slots of positions first .. first + n - 1: a slice, or indices where the ring wraps."""
        start = first % self.n_slots
        if start + n <= self.n_slots:
            return slice(start, start + n)
        return (first + np.arange(n)) % self.n_slots

    def store(self, first: int, k: np.ndarray, v: np.ndarray | None) -> None:
        """Keep k (n_tok, n_kv_head, head_dim_k) and v (n_tok, n_kv_head, head_dim_v) at positions first...
        v is None where the values are a view of the keys (MLA)."""
        slots = self.slots(first, k.shape[0])
        self.k[:, slots] = k.transpose(1, 0, 2)
        if v is not None:
            self.v[:, slots] = v.transpose(1, 0, 2)

    def first_visible(self, position: int) -> int:
        """The earliest position a query at `position` attends to."""
        return max(0, position - self.window + 1) if self.window else 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + (0 if np.may_share_memory(self.k, self.v) else self.v.nbytes)


class KVCache:
    """Every layer's LayerCache, and how many positions hold valid entries."""

    def __init__(self, layers: list[LayerCache], n_ctx: int):
        self.layers = layers
        self.n_ctx = n_ctx
        self.n_past = 0  # positions [0, n_past) hold valid entries

    @classmethod
    def for_heads(
        cls, n_ctx, n_kv_head, head_dim_k, head_dim_v, dtype, windows: list[int], n_ubatch: int = N_UBATCH
    ) -> KVCache:
        """Separate keys and values for each layer; windows[il] is layer il's sliding window (0: none),
        kept for micro-batches of up to n_ubatch tokens."""
        layers = []
        for window in windows:
            n_slots = cache_slots(n_ctx, window, n_ubatch)
            k = lazy_zeros((n_kv_head, n_slots, head_dim_k), dtype)  # (n_kv_head, n_slots, head_dim_k)
            v = lazy_zeros((n_kv_head, n_slots, head_dim_v), dtype)  # (n_kv_head, n_slots, head_dim_v)
            layers.append(LayerCache(k, v, window))
        return cls(layers, n_ctx)

    def keep(self, n: int) -> int:
        """Drop every position from n on, for the next tokens to continue from n (chat reuses a prefix).
        Returns the positions kept: n, or 0 when a sliding-window ring no longer holds the window before
        n (it moved on since), so everything must be evaluated again."""
        n = min(n, self.n_past)
        for layer in self.layers:
            oldest_kept = self.n_past - layer.n_slots  # the ring's oldest position still in its slot
            if layer.n_slots < self.n_ctx and layer.first_visible(n) < oldest_kept:
                n = 0
        self.n_past = n
        return n

    @property
    def max_batch(self) -> int:
        """The most positions one step may append: a sliding-window ring must still hold the window
        before the step's first position once the step is written."""
        rings = [layer.n_slots - layer.window for layer in self.layers if layer.n_slots < self.n_ctx]
        return min(rings, default=self.n_ctx)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def attention(q: np.ndarray, layer: LayerCache, first: int, scale: float) -> np.ndarray:
    """Causal grouped-query attention of the queries at positions first, first + 1, ... over the cache,
    whose slots already hold this batch's keys and values: q (n_tok, n_head, head_dim_k) ->
    (n_tok, n_head, head_dim_v). Query heads h * group .. (h + 1) * group - 1 share KV head h.

    One token goes through the fused kernel (kernels/attention.py); a batch through attention_tiled.
    """
    n_tok, n_head, _ = q.shape
    n_kv_head = layer.k.shape[0]
    if n_head % n_kv_head:
        raise ValueError(f"{n_head} query heads cannot share {n_kv_head} key/value heads evenly")
    if n_tok > 1:
        return attention_tiled(q, layer, first, scale)
    begin = layer.first_visible(first)
    group = n_head // n_kv_head
    out = np.empty((n_kv_head, group, layer.v.shape[2]), dtype=q.dtype)  # (n_kv_head, group, head_dim_v)
    attend_one_token(q[0].reshape(n_kv_head, group, -1), layer.k, layer.v, begin, first + 1 - begin, scale, out)
    return out.reshape(1, n_head, -1)


def attention_tiled(q: np.ndarray, layer: LayerCache, first: int, scale: float) -> np.ndarray:
    """attention() for a batch: the keys a block at a time with the online softmax, each block's
    products by BLAS, so memory is one block's scores whatever the context.

    For each block of keys K_b, V_b and every query row, with m the running max and l the running sum:
        s = scale * q . K_b                  masked to -inf where the key is in the query's future,
                                             or behind its sliding window
        m' = max(m, max(s));  p = exp(s - m')
        l = l * exp(m - m') + sum(p);  o = o * exp(m - m') + p @ V_b;  m = m'
    and out = o / l. With one block this is the plain softmax.
    """
    n_tok, n_head, head_dim = q.shape
    n_kv_head, n_slots, head_dim_v = layer.v.shape
    group = n_head // n_kv_head
    rows = group * n_tok
    last = first + n_tok - 1
    # Query heads that share a KV head are stacked: (n_kv_head, group * n_tok, head_dim), row g * n_tok + t.
    qg = q.reshape(n_tok, n_kv_head, group, head_dim).transpose(1, 2, 0, 3).reshape(n_kv_head, rows, head_dim)
    q_positions = np.arange(first, last + 1)  # (n_tok,)
    dtype = q.dtype.type
    block = max(MIN_KEY_BLOCK, ATTENTION_TILE_FLOATS // (n_kv_head * rows))
    m = np.full((n_kv_head, rows, 1), -np.inf, dtype=q.dtype)  # running max score of each row
    l = np.zeros((n_kv_head, rows, 1), dtype=q.dtype)  # running sum of exp(score - m)
    o = np.zeros((n_kv_head, rows, head_dim_v), dtype=q.dtype)  # running output, unnormalised
    k_begin = layer.first_visible(first)
    while k_begin <= last:
        slot = k_begin % n_slots
        k_end = min(k_begin + block, last + 1, k_begin + n_slots - slot)  # a block never wraps the ring
        n_keys = k_end - k_begin
        scores = np.matmul(qg, layer.k[:, slot : slot + n_keys].transpose(0, 2, 1))  # (n_kv_head, rows, n_keys)
        scores *= dtype(scale)
        k_positions = np.arange(k_begin, k_end)  # (n_keys,)
        visible = k_positions[None, :] <= q_positions[:, None]  # (n_tok, n_keys)
        if layer.window:
            visible &= k_positions[None, :] > q_positions[:, None] - layer.window
        if not visible.all():
            bias = np.where(visible, dtype(0), dtype(-np.inf))  # (n_tok, n_keys): adding 0 is exact
            scores.reshape(n_kv_head, group, n_tok, n_keys)[...] += bias
        m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))
        m_safe = np.where(m_new == -np.inf, dtype(0), m_new)  # a row with no visible key yet: exp(-inf) = 0
        scores -= m_safe
        np.exp(scores, out=scores)  # p
        correction = np.exp(m - m_safe)
        l = l * correction + scores.sum(axis=-1, keepdims=True)
        o *= correction
        o += np.matmul(scores, layer.v[:, slot : slot + n_keys])  # (n_kv_head, rows, head_dim_v)
        m = m_new
        k_begin = k_end
    out = o / l  # (n_kv_head, group * n_tok, head_dim_v)
    return out.reshape(n_kv_head, group, n_tok, head_dim_v).transpose(2, 0, 1, 3).reshape(n_tok, n_head, head_dim_v)
