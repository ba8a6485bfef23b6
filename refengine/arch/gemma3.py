"""gemma3: sandwich norms, QK-norm, GELU-tanh gated FFN, 5 local : 1 global attention layers.

    x = embd(tokens) * sqrt(n_embd)
    x = x + post_attention_norm(attention(attn_norm(x)))   # local layers: sliding window, rope base 10k
    x = x + post_ffw_norm(ffn_down(gelu_tanh(ffn_gate(h)) * ffn_up(h))),  h = ffn_norm(x)
    logits = token_embd @ output_norm(x)                   # tied head

The HF RMSNorm scales by (1 + w); the GGUF converter already stored 1 + w, so
every norm here is the plain x * w that llama.cpp applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from refengine.arch.common import (
    AttentionWeights,
    DecoderModel,
    GQAConfig,
    HParams,
    kq_scale,
    load_attention,
    read_rope_dims,
    self_attention,
)
from refengine.arch.declarations import architecture
from refengine.arch.ffn import GLU
from refengine.gguf import GGUFFile
from refengine.nn import Rope, rms_norm


@dataclass(frozen=True)
class Gemma3Config(GQAConfig):
    sliding_window: int
    sliding_window_pattern: int  # every PATTERN-th layer is global (the architecture's declaration)
    rope_global: Rope
    rope_local: Rope

    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile) -> Gemma3Config:
        hp, arch = HParams(gguf_file), architecture(gguf_file)
        keys = cls.read_keys(hp)
        n_rot = read_rope_dims(hp, keys["head_dim"])
        if n_rot != keys["head_dim"]:
            raise hp.fail("rope.dimension_count", f"is {n_rot}, but gemma3 rotates the whole head ({keys['head_dim']})")
        scale = 1.0
        if hp.str("rope.scaling.type", "none") == "linear":
            scale = hp.float("rope.scaling.factor", 1.0, minimum=0.0, above=True)
        base = hp.float("rope.freq_base", 1e6, minimum=0.0, above=True)
        return cls(
            **keys,
            sliding_window=hp.int("attention.sliding_window", minimum=1),
            sliding_window_pattern=arch.sliding_window_pattern,
            rope_global=Rope(n_rot, base, neox=True, scale=scale),
            rope_local=Rope(n_rot, arch.local_rope_base, neox=True),
        )

    def is_local(self, il: int) -> bool:
        return (il + 1) % self.sliding_window_pattern != 0

    @property
    def n_rot(self) -> int:
        return self.rope_global.n_dims


@dataclass
class Gemma3Layer:
    attn_norm: np.ndarray  # (n_embd,)
    attn: AttentionWeights
    post_attention_norm: np.ndarray  # (n_embd,)
    ffn_norm: np.ndarray  # (n_embd,)
    ffn: GLU  # GELU-gated
    post_ffw_norm: np.ndarray  # (n_embd,)


class Gemma3(DecoderModel):
    def __init__(self, gguf_file: GGUFFile, dtype=np.float32, numerics: str = "exact"):
        c = Gemma3Config.from_gguf(gguf_file)
        super().__init__(gguf_file, c, dtype, numerics)
        self.attn_scale = kq_scale(self, c.head_dim)  # query_pre_attn_scalar = head_dim for these sizes
        self.embd_scale = self.dtype.type(math.sqrt(c.n_embd))
        self.layers = []
        for il in range(c.n_layer):
            t = self.tensors(il)
            self.layers.append(
                Gemma3Layer(
                    attn_norm=self.norm(t["attn_norm"]),
                    attn=load_attention(t, self.dtype, self.numerics),
                    post_attention_norm=self.norm(t["post_attention_norm"]),
                    ffn_norm=self.norm(t["ffn_norm"]),
                    ffn=self.feed_forward(il),
                    post_ffw_norm=self.norm(t["post_ffw_norm"]),
                )
            )

    def embed(self, tokens):
        return super().embed(tokens) * self.embd_scale  # (n_tok, n_embd)

    def sliding_window(self, il: int) -> int:
        c = self.config
        return c.sliding_window if c.is_local(il) else 0

    def layer(self, il, x, positions, cache):
        c, w, n = self.config, self.layers[il], self.numerics
        rope = c.rope_local if c.is_local(il) else c.rope_global
        h = self.emit("attn_norm", rms_norm(x, w.attn_norm, c.norm_eps, n), il)  # (n_tok, n_embd)
        h = self_attention(self, w.attn, h, positions, cache, il, rope, self.attn_scale, scale_q=True)
        h = self.emit("attn_post_norm", rms_norm(h, w.post_attention_norm, c.norm_eps, n), il)
        x = self.emit("sa_out", x + h, il)
        h = self.emit("ffn_norm", rms_norm(x, w.ffn_norm, c.norm_eps, n), il)
        h = self.ffn(w.ffn, h, il)
        return x + self.emit("ffn_post_norm", rms_norm(h, w.post_ffw_norm, c.norm_eps, n), il)  # (n_tok, n_embd)
