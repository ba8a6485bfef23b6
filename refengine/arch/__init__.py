"""Architectures, chosen from `general.architecture` through one small table."""

from __future__ import annotations

import numpy as np

from refengine.arch.common import DecoderModel, ModelError
from refengine.arch.deepseek2 import Deepseek2
from refengine.arch.gemma3 import Gemma3
from refengine.arch.llama import Llama
from refengine.gguf import GGUFFile

ARCHITECTURES: dict[str, type[DecoderModel]] = {
    "llama": Llama,  # and mixtral, which is llama with expert_count
    "qwen2": Llama,
    "qwen3": Llama,
    "qwen3moe": Llama,
    "gemma3": Gemma3,
    "deepseek2": Deepseek2,
}


def load_model(gguf: GGUFFile, dtype=np.float32, numerics: str = "exact") -> DecoderModel:
    """The file's model computing in `dtype`, float32 or float64, with `numerics` "exact" or "ggml"
    (llama.cpp's CPU arithmetic; float32 only): see refengine.nn.NUMERICS."""
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise ModelError(f"{gguf.path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](gguf, dtype, numerics)
