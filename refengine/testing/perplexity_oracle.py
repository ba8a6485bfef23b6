"""What the perplexity tests (tests/test_perplexity.py) and scripts/make_golden_perplexity.py share:
the text, the settings, and the golden files made from llama-perplexity."""

from __future__ import annotations

import json
import lzma
from functools import cache
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[2] / "tests"  # goldens and data live beside the tests
DATA_DIR = TESTS_DIR / "data"
GOLDEN_DIR = TESTS_DIR / "golden"
TEXT_PATH = DATA_DIR / "python_reference.txt.xz"  # licence and provenance: tests/data/README.md
GOLDEN_PATH = GOLDEN_DIR / "perplexity.json"
GOLDEN_BASE = GOLDEN_DIR / "kld_base_tiny_llama.bin.xz"

MODELS = ["smollm2-135m", "gemma3-270m"]
N_CTX = 512  # llama-perplexity's default
N_CHUNKS = 40  # 20,480 tokens scored in contexts of 256-511: at least 20,000, for a figure stable to ~1e-4
N_TEST_CHUNKS = 8  # what the slow test runs of them (4,096 tokens), against the goldens' running estimates

TINY_ARCH = "llama"
TINY_CTX = 128
TINY_CHUNKS = 4
TINY_TEXT_BYTES = 20_000  # the tiny byte-level vocabulary makes about a token a byte

# Bars. refengine is exact, so on gguf-py's F32 copy llama.cpp computes the same function in float32:
MAX_REL_DIFF_F32 = 1e-3  # |PPL ours / PPL llama.cpp on the F32 copy - 1| at most 0.1%
MAX_REL_DIFF_QUANTIZED = 0.02  # against llama.cpp on the quantized file (8-bit activations there)
MAX_SELF_KLD = 2e-3  # the uint16 base file's floor: a model against its own base file


@cache
def reference_text() -> bytes:
    return lzma.decompress(TEXT_PATH.read_bytes())


@cache
def golden() -> dict:
    return json.loads(GOLDEN_PATH.read_text())


def golden_base(folder: Path) -> Path:
    """The tiny model's base file written by llama-perplexity, decompressed into folder."""
    path = folder / "llama_base.kld"
    path.write_bytes(lzma.decompress(GOLDEN_BASE.read_bytes()))
    return path
