"""Tiny synthetic models for tests and benchmarks: `tiny` writes them as GGUF files (F32, or
Q4_K_M through llama.cpp's quantizer), `hf` maps a file to a transformers checkpoint."""

from refengine.testing.hf import to_hf_state_dict
from refengine.testing.tiny import (
    ARCHITECTURE,
    GGUF_ARCH,
    MODELS,
    MOE_MODELS,
    PRESETS,
    QTYPES,
    TinyModelError,
    TinySpec,
    check_spec,
    expected_shapes,
    make_tiny_model,
    moe_spec,
    quantize_q4_k_m,
    spec_for,
    write_tiny_model,
)

__all__ = [
    "ARCHITECTURE",
    "GGUF_ARCH",
    "MODELS",
    "MOE_MODELS",
    "PRESETS",
    "QTYPES",
    "TinyModelError",
    "TinySpec",
    "check_spec",
    "expected_shapes",
    "make_tiny_model",
    "moe_spec",
    "quantize_q4_k_m",
    "spec_for",
    "to_hf_state_dict",
    "write_tiny_model",
]
