"""deepseek2: DeepSeek-V2, V3 and R1. Multi-head latent attention (MLA), then a dense FFN in the
first leading_dense_block_count layers and a mixture of experts with shared experts in the rest.

    x = x + attn_output(MLA(attn_norm(x)))
    x = x + ffn(ffn_norm(x))                       ffn: GLU (SwiGLU), or MoE (refengine/arch/moe.py)

MLA, in the absorbed form of llama.cpp's llm_build_deepseek2 (MQA over the latent). Each position
is compressed to one latent and one rope key shared by all heads, and only those two are cached:

    latent   = attn_kv_a_norm(attn_kv_a_mqa(x)[:kv_lora_rank])           (n_tok, kv_lora_rank)
    k_pe     = rope(attn_kv_a_mqa(x)[kv_lora_rank:])                      (n_tok, qk_rope_dim)
    q        = attn_q_b(attn_q_a_norm(attn_q_a(x)))  or  attn_q(x)        per head: [q_nope; q_pe]
    q_latent = attn_k_b[h] @ q_nope[h]                                    q_nope absorbed into latent space
    score    = (q_latent . latent + rope(q_pe) . k_pe) * attn_scale       over all cached positions
    out[h]   = attn_v_b[h] @ (softmax(score) @ latent)                    (n_tok, n_head, v_head_dim)

which is the attention of keys [attn_k_b[h].T @ latent; k_pe] and values attn_v_b[h] @ latent,
never built. Prefill and decode take the same path. Older files store attn_kv_b (per head the k
rows, then the v rows, applied to the latent) instead of attn_k_b and attn_v_b; attn_v_b is then a
view of its v rows, and attn_k_b, which needs the k rows transposed, is cut from it into memory
once at load, as convert_hf_to_gguf cuts it for newer files (float32: 32 MiB a layer at
DeepSeek-R1's sizes, the one copy of a weight this engine makes).

RoPE is llama.cpp's NORM mode (adjacent pairs) on the last qk_rope_dim dims of each q head and on
k_pe, with YaRN scaling (refengine.nn.YaRN) when rope.scaling.type is "yarn".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from gguf import GGMLQuantizationType

from refengine.arch.common import DecoderConfig, DecoderModel, HParams, ModelError
from refengine.arch.decode import OneTokenLayers, project
from refengine.arch.moe import MoEConfig
from refengine.gguf import GGUFFile, Tensor
from refengine.kernels import attention_ggml as ggml_attention
from refengine.kernels import bound_matvec_slices, ops_ggml
from refengine.nn import KVCache, LayerCache, Linear, Rope, YaRN, attention, attention_ggml, lazy_zeros, rms_norm

# convert_hf_to_gguf writes yarn_log_multiplier as 0.1 * mscale_all_dim; llama.cpp divides it back
# out (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX).
YARN_LOG_MUL_SCALE = 0.1


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature for a context `factor` times longer (llama.cpp's get_mscale)."""
    return 1.0 if factor <= 1 else 1 + 0.1 * mscale * math.log(factor)


def rope_and_scale(hp: HParams, n_rot: int, head_k: int, n_ctx_train: int) -> tuple[Rope, float]:
    """The rope and the attention's kq_scale, from the rope keys as llama.cpp reads them for deepseek2:
    llama_context's yarn_attn_factor, ggml's rope_yarn, then llm_build_deepseek2's kq_scale."""
    arch, path = hp.arch, hp.gguf.path
    base = hp.float("rope.freq_base", 10000.0, minimum=1.0, above=True)  # YaRN divides by log(base)
    if hp.float("rope.scaling.attn_factor", 1.0) != 1.0:
        raise ModelError(f"{path}: {arch}.rope.scaling.attn_factor other than 1 is not supported")
    scaling = hp.str("rope.scaling.type", "none")
    if scaling not in ("none", "yarn"):
        raise ModelError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported (none or yarn)")
    factor = hp.float("rope.scaling.factor", 1.0, minimum=0.0, above=True) if scaling == "yarn" else 1.0
    if factor <= 1:
        return Rope(n_rot, base, neox=False), 1 / math.sqrt(head_k)
    log_mul = hp.float("rope.scaling.yarn_log_multiplier", 0.0) / YARN_LOG_MUL_SCALE  # mscale_all_dim
    # With a log multiplier, DeepSeek's mscale equals mscale_all_dim and the two cancel: cos and sin
    # keep their size. Without one, they grow by yarn_mscale(factor, 1).
    magnitude = 1.0 if log_mul else yarn_mscale(factor, 1.0)
    yarn = YaRN(
        factor=factor,
        n_ctx_orig=hp.int("rope.scaling.original_context_length", n_ctx_train, minimum=1),
        beta_fast=hp.float("rope.scaling.yarn_beta_fast", 32.0, minimum=0.0, above=True),
        beta_slow=hp.float("rope.scaling.yarn_beta_slow", 1.0, minimum=0.0, above=True),
        magnitude=magnitude,
    )
    # The temperature is applied to the scores, once for q and once for k (HF: softmax_scale * mscale**2).
    mscale = magnitude * yarn_mscale(factor, log_mul)
    return Rope(n_rot, base, neox=False, yarn=yarn), mscale * mscale / math.sqrt(head_k)


def ggml_scales(rope: Rope, log_mul_key: float, head_k: int) -> tuple[Rope, float]:
    """The rope and kq_scale as llama.cpp computes them in float32 (numerics ggml): llama_context's
    yarn_attn_factor, the attn_factor it passes ggml_rope_ext, then llm_build_deepseek2's
    mscale = attn_factor_org * (1 + 0.1 log_mul ln(1/freq_scale)) and kq_scale = mscale^2 / sqrtf(head_k)."""
    f = np.float32

    def ln(x):
        return f(ops_ggml.logf(f(x)))

    if rope.yarn is None:
        return rope, float(f(1) / np.sqrt(f(head_k)))
    freq_scale = f(1) / f(rope.yarn.factor)
    factor = f(1) / freq_scale
    log_mul = f(log_mul_key) / f(0.1) if log_mul_key else f(0)  # TAG_DEEPSEEK2_YARN_LOG_MUL_FIX

    def get_mscale(scale, m):
        return f(1) if scale <= f(1) else f(0.1) * m * ln(scale) + f(1)

    if log_mul != f(0):
        mscale_all_dims = log_mul
        attn_factor = get_mscale(factor, mscale_all_dims if mscale_all_dims != f(1) else f(1))
        attn_factor = attn_factor / get_mscale(factor, mscale_all_dims)
    else:
        attn_factor = get_mscale(factor, f(1))
    attn_factor = attn_factor * (f(1) / (f(1) + f(0.1) * ln(factor)))
    attn_factor_org = attn_factor * (f(1) + f(0.1) * ln(f(1) / freq_scale))
    mscale = attn_factor_org * (f(1) + f(0.1) * log_mul * ln(f(1) / freq_scale))
    kq_scale = f(1) * mscale * mscale / np.sqrt(f(head_k))
    return replace(rope, yarn=replace(rope.yarn, attn_factor=float(attn_factor))), float(kq_scale)


@dataclass(frozen=True)
class Deepseek2Config(DecoderConfig):
    q_lora_rank: int  # 0: one attn_q instead of attn_q_a -> attn_q_a_norm -> attn_q_b
    kv_lora_rank: int  # width of the latent each position caches
    qk_nope_dim: int  # per q head: the dims without rope, then...
    qk_rope_dim: int  # ...those with it (rope.dimension_count), matched by k_pe, one for all heads
    v_head_dim: int
    mla_split: bool  # attn_k_b and attn_v_b (key_length_mla / value_length_mla keys); False: attn_kv_b
    n_leading_dense: int  # leading_dense_block_count: layers with a dense FFN before the MoE ones
    rope: Rope
    attn_scale: float  # kq_scale: 1/sqrt(qk_nope_dim + qk_rope_dim), times YaRN's mscale squared
    moe: MoEConfig

    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile) -> Deepseek2Config:
        hp = HParams(gguf_file)
        # llama.cpp's is_mla(): the *_mla keys give the head sizes after decompression; without them
        # (older files) key_length and value_length are those sizes.
        mla_split = bool(hp.int("attention.key_length_mla", 0) and hp.int("attention.value_length_mla", 0))
        suffix = "_mla" if mla_split else ""
        head_k = hp.int(f"attention.key_length{suffix}", minimum=1)
        n_rot = hp.int("rope.dimension_count")
        if not 0 < n_rot < head_k or n_rot % 2:
            raise ModelError(
                f"{gguf_file.path}: {hp.arch}.rope.dimension_count ({n_rot}) must be even and below "
                f"{hp.arch}.attention.key_length{suffix} ({head_k})"
            )
        keys = cls.read_keys(hp)  # n_ff: the leading dense layers' feed-forward
        rope, attn_scale = rope_and_scale(hp, n_rot, head_k, keys["n_ctx_train"])
        n_leading_dense = hp.int("leading_dense_block_count", 0)
        if n_leading_dense > keys["n_layer"]:
            problem = f"is {n_leading_dense}, more than block_count ({keys['n_layer']})"
            raise hp.fail("leading_dense_block_count", problem)
        return cls(
            **keys,
            q_lora_rank=hp.int("attention.q_lora_rank", 0),
            kv_lora_rank=hp.int("attention.kv_lora_rank", minimum=1),
            qk_nope_dim=head_k - n_rot,
            qk_rope_dim=n_rot,
            v_head_dim=hp.int(f"attention.value_length{suffix}", minimum=1),
            mla_split=mla_split,
            n_leading_dense=n_leading_dense,
            rope=rope,
            attn_scale=attn_scale,
            moe=MoEConfig.from_gguf(hp, hp.int("expert_feed_forward_length"), routing_keys=True),
        )

    @property
    def q_head(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    @property
    def n_rot(self) -> int:
        return self.qk_rope_dim


def mla_cache(n_layer: int, n_ctx: int, kv_lora_rank: int, n_rot: int, dtype) -> KVCache:
    """MLA's compressed cache: per layer and position the latent, then the rope key, side by side as
    llama.cpp's K cache keeps them; the values are a view of the latent part, as llama.cpp's V."""
    layers = []
    for _ in range(n_layer):
        kv = lazy_zeros((1, n_ctx, kv_lora_rank + n_rot), dtype)  # (1 head, n_ctx, kv_lora_rank + n_rot)
        layers.append(LayerCache(kv, kv[..., :kv_lora_rank]))  # values: (1, n_ctx, kv_lora_rank), a view
    return KVCache(layers, n_ctx)


def per_head(heads: list[Linear], x: np.ndarray, all_heads: Callable | None = None) -> np.ndarray:
    """Each head's own matrix on its slice: (n_tok, n_head, n_in) -> (n_tok, n_head, n_out). One token with
    all_heads (ggml numerics: the heads' slices in one call, the same numbers)."""
    if all_heads is not None and x.shape[0] == 1:
        out = np.empty((1, len(heads), heads[0].n_out), dtype=np.float32)
        all_heads(np.arange(len(heads)), np.ascontiguousarray(x[0]), out[0])
        return out
    return np.stack([w(x[:, h]) for h, w in enumerate(heads)], axis=1)


def k_b_from_kv_b(kv_b: Tensor, c: Deepseek2Config) -> Tensor:
    """An older file's attention as attn_k_b: per head attn_kv_b's k rows (qk_nope_dim, kv_lora_rank),
    transposed, as convert_hf_to_gguf cuts it for newer files. In memory as F32, the values exactly:
    (n_head, kv_lora_rank, qk_nope_dim)."""
    kv = kv_b.to_numpy().reshape(c.n_head, c.qk_nope_dim + c.v_head_dim, c.kv_lora_rank)
    k_b = np.ascontiguousarray(kv[:, : c.qk_nope_dim].transpose(0, 2, 1))  # (n_head, kv_lora_rank, qk_nope_dim)
    rows = k_b.reshape(-1, c.qk_nope_dim).view(np.uint8)  # (n_head * kv_lora_rank, 4 * qk_nope_dim)
    rows.flags.writeable = False
    return Tensor(f"{kv_b.name}[k rows, transposed]", GGMLQuantizationType.F32, k_b.shape, rows, kv_b.path, -1)


@dataclass
class MLAWeights:
    attn_kv_a_mqa: Linear  # (kv_lora_rank + qk_rope_dim, n_embd)
    attn_kv_a_norm: np.ndarray  # (kv_lora_rank,)
    attn_k_b: list[Linear]  # per head (kv_lora_rank, qk_nope_dim): q_nope -> latent space
    attn_v_b: list[Linear]  # per head (v_head_dim, kv_lora_rank): latent -> value
    attn_output: Linear  # (n_embd, n_head * v_head_dim)
    attn_q: Linear | None = None  # (n_head * q_head, n_embd), when q_lora_rank is 0
    attn_q_a: Linear | None = None  # (q_lora_rank, n_embd)
    attn_q_a_norm: np.ndarray | None = None  # (q_lora_rank,)
    attn_q_b: Linear | None = None  # (n_head * q_head, q_lora_rank)
    attn_kv_b: Linear | None = None  # (n_head * (qk_nope_dim + v_head_dim), kv_lora_rank), the older layout
    # ggml numerics, decoding: every head of attn_k_b / attn_v_b in one call, f(heads, x, out) (bound_matvec_slices)
    k_b_heads: Callable | None = None
    v_b_heads: Callable | None = None

    @classmethod
    def load(cls, t: dict[str, Tensor | None], c: Deepseek2Config, dtype, numerics: str = "exact") -> MLAWeights:
        """From a layer's tensors by role (Architecture.tensors_of: the layout's, shapes checked)."""
        kv_lora, nope, v_dim = c.kv_lora_rank, c.qk_nope_dim, c.v_head_dim
        if c.mla_split:
            k_b, v_b = t["attn_k_b"], t["attn_v_b"]  # (n_head, kv_lora, nope), (n_head, v_dim, kv_lora)
            v_rows = [slice(h * v_dim, (h + 1) * v_dim) for h in range(c.n_head)]
        else:
            kv_b = t["attn_kv_b"]  # (n_head * (nope + v_dim), kv_lora)
            k_b, v_b = (kv_b, kv_b) if numerics == "ggml" else (k_b_from_kv_b(kv_b, c), kv_b)
            v_rows = [slice(h * (nope + v_dim) + nope, (h + 1) * (nope + v_dim)) for h in range(c.n_head)]
        w = cls(
            attn_kv_a_mqa=Linear(t["attn_kv_a_mqa"], None, numerics),
            attn_kv_a_norm=t["attn_kv_a_norm"].to_numpy().astype(dtype),
            attn_k_b=[Linear(k_b, slice(h * kv_lora, (h + 1) * kv_lora), numerics) for h in range(c.n_head)]
            if c.mla_split or numerics != "ggml"
            else [],
            attn_v_b=[Linear(v_b, rows, numerics) for rows in v_rows],
            attn_output=Linear(t["attn_output"], None, numerics),
        )
        if not c.mla_split:
            w.attn_kv_b = Linear(kv_b, None, numerics)
        elif numerics == "ggml":  # 3-D weights that llama.cpp multiplies by mul_mat, so never repacked
            w.k_b_heads = bound_matvec_slices(k_b.ggml_type, k_b.data, kv_lora, repacked=False)
            w.v_b_heads = bound_matvec_slices(v_b.ggml_type, v_b.data, v_dim, repacked=False)
        if c.q_lora_rank:
            w.attn_q_a = Linear(t["attn_q_a"], None, numerics)
            w.attn_q_a_norm = t["attn_q_a_norm"].to_numpy().astype(dtype)
            w.attn_q_b = Linear(t["attn_q_b"], None, numerics)
        else:
            w.attn_q = Linear(t["attn_q"], None, numerics)
        return w


class MLABuffers:
    """One token's MLA intermediates (numerics ggml, attn_k_b / attn_v_b), allocated once per model."""

    def __init__(self, c: Deepseek2Config):
        f32 = np.float32
        self.heads = np.arange(c.n_head)  # every head's slice of attn_k_b and attn_v_b
        self.q_a = np.empty(max(c.q_lora_rank, 1), dtype=f32)  # (q_lora_rank,)
        self.q_a_normed = np.empty(max(c.q_lora_rank, 1), dtype=f32)
        self.q = np.empty((c.n_head, c.q_head), dtype=f32)  # (n_head, nope + rope)
        self.kv = np.empty((1, c.kv_lora_rank + c.qk_rope_dim), dtype=f32)  # (1, kv_lora + rope)
        self.q_nope = np.empty((c.n_head, c.qk_nope_dim), dtype=f32)
        self.q_latent = np.empty((c.n_head, c.kv_lora_rank), dtype=f32)
        self.q_full = np.empty((c.n_head, c.kv_lora_rank + c.qk_rope_dim), dtype=f32)  # [q_latent; rope(q_pe)]
        self.values = np.empty((c.n_head, c.v_head_dim), dtype=f32)
        self.out = np.empty(c.n_embd, dtype=f32)


class Deepseek2(DecoderModel):
    def __init__(self, gguf_file: GGUFFile, dtype=np.float32, numerics: str = "exact"):
        c = Deepseek2Config.from_gguf(gguf_file)
        super().__init__(gguf_file, c, dtype, numerics)
        n = self.numerics
        self.rope, self.attn_scale = c.rope, c.attn_scale
        if n == "ggml":  # llama.cpp's float32 set-up of YaRN and of kq_scale
            log_mul = HParams(gguf_file).float("rope.scaling.yarn_log_multiplier", 0.0)
            self.rope, self.attn_scale = ggml_scales(c.rope, log_mul, c.q_head)
        self.layers = self.load_layers(lambda t: MLAWeights.load(t, c, self.dtype, n))
        self.mla_buffers = MLABuffers(c) if n == "ggml" and c.mla_split else None  # decoding's, allocated once
        if OneTokenLayers.supports(self):
            self.one_token_layers = OneTokenLayers(self, self.attention_one_token)

    def new_cache(self, n_ctx: int) -> KVCache:
        c = self.config
        if self.numerics == "ggml" and not c.mla_split:  # llama.cpp's older layout: multi-head K and V caches
            windows = [0] * c.n_layer
            return KVCache.for_heads(n_ctx, c.n_head, c.q_head, c.v_head_dim, self.cache_dtype, windows, self.n_ubatch)
        return mla_cache(c.n_layer, n_ctx, c.kv_lora_rank, c.qk_rope_dim, self.cache_dtype)

    def attention(self, il: int, x, positions, cache: KVCache) -> np.ndarray:
        """MLA over the compressed cache (see the module docstring): (n_tok, n_embd) -> (n_tok, n_embd).
        In ggml numerics, a file of the older layout takes llama.cpp's path for it instead: keys and values
        decompressed by attn_kv_b and attended as multi-head attention (attention_mha)."""
        c, w, n_tok, n = self.config, self.layers[il].attn, x.shape[0], self.numerics
        if w.attn_q is not None:
            q = w.attn_q(x)
        else:
            q = w.attn_q_b(rms_norm(w.attn_q_a(x), w.attn_q_a_norm, c.norm_eps, n))  # (n_tok, n_head * q_head)
        q = q.reshape(n_tok, c.n_head, c.q_head)
        q_nope, q_pe = q[..., : c.qk_nope_dim], q[..., c.qk_nope_dim :]  # (n_tok, n_head, nope), (..., rope)

        kv = w.attn_kv_a_mqa(x)  # (n_tok, kv_lora_rank + qk_rope_dim)
        latent = self.emit("kv_cmpr", rms_norm(kv[:, : c.kv_lora_rank], w.attn_kv_a_norm, c.norm_eps, n), il)
        k_pe = self.emit("k_pe", self.rope.apply(kv[:, None, c.kv_lora_rank :], positions, n), il)  # (n_tok, 1, rope)
        q_pe = self.rope.apply(q_pe, positions, n)  # (n_tok, n_head, rope)
        layer, first = cache.layers[il], int(positions[0])
        if n == "ggml" and not c.mla_split:
            return self.attention_mha(w, q_nope, q_pe, latent, k_pe, layer, first, il)
        # One key/value head for all query heads: keys [latent; k_pe], values the latent.
        layer.store(first, np.concatenate([latent[:, None], k_pe], axis=-1), None)  # (n_tok, 1, kv_lora + rope)

        q_latent = per_head(w.attn_k_b, q_nope, w.k_b_heads)  # (n_tok, n_head, kv_lora_rank)
        q = np.concatenate([q_latent, q_pe], axis=-1)  # (n_tok, n_head, kv_lora + rope)
        attend = attention_ggml if n == "ggml" else attention
        out = attend(q, layer, first, self.attn_scale)  # (n_tok, n_head, kv_lora_rank)
        out = per_head(w.attn_v_b, out, w.v_b_heads)  # (n_tok, n_head, v_head_dim)
        out = self.emit("kqv_out", out.reshape(n_tok, c.n_head * c.v_head_dim), il)
        return w.attn_output(out)

    def attention_one_token(self, il: int, w: MLAWeights, x: np.ndarray, position: int, cache: KVCache) -> np.ndarray:
        """attention() of one token, as arch/decode.py's OneTokenLayers calls it: x (n_embd,) -> (n_embd,). In
        numerics ggml with attn_k_b and attn_v_b, what lies between the projections is one kernel call
        (attention_ggml.mla_prepare: the latent's norm, both ropes, the cache store) and every head of
        attn_k_b and attn_v_b one call each, into buffers: the same operations as attention(), to the bit."""
        b = self.mla_buffers
        if b is None or w.k_b_heads is None or w.v_b_heads is None:
            return self.attention(il, x[None], np.array([position]), cache)[0]
        c, eps = self.config, np.float32(self.config.norm_eps)
        if w.attn_q is not None:
            project(w.attn_q, x, b.q.reshape(-1))
        else:
            project(w.attn_q_a, x, b.q_a)
            ops_ggml.rms_norm_row(b.q_a, w.attn_q_a_norm, eps, b.q_a_normed)
            project(w.attn_q_b, b.q_a_normed, b.q.reshape(-1))
        project(w.attn_kv_a_mqa, x, b.kv.reshape(-1))
        layer = cache.layers[il]
        cos, sin = self.rope.ggml_tables(np.array([position]))  # (1, n_rot / 2)
        ggml_attention.mla_prepare(
            b.q, b.kv, w.attn_kv_a_norm, eps, cos[0], sin[0], c.qk_rope_dim, self.rope.neox,
            layer.k.view(np.uint16), position % layer.n_slots, b.q_nope, b.q_full,
        )  # fmt: skip
        w.k_b_heads(b.heads, b.q_nope, b.q_latent)  # (n_head, kv_lora_rank): q_nope absorbed
        b.q_full[:, : c.kv_lora_rank] = b.q_latent
        out = attention_ggml(b.q_full[None], layer, position, self.attn_scale)[0]  # (n_head, kv_lora_rank)
        w.v_b_heads(b.heads, out, b.values)  # (n_head, v_head_dim)
        return project(w.attn_output, b.values.reshape(-1), b.out)

    def attention_mha(self, w: MLAWeights, q_nope, q_pe, latent, k_pe, layer: LayerCache, first: int, il: int):
        """llm_build_deepseek2 without MLA (a file with attn_kv_b): every head's keys [k_nope; k_pe] and values
        decompressed from the latent by attn_kv_b, cached and attended as multi-head attention (ggml numerics)."""
        c, n_tok = self.config, latent.shape[0]
        kv = w.attn_kv_b(latent).reshape(n_tok, c.n_head, c.qk_nope_dim + c.v_head_dim)  # (n_tok, n_head, nope + v)
        k_pe = np.broadcast_to(k_pe, (n_tok, c.n_head, c.qk_rope_dim))
        k = np.concatenate([kv[..., : c.qk_nope_dim], k_pe], axis=-1)  # (n_tok, n_head, q_head)
        layer.store(first, k, kv[..., c.qk_nope_dim :])
        q = np.concatenate([q_nope, q_pe], axis=-1)  # (n_tok, n_head, q_head)
        out = attention_ggml(q, layer, first, self.attn_scale)  # (n_tok, n_head, v_head_dim)
        out = self.emit("kqv_out", out.reshape(n_tok, c.n_head * c.v_head_dim), il)
        return w.attn_output(out)
