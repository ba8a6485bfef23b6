"""Architectures declared once (refengine.arch.declarations): a variant declared in one place is written,
loaded and planned without touching anything else, and the declarations stay numba-free for the plan."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from refengine.arch import load_model
from refengine.arch.declarations import ARCHITECTURES, LLAMA
from refengine.errors import RefengineError
from refengine.gguf import open_gguf
from refengine.testing import expected_shapes, spec_for, write_tiny_model

TOKENS = np.array([5, 300, 17, 420, 99, 3, 250], dtype=np.int64)


@pytest.fixture
def llamax(monkeypatch):
    """A made-up llama whose layers call their attention norm `attn_in_norm` and its head `lm_head`:
    its whole definition is this declaration."""
    variant = LLAMA.renamed("llamax", attn_norm="blk.{il}.attn_in_norm.weight", output="lm_head.weight")
    monkeypatch.setitem(ARCHITECTURES, "llamax", variant)
    return variant


def test_a_variant_touches_only_its_declaration(llamax, tmp_path):
    variant = open_gguf(write_tiny_model("llama", tmp_path / "llamax.gguf", seed=3, declaration=llamax))
    plain = open_gguf(write_tiny_model("llama", tmp_path / "llama.gguf", seed=3))
    assert variant.architecture == "llamax"
    assert "blk.1.attn_in_norm.weight" in variant.tensors and "blk.1.attn_norm.weight" not in variant.tensors
    assert "lm_head.weight" in variant.tensors and "output.weight" not in variant.tensors
    renamed = {f"blk.{il}.attn_norm.weight": f"blk.{il}.attn_in_norm.weight" for il in (0, 1)}
    renamed["output.weight"] = "lm_head.weight"
    assert {renamed.get(n, n): t.shape for n, t in plain.tensors.items()} == {
        n: t.shape for n, t in variant.tensors.items()
    }
    for numerics in ("exact", "ggml"):
        ours = load_model(variant, np.float32, numerics)
        reference = load_model(plain, np.float32, numerics)
        got = ours.forward(TOKENS, ours.new_cache(16))
        assert got.shape == (len(TOKENS), 512)
        np.testing.assert_array_equal(got, reference.forward(TOKENS, reference.new_cache(16)))


def test_a_variant_names_its_own_missing_tensor(llamax, tmp_path):
    """The plain llama file under the variant's architecture lacks the renamed tensor: one clear error."""
    path = write_tiny_model("llama", tmp_path / "plain-as-llamax.gguf", declaration=LLAMA.renamed("llamax"))
    with pytest.raises(RefengineError, match=r"missing tensor 'blk\.0\.attn_in_norm\.weight'"):
        load_model(open_gguf(path))


def test_a_misshapen_tensor_is_named_with_the_declared_shape(tmp_path, monkeypatch):
    path = write_tiny_model("llama", tmp_path / "llamay.gguf", declaration=LLAMA.renamed("llamay"))
    wider = tuple(
        replace(t, shape=lambda s: (s.n_ff + 1, s.n_embd)) if t.role == "ffn_up" else t for t in LLAMA.tensors
    )
    monkeypatch.setitem(ARCHITECTURES, "llamay", replace(LLAMA, name="llamay", tensors=wider))
    expected = r"tensor 'blk\.0\.ffn_up\.weight' has shape \(512, 256\), expected \(513, 256\)"
    with pytest.raises(RefengineError, match=expected):
        load_model(open_gguf(path))


def test_unknown_architecture_is_one_line(tmp_path):
    path = write_tiny_model("llama", tmp_path / "falcon.gguf", declaration=LLAMA.renamed("falcon"))
    with pytest.raises(RefengineError, match=r"architecture 'falcon' is not supported \(supported: llama, qwen2"):
        load_model(open_gguf(path))


@pytest.mark.parametrize("arch", ["gemma3", "deepseek2-kvb", "mixtral"])
def test_expected_shapes_are_the_files(tmp_path, arch):
    """What the declaration says a file holds is what the writer writes, in its order."""
    path = write_tiny_model(arch, tmp_path / f"{arch}.gguf")
    model = open_gguf(path)
    assert list(expected_shapes(arch, spec_for(arch)).items()) == [(n, t.shape) for n, t in model.tensors.items()]


def test_plan_and_declarations_load_no_numba():
    """The memory plan reads headers only: the declarations it reads, and refengine.arch, import no numba."""
    code = (
        "import sys, refengine.plan, refengine.arch, refengine.arch.declarations, refengine.hparams; "
        "print(sorted(m for m in sys.modules if m == 'numba' or m.startswith('refengine.kernels')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
