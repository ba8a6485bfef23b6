"""What the trace tests (tests/test_trace.py) and scripts/make_golden_trace.py share: the prompt, how
llama-eval-callback is run, and the golden file of its printed sums."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from refengine.compare import CallbackTensor

GOLDEN_PATH = Path(__file__).resolve().parents[2] / "tests" / "golden" / "eval_callback.json"
PROMPT = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg"
# A printed sum against ours (refengine.compare.sum_rel_diff): within 1e-3. Measured: 1e-7 to
# 1e-6 on the tiny llama model with an F32 KV cache and flash attention off (llama.cpp's default F16
# cache alone moves kqv_out by 4e-4). gemma3's exact numerics gets more room: ggml's CPU GELU rounds
# its input to F16 and reads the result from an F16 table (GGML_GELU_FP16 in ggml-cpu/vec.h), which
# moves each FFN's output by ~1e-4 and, over 18 layers, some attention outputs of gemma3-270m by up to
# 1.5e-3. ggml numerics computes that table's GELU, and is held to 1e-3 there (measured 3.7e-4).
MAX_SUM_REL = {"default": 1e-3, "gemma3-270m": 3e-3}


def eval_callback_args(model_path) -> list[str]:
    """The prompt once through llama.cpp with every tensor printed; F32 K and V caches and flash attention
    off, so that attention runs in float32 as ours does (its flash path converts K and V to F16)."""
    return ["-m", str(model_path), "-p", PROMPT, "-n", "1", "-ctk", "f32", "-ctv", "f32", "-fa", "off"]


@cache
def golden() -> dict:
    return json.loads(GOLDEN_PATH.read_text())


def golden_nodes(case: str) -> dict[str, CallbackTensor]:
    """A fresh copy of one case's printed nodes, by name."""
    return {
        name: CallbackTensor(name, node["op"], tuple(node["ne"]), node["sum"])
        for name, node in golden()[case]["nodes"].items()
    }
