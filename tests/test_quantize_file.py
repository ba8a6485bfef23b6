"""`refengine quantize` (refengine/quantize.py) against llama.cpp's llama_model_quantize.

On the tiny llama models of refengine/testing/tiny_gguf.py (F32, F16 and BF16 weights, tied and
untied embeddings, rows that need the fallback types), every mix must give each
tensor the type llama.cpp gives it and the same bytes. Live: against
llama_cpp.llama_model_quantize, where the whole output file must be identical.
Golden: against tests/golden/quantize_file.json (types and digests of
llama.cpp's output, from scripts/make_golden_quant.py), without llama.cpp.
The tiny models of refengine.testing (other architectures) are checked live too.
Then the file-level behaviour: bounded chunks, refusals, Ctrl-C, the CLI.
"""

import ctypes
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from refengine import quantize as q
from refengine.cli import main
from refengine.gguf import open_gguf
from refengine.testing import tiny_gguf

GOLDEN = json.loads((Path(__file__).parent / "golden" / "quantize_file.json").read_text())
CASES = [(variant, mix) for variant, entry in GOLDEN.items() for mix in entry["mixes"]]
LIVE_MIXES = ["Q4_K_M", "Q4_0", "Q8_0", "Q6_K"]
# Metadata keys allowed to differ between llama.cpp's output and ours: none.
METADATA_EXCEPTIONS: set[str] = set()


def digest(data: np.ndarray) -> str:
    return hashlib.sha256(data).hexdigest()[:16]  # as scripts/make_golden_quant.py


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    return {v: tiny_gguf.write_tiny_llama(folder / f"{v}.gguf", **e["options"]) for v, e in GOLDEN.items()}


def tensors_of(path: Path) -> dict[str, tuple[str, str]]:
    """name -> (type, digest of its bytes)"""
    return {name: (t.ggml_type.name, digest(t.data)) for name, t in open_gguf(path).tensors.items()}


@pytest.mark.parametrize(("variant", "mix"), CASES, ids=[f"{v}-{m}" for v, m in CASES])
def test_golden(models, tmp_path, variant, mix):
    source, entry = models[variant], GOLDEN[variant]
    assert {n: d for n, (_, d) in tensors_of(source).items()} == entry["input_digests"], "the tiny model changed"
    out = tmp_path / "out.gguf"
    report = q.quantize_file(source, out, mix)
    expected = entry["mixes"][mix]
    got = tensors_of(out)
    assert {n: t for n, (t, _) in got.items()} == expected["types"]
    assert [n for n, (_, d) in got.items() if d != expected["digests"][n]] == []
    assert report.types == dict(sorted(_count(expected["types"]).items()))


def _count(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return counts


def test_metadata_is_the_input_s_with_llama_cpp_s_changes(models, tmp_path):
    source = models["untied-f32"]
    out = tmp_path / "out.gguf"
    q.quantize_file(source, out, "Q4_K_M")
    before, after = open_gguf(source).metadata, open_gguf(out).metadata
    assert after.pop("general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert after.pop("general.quantization_version") == 2
    before.pop("general.file_type")
    assert list(after) == list(before)
    assert all(
        np.array_equal(after[k], before[k]) if isinstance(before[k], np.ndarray) else after[k] == before[k]
        for k in before
    )


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (the oracle extra) is not installed")


def llama_quantize(llama_cpp, source: Path, target: Path, mix: str) -> int:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = q.MIXES[mix].ftype
    return llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))


@pytest.mark.oracle
@pytest.mark.parametrize("mix", LIVE_MIXES)
@pytest.mark.parametrize("variant", list(GOLDEN))
def test_live_llama_cpp(llama_cpp, models, tmp_path, variant, mix):
    theirs, ours = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    assert llama_quantize(llama_cpp, models[variant], theirs, mix) == 0
    q.quantize_file(models[variant], ours, mix)
    a, b = tensors_of(theirs), tensors_of(ours)
    assert list(a) == list(b), "tensor order"
    assert {n: t for n, (t, _) in b.items()} == {n: t for n, (t, _) in a.items()}
    assert [n for n in a if a[n] != b[n]] == [], "tensors whose bytes differ"
    meta_a, meta_b = open_gguf(theirs).metadata, open_gguf(ours).metadata
    differ = {k for k in meta_a.keys() | meta_b.keys() if repr(meta_a.get(k)) != repr(meta_b.get(k))}
    assert differ <= METADATA_EXCEPTIONS
    assert theirs.read_bytes() == ours.read_bytes(), "same tensors and metadata, yet the files differ"


@pytest.mark.oracle
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q2_K", "Q8_0"])
def test_live_llama_cpp_architectures(llama_cpp, tmp_path, mix):
    """The tiny models of refengine.testing: qwen3, gemma3, MoE (qwen3moe, mixtral) and MLA (deepseek2)."""
    testing = pytest.importorskip("refengine.testing", reason="refengine.testing (tiny models) is not there")
    differ = []
    for arch in testing.MODELS:
        source = testing.write_tiny_model(arch, tmp_path / f"{arch}.gguf")
        theirs, ours = tmp_path / f"{arch}-llama.gguf", tmp_path / f"{arch}-ours.gguf"
        assert llama_quantize(llama_cpp, source, theirs, mix) == 0, arch
        q.quantize_file(source, ours, mix)
        if theirs.read_bytes() != ours.read_bytes():
            differ.append(arch)
    assert differ == []


def test_chunking_does_not_change_a_byte(models, tmp_path, monkeypatch):
    """With 20,000-value chunks most tensors are written in 2 to 4 pieces."""
    source = models["tied-odd-f32"]
    q.quantize_file(source, tmp_path / "whole.gguf", "Q4_K_M")
    monkeypatch.setattr(q, "CHUNK_VALUES", 20_000)
    q.quantize_file(source, tmp_path / "chunked.gguf", "Q4_K_M")
    assert (tmp_path / "whole.gguf").read_bytes() == (tmp_path / "chunked.gguf").read_bytes()


def test_refuses_to_write_onto_the_input(models, tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(models["untied-f32"].read_bytes())
    before = source.read_bytes()
    (tmp_path / "link.gguf").symlink_to(source)
    os.link(source, tmp_path / "hard.gguf")
    for target in (source, tmp_path / "link.gguf", tmp_path / "hard.gguf", tmp_path / "." / "model.gguf"):
        with pytest.raises(q.QuantizeError, match="is the input file"):
            q.quantize_file(source, target, "Q4_K_M")
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.gguf", "link.gguf", "model.gguf"]


def test_refuses_to_requantize(models, tmp_path):
    q8 = tmp_path / "q8.gguf"
    q.quantize_file(models["untied-f32"], q8, "Q8_0")
    message = r"tensor 'output\.weight' is Q8_0, and Q4_K_M would make it Q6_K; requantizing"
    with pytest.raises(q.QuantizeError, match=message):
        q.quantize_file(q8, tmp_path / "q4.gguf", "Q4_K_M")
    assert not (tmp_path / "q4.gguf").exists()
    # Q8_0 again changes no tensor's type, so nothing is requantized: llama.cpp copies them too
    q.quantize_file(q8, tmp_path / "again.gguf", "Q8_0")
    assert tensors_of(tmp_path / "again.gguf") == tensors_of(q8)


def test_interrupt_leaves_no_file(models, tmp_path):
    def interrupt(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        q.quantize_file(models["untied-f32"], tmp_path / "out.gguf", "Q4_K_M", on_progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_type_rules_on_shapes():
    """The shape rules of tensor_allows_quantization and tensor_type_fallback."""
    assert not q.allows_quantization("blk.0.attn_q.weight", (1, 4096))  # ggml_n_dims 1
    assert not q.allows_quantization("blk.0.attn_norm.weight", (4096, 4096))
    assert not q.allows_quantization("blk.0.ffn_gate_inp.weight", (8, 4096))
    assert not q.allows_quantization("blk.0.attn_q.bias", (64, 64))
    assert q.allows_quantization("blk.0.ffn_down_exps.weight", (8, 4096, 1024))
    assert q.fallback("x", 288, T.Q4_K) == T.Q5_0
    assert q.fallback("x", 80, T.Q4_K) == T.F16
    assert q.fallback("x", 512, T.Q6_K) == T.Q6_K


def test_cli(models, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(models["untied-f32"]), str(out), "--type", "Q4_K_M", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mix"] == "Q4_K_M" and report["output_bytes"] == out.stat().st_size
    assert report["types"] == _count(GOLDEN["untied-f32"]["mixes"]["Q4_K_M"]["types"])

    assert main(["quantize", str(out), str(out), "--type", "Q4_K_M"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the input file" in err

    assert main(["quantize", str(models["untied-f32"]), str(tmp_path / "x.gguf"), "--type", "Q9_K"]) == 2
    assert "Q9_K" in capsys.readouterr().err
