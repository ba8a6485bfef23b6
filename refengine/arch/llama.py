"""The llama family: llama (SmolLM2, Llama 2/3), qwen2 (attention biases), qwen3 (QK-norm), and
with a mixture of experts in every layer, mixtral (llama with expert_count) and qwen3moe.

x = x + attn_output(attention(rope(attn_q(norm(x))), rope(attn_k(norm(x))), attn_v(norm(x))))
x = x + ffn_down(silu(ffn_gate(norm(x))) * ffn_up(norm(x)))      or   x + MoE(norm(x))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refengine.arch.common import (
    DecoderModel,
    GQAConfig,
    HParams,
    ModelError,
    check_shape,
    kq_scale,
    load_attention,
    read_rope_dims,
    self_attention,
)
from refengine.arch.declarations import architecture
from refengine.arch.decode import OneTokenLayers
from refengine.arch.moe import MoEConfig
from refengine.gguf import GGUFFile
from refengine.nn import Rope


@dataclass(frozen=True)
class LlamaConfig(GQAConfig):
    rope: Rope
    moe: MoEConfig | None = None  # experts in every layer (mixtral, qwen3moe) instead of the dense FFN

    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile) -> LlamaConfig:
        hp, arch = HParams(gguf_file), architecture(gguf_file)
        keys = cls.read_keys(hp)
        n_rot = read_rope_dims(hp, keys["head_dim"])
        rope = Rope(
            n_dims=n_rot,
            base=hp.float("rope.freq_base", 10000.0, minimum=0.0, above=True),
            neox=arch.rope_neox,
            # linear scaling divides positions by the factor (llama.cpp's freq_scale = 1 / factor)
            scale=hp.float("rope.scaling.factor", 1.0, minimum=0.0, above=True)
            if hp.str("rope.scaling.type", "none") == "linear"
            else 1.0,
            freq_factors=read_freq_factors(gguf_file, arch.tensor_name("rope_freqs"), n_rot),
        )
        moe = None
        if arch.moe == "always" or (arch.moe == "expert_count" and hp.int("expert_count", 0)):
            # llama.cpp's llama (mixtral) experts are feed_forward_length wide; qwen3moe's have their own key.
            moe = MoEConfig.from_gguf(hp, hp.int(arch.expert_ff_key), routing_keys=False)
        return cls(**keys, rope=rope, moe=moe)

    @property
    def n_rot(self) -> int:
        return self.rope.n_dims


def read_freq_factors(gguf_file: GGUFFile, name: str, n_rot: int) -> np.ndarray | None:
    """rope_freqs.weight (`name`), llama3's rope scaling precomputed by the converter: one positive divisor
    per rotated pair, (n_rot/2,). Read before the other tensors, since the rope is part of the config."""
    t = gguf_file.tensors.get(name)
    if t is None:
        return None
    factors = check_shape(t, (n_rot // 2,)).to_numpy()
    if not (np.isfinite(factors) & (factors > 0)).all():
        raise ModelError(f"{gguf_file.path}: {name} holds values that are not positive finite numbers")
    return factors


class Llama(DecoderModel):
    def __init__(self, gguf_file: GGUFFile, dtype=np.float32, numerics: str = "exact"):
        c = LlamaConfig.from_gguf(gguf_file)
        super().__init__(gguf_file, c, dtype, numerics)
        self.attn_scale = kq_scale(self, c.head_dim)
        self.layers = self.load_layers(lambda t: load_attention(t, self.dtype, self.numerics))
        if OneTokenLayers.supports(self):
            self.one_token_layers = OneTokenLayers(self)

    def attention(self, il, x, positions, cache):
        c = self.config
        return self_attention(self, self.layers[il].attn, x, positions, cache, il, c.rope, self.attn_scale)
