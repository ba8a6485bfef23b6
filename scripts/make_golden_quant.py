#!/usr/bin/env python3
"""Write the quantizer's golden files from llama.cpp (llama-cpp-python's ggml), not from refengine.

Run by hand with the oracle installed (`pip install -e '.[oracle]'`); the files are
committed, and tests/test_quantize.py and tests/test_quantize_file.py check refengine
against them when llama.cpp is absent.

  tests/golden/quantize_<TYPE>.npz  `x`: float32 rows (the corner cases of
      ggml_oracle.corner_rows and random rows), `expected`: ggml_quantize_chunk's bytes.
  tests/golden/quantize_file.json   for each tiny model of refengine/testing/tiny_gguf.py and each mix:
      the type and the digest of every tensor of llama_model_quantize's output, and the
      digest of every input tensor (so a changed input is told apart from a broken quantizer).
      A digest is the first 16 hex digits of the sha256 of the tensor's bytes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import ggml_oracle  # noqa: E402

from refengine.gguf import open_gguf  # noqa: E402
from refengine.quantize import MIXES  # noqa: E402
from refengine.testing import tiny_gguf  # noqa: E402

GOLDEN_DIR = TESTS / "golden"

# tiny model variant -> write_tiny_llama options, and the mixes recorded for it
MODEL_VARIANTS = {
    "untied-f32": dict(tied=False, odd=False, weights="F32"),
    "tied-odd-f32": dict(tied=True, odd=True, weights="F32"),
    "untied-f16": dict(tied=False, odd=False, weights="F16"),
    "tied-bf16": dict(tied=True, odd=False, weights="BF16"),
    "moe8-f16": dict(n_expert=8, n_layer=4, weights="F16"),  # llama.cpp's 8-expert rules, 3-D tensors
}
ALL_MIXES = list(MIXES)
MAIN_MIXES = ["Q4_K_M", "Q4_0", "Q8_0", "Q6_K"]
VARIANT_MIXES = {
    "untied-f32": ALL_MIXES,
    "tied-odd-f32": ALL_MIXES,
    "untied-f16": MAIN_MIXES,
    "tied-bf16": MAIN_MIXES,
    "moe8-f16": ["Q4_K_M", "Q2_K", "Q3_K_M", "Q4_K_S", "Q8_0"],
}


def kernel_inputs() -> np.ndarray:
    """The rows every quantize_<TYPE>.npz holds: (n_rows, 256) float32."""
    rng = np.random.RandomState(7)
    random = [rows for rows in ggml_oracle.random_rows(rng, 2, 256).values()]
    return np.concatenate([np.stack(list(ggml_oracle.corner_rows(256).values())), *random])


def write_kernel_goldens() -> None:
    x = kernel_inputs()
    for ggml_type in ggml_oracle.REF_FUNCTIONS:
        with np.errstate(all="ignore"):
            expected = ggml_oracle.quantize_chunk(ggml_type, x)
            assert np.array_equal(expected, ggml_oracle.quantize_ref(ggml_type, x)), ggml_type.name
        path = GOLDEN_DIR / f"quantize_{ggml_type.name}.npz"
        np.savez_compressed(path, x=x, expected=expected)
        print(f"{path.name}: {x.shape[0]} rows of {x.shape[1]}")


def digest(data: np.ndarray) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tensor_digests(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> type, name -> digest of its bytes) for every tensor of a GGUF file."""
    f = open_gguf(path)
    types = {name: t.ggml_type.name for name, t in f.tensors.items()}
    digests = {name: digest(t.data) for name, t in f.tensors.items()}
    return types, digests


def llama_quantize(source: Path, target: Path, mix: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = MIXES[mix].ftype
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {source} {mix}")


def write_file_goldens() -> None:
    golden = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, options in MODEL_VARIANTS.items():
            source = tiny_gguf.write_tiny_llama(Path(tmp) / f"{variant}.gguf", **options)
            _, inputs = tensor_digests(source)
            golden[variant] = {"options": options, "input_digests": inputs, "mixes": {}}
            for mix in VARIANT_MIXES[variant]:
                target = Path(tmp) / f"{variant}-{mix}.gguf"
                llama_quantize(source, target, mix)
                types, digests = tensor_digests(target)
                golden[variant]["mixes"][mix] = {"types": types, "digests": digests}
                print(f"{variant} {mix}: {len(types)} tensors")
    path = GOLDEN_DIR / "quantize_file.json"
    path.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"{path.name} written")


if __name__ == "__main__":
    write_kernel_goldens()
    write_file_goldens()
