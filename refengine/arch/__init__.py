"""Architectures, each declared once in refengine.arch.declarations; `load_model` builds the one a file names.

Importing this package loads no numba: the model classes are imported when a model is built.
"""

from __future__ import annotations

import numpy as np

from refengine.arch.declarations import ARCHITECTURES, Architecture, architecture
from refengine.gguf import GGUFFile
from refengine.hparams import ModelError

__all__ = ["ARCHITECTURES", "Architecture", "ModelError", "architecture", "load_model"]


def load_model(gguf_file: GGUFFile, dtype=np.float32, numerics: str = "exact", cache_type: str | None = None):
    """The file's model (a refengine.arch.common.DecoderModel) computing in `dtype`, float32 or float64,
    with `numerics` "exact" or "ggml" (llama.cpp's CPU arithmetic; float32 only): see refengine.nn.NUMERICS.
    cache_type: the KV cache's in ggml numerics, f16 (the default) or f32, as llama.cpp's -ctk/-ctv."""
    model = architecture(gguf_file).model_class()(gguf_file, dtype, numerics)
    if cache_type is not None:
        model.use_cache_type(cache_type)
    return model
