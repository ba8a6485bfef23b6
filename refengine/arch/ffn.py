"""The dense feed-forward block every architecture shares: a gated linear unit (llama.cpp's build_ffn with
LLM_FFN_PAR), its activation a parameter.

    out = ffn_down(act(ffn_gate(x)) * ffn_up(x))      act: silu (SwiGLU) or gelu_tanh (gemma3's GEGLU)

A layer's `ffn` is a GLU or a refengine.arch.moe.MoE, whose experts and shared experts are GLUs too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refengine.gguf import Tensor
from refengine.nn import Linear, geglu, swiglu

# act(gate) * up, (n_tok, n) each, in the given numerics
GATED = {"silu": swiglu, "gelu": geglu}


@dataclass
class GLU:
    ffn_gate: Linear  # (n_ff, n_embd)
    ffn_up: Linear  # (n_ff, n_embd)
    ffn_down: Linear  # (n_embd, n_ff)
    activation: str = "silu"

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor | None], numerics: str, activation: str = "silu", suffix: str = ""
    ) -> GLU:
        """ffn_{gate,up,down}{suffix} of a layer's tensors (Architecture.tensors_of): suffix "_shexp" for
        the shared experts."""
        gate, up, down = (tensors[f"ffn_{p}{suffix}"] for p in ("gate", "up", "down"))
        return cls(
            Linear(gate, numerics=numerics), Linear(up, numerics=numerics), Linear(down, numerics=numerics), activation
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n_tok, n_embd) -> (n_tok, n_embd), in the numerics of its weights."""
        return glu(self.ffn_gate, self.ffn_up, self.ffn_down, x, self.activation)


def glu(ffn_gate: Linear, ffn_up: Linear, ffn_down: Linear, x: np.ndarray, activation: str = "silu") -> np.ndarray:
    """ffn_down(act(ffn_gate(x)) * ffn_up(x)): (n_tok, n_embd) -> (n_tok, n_embd), in the numerics of ffn_gate."""
    return ffn_down(GATED[activation](ffn_gate(x), ffn_up(x), ffn_gate.numerics))
