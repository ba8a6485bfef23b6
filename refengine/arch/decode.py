"""One token through the pre-norm layers of the llama family in a few kernel calls (decoding, float32).

A decoding step is small work cut into many pieces: smollm2's 30 layers of hidden size 576 each do seven
matrix-vector products of 20-70 us, and between them a residual add, a norm, two ropes, a cache store,
the attention, the SwiGLU, each a handful of numpy calls and allocations. Here a layer is

    add_rms_norm     x += the last FFN's output; attn_norm(x)                    one call, this thread
    q, k, v          attn_q, attn_k, attn_v                                       three matvecs
    attention        QK-norm, rope, cache store, attention (decode_attention_*)   one call
    attn_output      into a preallocated buffer
    add_rms_norm     x += attention's output; ffn_norm(x)                         one call, this thread
    gate, up         one matvec over both when the file keeps ffn_gate's rows just before ffn_up's
    swiglu, down     one call each

with every intermediate in a buffer allocated once. Each call computes what DecoderModel.layer computes:
in numerics ggml the same kernels on the same inputs (to the bit), in numerics exact the same float32
operations within reassociation (kernels/ops_exact.py). A mixture of experts keeps its own FFN call.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from gguf import GGMLQuantizationType

from refengine.arch.ffn import GLU
from refengine.kernels import bound_matvec, bound_matvec_slices, ops_exact, ops_ggml
from refengine.kernels.gemv import MATVEC_SLICES_KERNELS
from refengine.nn import KVCache, Linear, decode_attention_exact, decode_attention_ggml


def paired_rows(a: Linear, b: Linear) -> np.ndarray | None:
    """a's rows then b's as one (a.n_out + b.n_out, row_bytes) view of the file mapping, when the file stores
    b right after a with the same type and row size (llama.cpp's converters write ffn_gate, then ffn_up)."""
    ra, rb = a.rows, b.rows
    if a.ggml_type != b.ggml_type or a.numerics != b.numerics or ra.shape[1] != rb.shape[1]:
        return None
    if not (ra.flags.c_contiguous and rb.flags.c_contiguous) or buffer_of(ra) is not buffer_of(rb):
        return None
    if ra.__array_interface__["data"][0] + ra.nbytes != rb.__array_interface__["data"][0]:
        return None
    shape = (ra.shape[0] + rb.shape[0], ra.shape[1])
    return np.lib.stride_tricks.as_strided(ra, shape=shape, strides=ra.strides, writeable=False)


def buffer_of(a: np.ndarray):
    """The object that owns a's memory (for weights, the file's mmap under the reader's memoryview)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a.base.obj if isinstance(a.base, memoryview) else a.base


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


# The types whose slices kernel gives each row's matvec output to the bit (ggml: the legacy types, which llama.cpp's
# matvec does not repack; exact: those with a slices kernel).
SPANNED_TYPES = {
    "ggml": {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
             GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0},
    "exact": set(MATVEC_SLICES_KERNELS),
}  # fmt: skip


def spanned_rows(linears: list[Linear]) -> tuple[np.ndarray, int, np.ndarray] | None:
    """One (n_rows, row_bytes) view of the file mapping over every linear's rows, a slice size n_out and the
    n_out-row slices of the view that are the linears' rows, in their order: when they share a type and a row
    size, lie in one mapping, and start whole rows apart (llama.cpp's files keep attn_k, attn_output, attn_q,
    attn_v in this order, every size a multiple of 32 bytes, so no padding between). None otherwise."""
    first = linears[0]
    row_bytes = first.rows.shape[1]
    for linear in linears:
        rows = linear.rows
        same = linear.ggml_type == first.ggml_type and linear.numerics == first.numerics and rows.shape[1] == row_bytes
        if not (same and rows.flags.c_contiguous and buffer_of(rows) is buffer_of(first.rows)):
            return None
    if first.ggml_type not in SPANNED_TYPES[first.numerics] or first.matvec is None:
        return None
    lowest = min((linear.rows for linear in linears), key=address)
    offsets = [address(linear.rows) - address(lowest) for linear in linears]
    if any(offset % row_bytes for offset in offsets):
        return None
    starts = [offset // row_bytes for offset in offsets]  # each linear's first row in the view
    n_out = math.gcd(*starts, *(linear.n_out for linear in linears))
    spans = sorted(zip(starts, (linear.n_out for linear in linears), strict=True))
    if n_out % 4 or any(a + n > b for (a, n), (b, _) in zip(spans, spans[1:], strict=False)):  # thin, or overlapping
        return None
    n_rows = max(start + linear.n_out for start, linear in zip(starts, linears, strict=True))
    view = np.lib.stride_tricks.as_strided(lowest, shape=(n_rows, row_bytes), strides=lowest.strides, writeable=False)
    ranges = [(start // n_out, (start + linear.n_out) // n_out) for start, linear in zip(starts, linears, strict=True)]
    slices = np.concatenate([np.arange(a, b) for a, b in ranges])
    return view, n_out, slices


def bound_spanned(linears: list[Linear]):
    """f(x (n_in,), out (sum of n_out,)): every linear of `linears` on x in one kernel call, their outputs side
    by side in their order (spanned_rows); None where the file's layout does not allow it."""
    span = spanned_rows(linears)
    if span is None:
        return None
    rows, n_out, slices = span
    first = linears[0]
    if first.numerics == "ggml":
        kernel = bound_matvec_slices(first.ggml_type, rows, n_out)
    else:
        kernel = functools.partial(MATVEC_SLICES_KERNELS[first.ggml_type], rows, n_out)
    if kernel is None:
        return None
    return lambda x, out: kernel(slices, x[None], out.reshape(len(slices), n_out))


class GatedFFN:
    """A dense GLU (silu) for one token: gate and up in one matvec where the file allows, into buffers."""

    def __init__(self, ffn: GLU, numerics: str):
        self.ffn, self.numerics = ffn, numerics
        n_ff = ffn.ffn_gate.n_out
        self.gate_up = np.empty(2 * n_ff, dtype=np.float32)  # (2 n_ff,): gate, then up
        self.act = np.empty(n_ff, dtype=np.float32)  # (n_ff,)
        self.out = np.empty(ffn.ffn_down.n_out, dtype=np.float32)  # (n_embd,)
        rows = paired_rows(ffn.ffn_gate, ffn.ffn_up) if ffn.ffn_gate.matvec is not None else None
        self.both = None if rows is None else bound_matvec(ffn.ffn_gate.ggml_type, rows, ffn.ffn_gate.numerics)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n_embd,) -> (n_embd,), a buffer that the next call overwrites."""
        f, n_ff = self.ffn, self.act.shape[0]
        gate, up = self.gate_up[:n_ff], self.gate_up[n_ff:]
        if self.both is not None:
            self.both(x, self.gate_up)
        else:
            project(f.ffn_gate, x, gate)
            project(f.ffn_up, x, up)
        (ops_ggml.swiglu_row if self.numerics == "ggml" else ops_exact.swiglu_row)(gate, up, self.act)
        return project(f.ffn_down, self.act, self.out)


def project(linear: Linear, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """linear(x) for one token into out: x (n_in,) and out (n_out,) float32, C-contiguous."""
    if linear.matvec is not None:
        linear.matvec(x, out)
    else:
        out[:] = linear(x[None])[0]
    return out


class OneTokenLayers:
    """Every pre-norm layer of a model (DecoderModel.layer: attention, then a GLU or MoE FFN) for one token.
    `attention(il, weights, x (n_embd,) normed, position, cache)` gives the layer's attention output
    (n_embd,): the llama family's GQAOneToken by default, deepseek2's MLA otherwise."""

    def __init__(self, model, attention=None):
        c = model.config
        self.model = model
        self.eps = np.float32(c.norm_eps)
        self.ggml = model.numerics == "ggml"
        self.x = np.empty(c.n_embd, dtype=np.float32)  # (n_embd,) the residual stream
        self.normed = np.empty(c.n_embd, dtype=np.float32)  # (n_embd,) a norm's output
        self.attention = attention if attention is not None else GQAOneToken(model)
        self.ffns = [GatedFFN(layer.ffn, model.numerics) if is_silu_glu(layer.ffn) else None for layer in model.layers]

    @staticmethod
    def supports(model) -> bool:
        """Float32 (the float64 oracle keeps the layer-by-layer pass)."""
        return model.dtype == np.float32

    def usable(self, cache: KVCache) -> bool:
        """The fused attention's cache: F16 in numerics ggml (decode_attention_ggml), float32 in exact."""
        return cache.layers[0].k.dtype == (np.float16 if self.ggml else np.float32)

    def __call__(self, x: np.ndarray, position: int, cache: KVCache) -> np.ndarray:
        """x (1, n_embd) the token's embedding -> (1, n_embd) the last layer's output."""
        m, eps = self.model, self.eps
        add_rms_norm = ops_ggml.add_rms_norm if self.ggml else ops_exact.add_rms_norm
        rms_norm_row = ops_ggml.rms_norm_row if self.ggml else ops_exact.rms_norm_row
        stream, normed = self.x, self.normed
        stream[:] = x[0]
        pending = None  # the last FFN's output, added into the stream as the next norm reads it
        for il, layer in enumerate(m.layers):
            if pending is None:
                rms_norm_row(stream, layer.attn_norm, eps, normed)
            else:
                add_rms_norm(stream, pending, layer.attn_norm, eps, stream, normed)
            attn = self.attention(il, layer.attn, normed, position, cache)
            add_rms_norm(stream, attn, layer.ffn_norm, eps, stream, normed)
            ffn = self.ffns[il]
            pending = ffn(normed) if ffn is not None else m.ffn(layer.ffn, normed[None], il)[0]
        return (stream + pending)[None]


class GQAOneToken:
    """The llama family's self_attention for one token, into buffers allocated once."""

    def __init__(self, model):
        c = model.config
        self.model = model
        self.ggml = model.numerics == "ggml"
        n_q, n_kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        self.qkv = np.empty(n_q + 2 * n_kv, dtype=np.float32)  # q, k, v side by side (bound_spanned's output)
        self.q = self.qkv[:n_q].reshape(c.n_head, c.head_dim)  # (n_head, head_dim)
        self.k = self.qkv[n_q : n_q + n_kv].reshape(c.n_head_kv, c.head_dim)  # (n_head_kv, head_dim)
        self.v = self.qkv[n_q + n_kv :].reshape(c.n_head_kv, c.head_dim)  # (n_head_kv, head_dim)
        self.out = np.empty(c.n_embd, dtype=np.float32)  # (n_embd,)
        # each layer's q, k and v in one call, where the file allows (None: three matvecs)
        self.qkv_of = [bound_spanned([a.attn_q, a.attn_k, a.attn_v]) for a in (layer.attn for layer in model.layers)]

    def __call__(self, il: int, w, x: np.ndarray, position: int, cache: KVCache) -> np.ndarray:
        """x (n_embd,) normed -> (n_embd,), a buffer the next layer overwrites."""
        m, c = self.model, self.model.config
        q, k, v = self.q, self.k, self.v
        qkv = self.qkv_of[il]
        if qkv is not None:
            qkv(x, self.qkv)
        else:
            project(w.attn_q, x, q.reshape(-1))
            project(w.attn_k, x, k.reshape(-1))
            project(w.attn_v, x, v.reshape(-1))
        if w.bias_q is not None:
            q += w.bias_q.reshape(q.shape)
            k += w.bias_k.reshape(k.shape)
            v += w.bias_v.reshape(v.shape)
        attend = decode_attention_ggml if self.ggml else decode_attention_exact
        layer = cache.layers[il]
        out = attend(q, k, v, layer, position, c.rope, m.attn_scale, w.attn_q_norm, w.attn_k_norm, c.norm_eps)
        return project(w.attn_output, out.reshape(-1), self.out)


def is_silu_glu(ffn) -> bool:
    return isinstance(ffn, GLU) and ffn.activation == "silu"
