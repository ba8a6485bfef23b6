"""refengine perplexity and llama.cpp's KL-divergence base files, against llama-perplexity.

Goldens (tests/golden/perplexity.json, kld_base_tiny_llama.bin.xz, made by
scripts/make_golden_perplexity.py): llama-perplexity's figures on the tiny llama model and on both real
models (quantized, and gguf-py's F32 copy), and the base file it writes for the tiny model. The live
tests run llama-perplexity itself where scripts/build_llama_tools.sh has built it.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from conftest import model_path

import refengine
from refengine.cli import EXIT_ERROR, EXIT_USAGE, main
from refengine.kld import LogitsFileError, open_logits_file, quantize_log_probs, row_width
from refengine.perplexity import PerplexityError, n_chunks_for, read_text
from refengine.testing.llama_tools import find_tool, parse_kl_divergence, parse_perplexity, run_tool
from refengine.testing.perplexity_oracle import (
    MAX_REL_DIFF_F32,
    MAX_REL_DIFF_QUANTIZED,
    MAX_SELF_KLD,
    MODELS,
    N_CTX,
    N_TEST_CHUNKS,
    TINY_ARCH,
    TINY_CHUNKS,
    TINY_CTX,
    TINY_TEXT_BYTES,
    golden,
    golden_base,
    reference_text,
)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """The tiny llama model the goldens were made from (its sha256 is checked), loaded."""
    path = tiny_model(TINY_ARCH)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == golden()["tiny"]["sha256"], "tiny model changed"
    return refengine.load(path)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_bytes(reference_text()[:TINY_TEXT_BYTES])
    return path


def close(ours: float, theirs: float, rel: float) -> bool:
    return abs(ours / theirs - 1) <= rel


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- the procedure ----------------------------------------------------------------------------------


def test_read_text_drops_one_trailing_newline(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"caf\xc3\xa9 \xff\n\n")  # not valid UTF-8 at the end: bytes pass through as they are
    assert read_text(path) == b"caf\xc3\xa9 \xff\n"


def test_chunk_count_as_llama_perplexity():
    assert n_chunks_for(1000, 128) == 7  # tokens // n_ctx, the rest dropped
    assert n_chunks_for(1000, 128, 3) == 3
    assert n_chunks_for(1000, 128, 50) == 7
    with pytest.raises(PerplexityError, match="needs at least 256"):
        n_chunks_for(255, 128)


def test_tiny_perplexity_equals_llama_perplexity(tiny, tiny_text):
    """Every running estimate and the final one, against llama-perplexity on the same F32 file."""
    theirs = golden()["tiny"]
    result = tiny.perplexity(read_text(tiny_text), TINY_CTX, TINY_CHUNKS)
    assert result.n_chunk == TINY_CHUNKS and result.n_scored == TINY_CHUNKS * (TINY_CTX - 1 - TINY_CTX // 2)
    assert len(result.chunk_ppl) == len(theirs["chunk_ppl"])
    for i, (ours, ref) in enumerate(zip(result.chunk_ppl, theirs["chunk_ppl"], strict=True)):
        assert close(ours, ref, 1e-4), f"chunk {i + 1}: {ours} vs llama-perplexity {ref}"
    assert close(result.ppl_error, theirs["error"], 1e-3)


def test_without_bos_replacement_the_figures_move(tiny, tiny_text, monkeypatch):
    """The test above can fail: skip llama.cpp's BOS at each chunk's start and chunks 2.. change."""
    import refengine.perplexity as perplexity

    monkeypatch.setattr(perplexity, "chunk_input", lambda chunk, bos: np.array(chunk, dtype=np.int64))
    result = tiny.perplexity(read_text(tiny_text), TINY_CTX, TINY_CHUNKS)
    assert not close(result.ppl, golden()["tiny"]["ppl"], 1e-4)


# -- base files -------------------------------------------------------------------------------------


def test_quantized_rows_hold_the_log_softmax():
    rng = np.random.default_rng(0)
    n_vocab = 1001  # odd: the row is padded to an even count of values
    logits = rng.normal(0, 4, (5, n_vocab)).astype(np.float32)
    logits[1] = 2.5  # all equal: scale 0, every value 0, min_log_prob = -log(n_vocab)
    logits[2, :500] = -50  # far below the 16-nat window: quantized to 0, the window's floor
    rows = quantize_log_probs(logits)
    assert rows.shape == (5, row_width(n_vocab)) == (5, 1006) and rows.dtype == np.uint16
    assert (rows[:, 4 + n_vocab :] == 0).all()
    scale, floor = rows[:, :4].copy().view(np.float32).T
    x = logits.astype(np.float64)
    log_probs = x - x.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    decoded = scale[:, None] * rows[:, 4 : 4 + n_vocab] + floor[:, None]
    in_window = log_probs >= log_probs.max(axis=1, keepdims=True) - 16
    for i in (0, 2, 3, 4):
        assert np.isclose(scale[i], (logits[i].max() - max(logits[i].min(), logits[i].max() - 16)) / 65535)
        err = np.abs(decoded[i] - log_probs[i])[in_window[i]]
        assert err.max() <= 0.51 * scale[i] + 1e-5, err.max()  # half a quantum, and float32 rounding
    assert scale[1] == 0 and (rows[1, 4 : 4 + n_vocab] == 0).all() and np.isclose(floor[1], -math.log(n_vocab))
    assert (rows[2, 4:504] == 0).all() and np.isclose(floor[2], log_probs[2].max() - 16, atol=1e-4)


def test_base_file_we_write_matches_llama_perplexitys(tiny, tiny_text, tmp_path):
    ours_path = tmp_path / "ours.kld"
    result = tiny.perplexity(read_text(tiny_text), TINY_CTX, TINY_CHUNKS, kl_divergence_base=ours_path)
    assert close(result.ppl, golden()["tiny"]["ppl"], 1e-4)
    ours, theirs = open_logits_file(ours_path), open_logits_file(golden_base(tmp_path))
    assert ours_path.stat().st_size == theirs.path.stat().st_size
    assert (ours.n_ctx, ours.n_vocab, ours.n_chunk) == (theirs.n_ctx, theirs.n_vocab, theirs.n_chunk)
    np.testing.assert_array_equal(ours.tokens, theirs.tokens)  # the text's tokens, BOS first, not replaced
    for chunk in range(ours.n_chunk):
        diff = np.abs(ours.log_probs(chunk) - theirs.log_probs(chunk))
        assert diff.max() < 5e-3, f"chunk {chunk}: log-probs differ by {diff.max()}"


def test_kl_divergence_against_llama_perplexitys_base_file(tiny, tmp_path):
    """The same function against llama.cpp's base file: KLD at the format's floor, the same top tokens,
    and PPL(Q) equal to the PPL llama-perplexity printed when it wrote the file."""
    report = tiny.kl_divergence(golden_base(tmp_path))
    assert report.count == TINY_CHUNKS * (TINY_CTX - 1 - TINY_CTX // 2)
    assert abs(report.kld[0]) < MAX_SELF_KLD and report.kld_max < 10 * MAX_SELF_KLD
    assert report.same_top[0] == 1.0
    assert close(report.ppl[0], golden()["tiny"]["ppl"], 1e-4)
    assert report.p_diff_rms[0] < 1e-3


def test_kl_divergence_sees_another_model(tiny_model, tmp_path):
    """The test above can fail: another tiny model against the same base file is far from it."""
    other = refengine.load(tiny_model("qwen3"))
    report = other.kl_divergence(golden_base(tmp_path), n_chunks=1)
    assert report.kld[0] > 0.1 and report.same_top[0] < 0.5


def test_interrupted_run_leaves_no_base_file(tiny, tiny_text, tmp_path):
    def stop(i, result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny.perplexity(read_text(tiny_text), TINY_CTX, 2, kl_divergence_base=tmp_path / "b.kld", on_chunk=stop)
    assert list(tmp_path.iterdir()) == []


# -- the command ------------------------------------------------------------------------------------


def test_cli_perplexity_json_and_text(capsys, tiny, tiny_text):
    path = tiny.session.gguf.path
    code, out, _ = run(capsys, "perplexity", "-m", path, "-f", tiny_text, "-c", TINY_CTX, "--chunks", 2, "--json")
    assert code == 0
    record = json.loads(out)
    assert record["n_chunk"] == 2 and record["n_ctx"] == TINY_CTX
    assert close(record["ppl"], golden()["tiny"]["chunk_ppl"][1], 1e-4)
    code, out, _ = run(capsys, "perplexity", "-m", path, "-f", tiny_text, "-c", TINY_CTX, "--chunks", 2)
    assert code == 0
    assert parse_perplexity(out).chunk_ppl == pytest.approx(golden()["tiny"]["chunk_ppl"][:2], rel=1e-4)


def test_cli_kl_divergence_prints_llama_perplexitys_block(capsys, tiny, tmp_path):
    code, out, _ = run(
        capsys,
        "perplexity",
        "-m",
        tiny.session.gguf.path,
        "--kl-divergence-base",
        golden_base(tmp_path),
        "--kl-divergence",
    )
    assert code == 0
    stats = parse_kl_divergence(out)  # the parser the live tests use on llama-perplexity's own output
    assert abs(stats["Mean    KLD"]) < MAX_SELF_KLD and stats["Same top p"] == 100.0


@pytest.mark.parametrize(
    ("case", "expected_code", "needle"),
    [
        ("short", EXIT_ERROR, "needs at least"),
        ("no_base", EXIT_USAGE, "--kl-divergence needs --kl-divergence-base"),
        ("no_text", EXIT_USAGE, "-f TEXT is required"),
        ("not_a_base", EXIT_ERROR, "does not look like"),
        ("truncated", EXIT_ERROR, "truncated"),
        ("missing_text", EXIT_ERROR, "No such file"),
    ],
)
def test_cli_errors_are_one_line(capsys, tiny, tmp_path, case, expected_code, needle):
    model = tiny.session.gguf.path
    short = tmp_path / "short.txt"
    short.write_bytes(b"a few words")
    not_a_base = tmp_path / "x.kld"
    not_a_base.write_bytes(b"GGUF" + bytes(100))
    truncated = tmp_path / "t.kld"
    truncated.write_bytes(golden_base(tmp_path).read_bytes()[:-2])
    argv = {
        "short": ["-f", short],
        "no_base": ["--kl-divergence"],
        "no_text": [],
        "not_a_base": ["--kl-divergence-base", not_a_base, "--kl-divergence"],
        "truncated": ["--kl-divergence-base", truncated, "--kl-divergence"],
        "missing_text": ["-f", tmp_path / "none.txt"],
    }[case]
    code, _, err = run(capsys, "perplexity", "-m", model, *argv)
    assert code == expected_code
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_base_file_for_another_vocabulary_is_refused(tiny, tmp_path):
    path = golden_base(tmp_path)
    data = bytearray(path.read_bytes())
    data[12:16] = np.int32(1000).tobytes()  # n_vocab
    path.write_bytes(bytes(data))
    with pytest.raises(LogitsFileError):
        tiny.kl_divergence(path)


# -- the real models --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_real_model_perplexity_equals_llama_perplexity(model, tmp_path):
    """Every running estimate of the first N_TEST_CHUNKS chunks within 0.1% of llama-perplexity's on
    gguf-py's F32 copy, and within 2% of its on the quantized file. (The whole 40 chunks, 20,480 tokens,
    take minutes per model: their figures are in docs/oracle.md.)"""
    model_path(model)  # skips when the model is not installed
    if "models" not in golden():
        pytest.skip("tests/golden/perplexity.json has no real-model figures (scripts/make_golden_perplexity.py)")
    theirs = golden()["models"][model]
    text = tmp_path / "text.txt"
    text.write_bytes(reference_text())
    result = refengine.load(model).perplexity(read_text(text), N_CTX, N_TEST_CHUNKS)
    f32, quantized = theirs["f32"]["chunk_ppl"], theirs["quantized"]["chunk_ppl"]
    print(
        f"{model}: {N_TEST_CHUNKS} chunks: PPL {result.ppl:.4f}; llama-perplexity F32 copy "
        f"{f32[N_TEST_CHUNKS - 1]:.4f}, quantized {quantized[N_TEST_CHUNKS - 1]:.4f}; {result.seconds:.0f} s"
    )
    for i, ours in enumerate(result.chunk_ppl):
        assert close(ours, f32[i], MAX_REL_DIFF_F32), f"chunk {i + 1}: {ours} vs llama-perplexity {f32[i]}"
        assert close(ours, quantized[i], MAX_REL_DIFF_QUANTIZED)


# -- live llama-perplexity --------------------------------------------------------------------------


def tool_or_skip(name: str):
    if find_tool(name) is None:
        pytest.skip(f"{name} is not built (scripts/build_llama_tools.sh)")


@pytest.mark.oracle
def test_live_tiny_perplexity(tiny, tiny_text):
    tool_or_skip("llama-perplexity")
    out = run_tool("llama-perplexity", "-m", tiny.session.gguf.path, "-f", tiny_text, "-c", TINY_CTX, "--chunks", 3)
    theirs = parse_perplexity(out)
    ours = tiny.perplexity(read_text(tiny_text), TINY_CTX, 3)
    assert ours.chunk_ppl == pytest.approx(theirs.chunk_ppl, rel=1e-4)


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_live_base_files_both_ways(model, tmp_path):
    """llama-perplexity reads a base file we write (on gguf-py's F32 copy: a finite KLD at the floor), and
    we read one it writes, our KLD of the same model against it below MAX_SELF_KLD."""
    from refengine.testing.f32copy import f32_copy

    model_path(model)
    tool_or_skip("llama-perplexity")
    text = tmp_path / "text.txt"
    text.write_bytes(reference_text())
    f32 = f32_copy(model)
    ours = refengine.load(model)
    ours.perplexity(read_text(text), N_CTX, 1, kl_divergence_base=tmp_path / "ours.kld")
    out = run_tool(
        "llama-perplexity", "-m", f32, "-c", N_CTX, "--kl-divergence-base", tmp_path / "ours.kld", "--kl-divergence"
    )
    theirs_on_ours = parse_kl_divergence(out)
    run_tool(
        "llama-perplexity",
        "-m",
        f32,
        "-f",
        text,
        "-c",
        N_CTX,
        "--chunks",
        1,
        "--kl-divergence-base",
        tmp_path / "theirs.kld",
    )
    ours_on_theirs = ours.kl_divergence(tmp_path / "theirs.kld")
    kld, same = theirs_on_ours["Mean    KLD"], theirs_on_ours["Same top p"]
    print(
        f"{model}: llama.cpp F32 on our base: KLD {kld:.6f}, same top {same:.2f}%; ours on llama.cpp's base: "
        f"KLD {ours_on_theirs.kld[0]:.6f}, same top {100 * ours_on_theirs.same_top[0]:.2f}%"
    )
    assert math.isfinite(theirs_on_ours["Mean    KLD"]) and abs(theirs_on_ours["Mean    KLD"]) < MAX_SELF_KLD
    assert theirs_on_ours["Same top p"] > 95
    assert abs(ours_on_theirs.kld[0]) < MAX_SELF_KLD and ours_on_theirs.same_top[0] > 0.95
