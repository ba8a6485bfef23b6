"""The llama family: llama (SmolLM2, Llama 2/3), qwen2 (attention biases), qwen3 (QK-norm), and
with a mixture of experts in every layer, mixtral (llama with expert_count) and qwen3moe.

x = x + attn_output(attention(rope(attn_q(norm(x))), rope(attn_k(norm(x))), attn_v(norm(x))))
x = x + ffn_down(silu(ffn_gate(norm(x))) * ffn_up(norm(x)))      or   x + MoE(norm(x))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refengine.arch.common import (
    AttentionWeights,
    DecoderModel,
    GQAConfig,
    HParams,
    ModelError,
    check_shape,
    kq_scale,
    layer_tensors,
    load_attention,
    norm_weight,
    read_rope_dims,
    self_attention,
)
from refengine.arch.moe import MoE, MoEConfig
from refengine.gguf import GGUFFile
from refengine.nn import Linear, Rope, rms_norm, swiglu

# llama.cpp rotates adjacent pairs for llama (the converter permutes Q/K to match) and halves for qwen.
NEOX_ROPE = {"llama": False, "qwen2": True, "qwen3": True, "qwen3moe": True}


@dataclass(frozen=True)
class LlamaConfig(GQAConfig):
    rope: Rope
    moe: MoEConfig | None = None  # experts in every layer (mixtral, qwen3moe) instead of the dense FFN

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> LlamaConfig:
        hp = HParams(gguf)
        keys = cls.read_keys(hp)
        n_rot = read_rope_dims(hp, keys["head_dim"])
        rope = Rope(
            n_dims=n_rot,
            base=hp.float("rope.freq_base", 10000.0, minimum=0.0, above=True),
            neox=NEOX_ROPE[hp.arch],
            # linear scaling divides positions by the factor (llama.cpp's freq_scale = 1 / factor)
            scale=hp.float("rope.scaling.factor", 1.0, minimum=0.0, above=True)
            if hp.str("rope.scaling.type", "none") == "linear"
            else 1.0,
            freq_factors=read_freq_factors(gguf, n_rot),
        )
        moe = None
        if hp.arch == "qwen3moe" or hp.int("expert_count", 0):
            # llama.cpp's llama (mixtral) experts are feed_forward_length wide; qwen3moe's have their own key.
            n_ff_exp = hp.int("expert_feed_forward_length" if hp.arch == "qwen3moe" else "feed_forward_length")
            moe = MoEConfig.from_gguf(hp, n_ff_exp, routing_keys=False)
        return cls(**keys, rope=rope, moe=moe)


def read_freq_factors(gguf: GGUFFile, n_rot: int) -> np.ndarray | None:
    """rope_freqs.weight, llama3's rope scaling precomputed by the converter: one positive divisor per
    rotated pair, (n_rot/2,)."""
    t = gguf.tensors.get("rope_freqs.weight")
    if t is None:
        return None
    factors = check_shape(t, (n_rot // 2,)).to_numpy()
    if not (np.isfinite(factors) & (factors > 0)).all():
        raise ModelError(f"{gguf.path}: rope_freqs.weight holds values that are not positive finite numbers")
    return factors


@dataclass
class LlamaLayer:
    attn_norm: np.ndarray  # (n_embd,)
    attn: AttentionWeights
    ffn_norm: np.ndarray  # (n_embd,)
    ffn_gate: Linear | None = None  # (n_ff, n_embd)
    ffn_up: Linear | None = None  # (n_ff, n_embd)
    ffn_down: Linear | None = None  # (n_embd, n_ff)
    ffn_moe: MoE | None = None  # instead of the three above when the model has experts


class Llama(DecoderModel):
    def __init__(self, gguf: GGUFFile, dtype=np.float32, numerics: str = "exact"):
        c = LlamaConfig.from_gguf(gguf)
        super().__init__(gguf, c, dtype, numerics)
        n = self.numerics
        self.attn_scale = kq_scale(self, c.head_dim)
        self.layers = []
        for il in range(c.n_layer):
            t = layer_tensors(gguf, il, ["attn_norm", "ffn_norm"])
            w = LlamaLayer(
                attn_norm=norm_weight(t["attn_norm"], c.n_embd, self.dtype),
                attn=load_attention(gguf, il, c, self.dtype, n),
                ffn_norm=norm_weight(t["ffn_norm"], c.n_embd, self.dtype),
            )
            if c.moe is not None:
                w.ffn_moe = MoE(gguf, il, c.moe, c.n_embd, self.dtype, n)
            else:
                f = layer_tensors(gguf, il, ["ffn_gate", "ffn_up", "ffn_down"])
                w.ffn_gate = Linear(check_shape(f["ffn_gate"], (c.n_ff, c.n_embd)), numerics=n)
                w.ffn_up = Linear(check_shape(f["ffn_up"], (c.n_ff, c.n_embd)), numerics=n)
                w.ffn_down = Linear(check_shape(f["ffn_down"], (c.n_embd, c.n_ff)), numerics=n)
            self.layers.append(w)

    def layer(self, il, x, positions, cache):
        c, w, n = self.config, self.layers[il], self.numerics
        h = self.emit("attn_norm", rms_norm(x, w.attn_norm, c.norm_eps, n), il)  # (n_tok, n_embd)
        x = self.emit("ffn_inp", x + self_attention(self, w.attn, h, positions, cache, il, c.rope, self.attn_scale), il)
        h = self.emit("ffn_norm", rms_norm(x, w.ffn_norm, c.norm_eps, n), il)
        if w.ffn_moe is not None:
            return x + self.emit("ffn_moe_out", w.ffn_moe(h, self.emit, il), il)  # (n_tok, n_embd)
        return x + self.emit("ffn_out", w.ffn_down(swiglu(w.ffn_gate(h), w.ffn_up(h), n)), il)  # (n_tok, n_embd)
