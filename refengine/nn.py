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

import numpy as np

from refengine.gguf import Tensor
from refengine.kernels import MATVEC_KERNELS, bound_matvec, dequantize_rows, kernel_threads

# Rows of a weight decoded per BLAS call: at most 8 MB of float32, whatever the model's size.
# Wider tiles make fewer, larger sgemm calls: gemma3-270m's pp512 went from 535 tok/s with 1 MB
# tiles to 605-667 with 8 MB (16 MB: no better); the dequantization itself is a few % of prefill.
TILE_FLOATS = 1 << 21


class Linear:
    """y = x @ W.T for a GGUF weight W of shape (n_out, n_in), quantized or not.

    One token in float32 (decoding) goes through the fused matvec kernel, which
    reads the quant blocks once and never materialises W. A batch (prefill) or
    the float64 path decodes W a tile of rows at a time, exactly, and hands
    each tile to BLAS. `rows` may pick a slice of the tensor's rows, which is
    how one expert of a 3-D ffn_*_exps tensor becomes a Linear of its own.
    """

    def __init__(self, weight: Tensor, rows: slice | None = None):
        self.weight = weight
        self.ggml_type = weight.ggml_type
        self.rows = weight.data if rows is None else weight.data[rows]  # (n_out, row_bytes) uint8, the mapping
        self.n_out, self.n_in = self.rows.shape[0], weight.n_cols
        self.tile_rows = max(1, min(self.n_out, TILE_FLOATS // max(self.n_in, 1)))
        fused = self.ggml_type in MATVEC_KERNELS and self.n_out and self.n_in
        self.matvec = bound_matvec(self.ggml_type, self.rows) if fused else None  # f(x (n_in,), out (n_out,))

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # x: (n_tok, n_in) -> (n_tok, n_out)
        if x.shape[-1] != self.n_in:
            raise ValueError(f"{self.weight.name}: input of width {x.shape[-1]}, expected {self.n_in}")
        if out is None:
            out = np.empty((x.shape[0], self.n_out), dtype=x.dtype)
        if x.shape[0] == 1 and x.dtype == np.float32 and self.matvec is not None:
            self.matvec(x[0] if x.flags.c_contiguous else np.ascontiguousarray(x[0]), out[0])
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


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (as ggml_rms_norm then ggml_mul)."""
    # einsum's one pass over x is 30% faster than mean(square(x)), for one token and for a batch alike
    mean_square = np.einsum("...i,...i->...", x, x)[..., None] / x.dtype.type(x.shape[-1])
    return x / np.sqrt(mean_square + x.dtype.type(eps)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation, as gemma's `gelu_pytorch_tanh` and ggml_gelu."""
    c = x.dtype.type(math.sqrt(2 / math.pi))
    return 0.5 * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
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

    def apply(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate x (n_tok, n_head, head_dim) at `positions` (n_tok,), returning a new array."""
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


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array whose memory becomes resident 4 KB page by page as it is written.

    np.zeros asks for transparent huge pages on large arrays, so a cache's first write to each
    layer made 2 MB of it resident: gemma3-270m's whole 144 MB cache at --ctx 4096 for a short
    prompt. An anonymous mapping (zero-filled by the kernel) does not ask for them.
    """
    count = int(np.prod(shape, dtype=np.int64))
    buffer = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))  # zero-filled by the kernel
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


class KVCache:
    """Keys and values of every layer, preallocated for the whole context."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim_k: int, head_dim_v: int, dtype):
        self.n_ctx = n_ctx
        self.k = lazy_zeros((n_layer, n_ctx, n_head_kv, head_dim_k), dtype)  # (layer, pos, kv_head, dim)
        self.v = lazy_zeros((n_layer, n_ctx, n_head_kv, head_dim_v), dtype)
        self.n_past = 0  # positions [0, n_past) hold valid entries

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def attention(
    q: np.ndarray,  # (n_tok, n_head, head_dim)
    k: np.ndarray,  # (n_kv, n_head_kv, head_dim)  all cached keys, including this batch
    v: np.ndarray,  # (n_kv, n_head_kv, head_dim_v)
    q_positions: np.ndarray,  # (n_tok,)
    scale: float,
    window: int = 0,  # sliding window: attend only to the last `window` positions (0: all)
) -> np.ndarray:
    """Causal grouped-query attention; returns (n_tok, n_head, head_dim_v)."""
    n_tok, n_head, _ = q.shape
    n_kv, n_head_kv, head_dim_v = v.shape
    group = n_head // n_head_kv
    kv_positions = np.arange(n_kv)
    visible = kv_positions[None, :] <= q_positions[:, None]  # (n_tok, n_kv)
    if window:
        visible &= kv_positions[None, :] > q_positions[:, None] - window
    # Query heads that share a key/value head are stacked: (n_head_kv, group * n_tok, head_dim).
    qg = q.reshape(n_tok, n_head_kv, group, -1).transpose(1, 2, 0, 3).reshape(n_head_kv, group * n_tok, -1)
    scores = np.matmul(qg, k.transpose(1, 2, 0)) * q.dtype.type(scale)  # (n_head_kv, group*n_tok, n_kv)
    scores = scores.reshape(n_head_kv, group, n_tok, n_kv)
    scores = np.where(visible[None, None], scores, -np.inf)
    probs = softmax(scores, axis=-1).reshape(n_head_kv, group * n_tok, n_kv)
    out = np.matmul(probs, v.transpose(1, 0, 2))  # (n_head_kv, group*n_tok, head_dim_v)
    return out.reshape(n_head_kv, group, n_tok, head_dim_v).transpose(2, 0, 1, 3).reshape(n_tok, n_head, head_dim_v)
