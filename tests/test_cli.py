"""The refengine command line: output, JSON, and one-line errors for bad input."""

import json
import shutil

import numpy as np
import pytest
from gguf import quants

from refengine.cli import EXIT_ERROR, EXIT_USAGE, main
from refengine.gguf import open_gguf
from refengine.session import Session


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, expected_code, *needles):
    assert code == expected_code
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0]


def test_info_gemma_json(capsys, gemma_path):
    code, out, _ = run(capsys, "info", "gemma3-270m", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["architecture"] == "gemma3"
    assert info["file_type"] == "Q4_K_M"
    assert info["context_length"] == 32768
    assert info["tokenizer"]["model"] == "llama" and info["tokenizer"]["vocab_size"] == 262144
    assert info["chat_template"] is False
    assert set(info["types"]) == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    model = open_gguf(gemma_path)
    assert info["parameters"] == sum(t.n_elements for t in model.tensors.values()) == 268_098_176
    assert sum(row["bytes"] for row in info["types"].values()) == sum(t.nbytes for t in model.tensors.values())
    assert info["file_size"] == gemma_path.stat().st_size


def test_info_smollm_text(capsys, smollm_path):
    code, out, _ = run(capsys, "info", str(smollm_path))
    assert code == 0
    assert "architecture  llama" in out
    assert "file type     Q4_1" in out
    assert "gpt2 (byte-level BPE), 49152 tokens, pre-tokenizer 'smollm'" in out
    assert "chat template yes" in out


def test_info_tensors_lists_every_tensor(capsys, smollm_path):
    code, out, _ = run(capsys, "info", str(smollm_path), "--tensors", "--json")
    assert code == 0
    listed = json.loads(out)["tensors"]
    model = open_gguf(smollm_path)
    assert [t["name"] for t in listed] == list(model.tensors)
    first = model.tensors[listed[0]["name"]]
    assert listed[0]["shape"] == list(first.shape) and listed[0]["offset"] == first.offset


def test_tensor_writes_dequantized_npy(capsys, tmp_path, gemma_path):
    out_file = tmp_path / "k.npy"
    code, out, _ = run(capsys, "tensor", "gemma3-270m", "blk.3.ffn_down.weight", "-o", str(out_file), "--json")
    assert code == 0
    assert json.loads(out)["type"] == "Q4_K"
    t = open_gguf(gemma_path).tensor("blk.3.ffn_down.weight")
    written = np.load(out_file)
    assert written.dtype == np.float32 and written.shape == t.shape == (640, 2048)
    np.testing.assert_array_equal(written, quants.dequantize(t.data, t.ggml_type))


def test_tensor_refuses_to_overwrite_the_model(capsys, tmp_path, smollm_path):
    copy = tmp_path / "model.gguf"
    shutil.copyfile(smollm_path, copy)
    before = copy.read_bytes()
    code, _, err = run(capsys, "tensor", str(copy), "output_norm.weight", "-o", str(copy))
    assert_one_line_error(code, err, EXIT_ERROR, "refusing to overwrite")
    assert copy.read_bytes() == before


def test_unknown_tensor(capsys, smollm_path):
    code, _, err = run(capsys, "tensor", str(smollm_path), "blk.99.nope", "-o", "/tmp/never.npy")
    assert_one_line_error(code, err, EXIT_ERROR, "blk.99.nope", str(smollm_path))


def test_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "info", str(tmp_path / "absent.gguf"))
    assert_one_line_error(code, err, EXIT_ERROR, "absent.gguf")


def test_not_gguf(capsys, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 4)
    code, _, err = run(capsys, "info", str(junk))
    assert_one_line_error(code, err, EXIT_ERROR, "junk.gguf", "not a GGUF file")


def test_truncated_model(capsys, tmp_path, smollm_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm_path.read_bytes()[: 3 << 20])  # header intact, tensor data cut off
    code, _, err = run(capsys, "info", str(cut))
    assert_one_line_error(code, err, EXIT_ERROR, "cut.gguf", "past the end")


@pytest.mark.parametrize("argv", [["info", "--bogus"], ["tensor", "x"], ["frobnicate"]])
def test_bad_flags(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, EXIT_USAGE, "-h")


@pytest.mark.parametrize("argv", [["-h"], ["info", "-h"], ["tensor", "-h"], ["--version"]])
def test_help_everywhere(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.strip()


def generate_json(capsys, *options: str) -> dict:
    """`refengine generate --json` on smollm2, greedy, continuing "The capital of France is"."""
    argv = ["generate", "-m", "smollm2-135m", "--temp", "0", "--json", *options, "The capital of France is"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    return json.loads(out)


def test_generate_json(capsys, smollm_path):
    result = generate_json(capsys, "-n", "8")
    assert set(result) >= {"prompt_tokens", "tokens", "text", "timings", "finish_reason"}
    assert result["finish_reason"] in ("length", "eos", "stop")
    assert 0 < len(result["tokens"]) <= 8
    assert "Paris" in result["text"]
    assert result["timings"]["n_prompt"] == len(result["prompt_tokens"])


def test_generate_stop_string_is_not_emitted(capsys, smollm_path):
    result = generate_json(capsys, "-n", "16", "--stop", "Paris")
    assert result["finish_reason"] == "stop" and "Paris" not in result["text"]


def test_generate_prompt_longer_than_context(capsys, smollm_path):
    code, _, err = run(capsys, "generate", "-m", "smollm2-135m", "-c", "8", "-n", "4", "one two three four five")
    assert_one_line_error(code, err, EXIT_ERROR, "--ctx 8")


def test_generate_bad_sampler_setting(capsys, smollm_path):
    code, _, err = run(capsys, "generate", "-m", "smollm2-135m", "--temp", "-1", "hi")
    assert_one_line_error(code, err, EXIT_USAGE, "--temp")  # a bad flag value is a usage error, as the README says


def test_logits_file(capsys, tmp_path, smollm_path):
    out_file = tmp_path / "logits.npy"
    code, _, _ = run(capsys, "logits", "-m", "smollm2-135m", "--tokens", "504,3575,282", "--out", str(out_file))
    assert code == 0
    written = np.load(out_file)
    assert written.shape == (3, 49152) and written.dtype == np.float32
    # the ids are evaluated exactly as given: no BOS in front
    session = Session.load("smollm2-135m")
    np.testing.assert_array_equal(written, session.model.forward(np.array([504, 3575, 282]), session.new_cache(3)))
    code, _, _ = run(
        capsys,
        "logits",
        "-m",
        "smollm2-135m",
        "--tokens",
        "504,3575,282",
        "--out",
        str(tmp_path / "f64.npy"),
        "--precision",
        "f64",
    )
    np.testing.assert_allclose(np.load(tmp_path / "f64.npy"), written, atol=2e-3)


@pytest.mark.parametrize("tokens", ["1,x,3", ",", "1,99999999"])
def test_logits_bad_tokens(capsys, tmp_path, smollm_path, tokens):
    code, _, err = run(capsys, "logits", "-m", "smollm2-135m", "--tokens", tokens, "--out", str(tmp_path / "l.npy"))
    assert code in (EXIT_ERROR, EXIT_USAGE)
    assert_one_line_error(code, err, code)
    assert not (tmp_path / "l.npy").exists()


# -- generation behaviour a llama.cpp user relies on ---------------------------------------------


def test_generate_same_seed_same_text(capsys, smollm_path):
    first, again = (generate_json(capsys, "-n", "12", "--temp", "0.9", "--seed", "7") for _ in range(2))
    assert first["tokens"] == again["tokens"] and len(first["tokens"]) > 0


def test_generate_chat_wraps_the_prompt_in_the_template(capsys, smollm_path):
    result = generate_json(capsys, "-n", "4", "--chat", "--system", "Be brief.")
    session = Session.load("smollm2-135m")
    rendered = session.tokenizer.decode(result["prompt_tokens"], special=True)
    # smollm2's GGUF carries a ChatML template: system, then user, then the assistant's turn opened
    assert rendered.index("<|im_start|>system\nBe brief.") < rendered.index("<|im_start|>user\nThe capital of")
    assert rendered.endswith("<|im_start|>assistant\n")


def test_ctrl_c_keeps_the_text_and_exits_130(smollm_path):
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "refengine.cli", "generate", "-m", "smollm2-135m", "-n", "2000", "-c", "2048"]
    child = subprocess.Popen(
        [*cmd, "--temp", "0", "Once upon a time"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # SIGINT as a terminal's foreground job has it. A non-interactive shell starts background jobs
        # (`make test &`) with SIGINT ignored, the child inherits that, and a CLI rightly keeps it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = child.stdout.read(1)  # generation has started streaming
    child.send_signal(signal.SIGINT)
    rest, err = child.communicate(timeout=120)
    assert child.returncode == 130, err.decode()
    assert first and (first + rest).strip()
    assert b"Traceback" not in err


def test_chat_reuses_the_cache_across_turns(capsys, monkeypatch, smollm_path):
    import io

    import refengine.generate

    evaluated = []  # prompt tokens evaluated per turn
    real = refengine.generate.generate

    def spy(model, tokenizer, cache, prompt_tokens, *args, **kwargs):
        evaluated.append((cache.n_past, len(prompt_tokens)))
        return real(model, tokenizer, cache, prompt_tokens, *args, **kwargs)

    monkeypatch.setattr(refengine.generate, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n\n"))
    code, out, _ = run(capsys, "chat", "-m", "smollm2-135m", "--temp", "0", "-n", "12")
    assert code == 0 and out.count("> ") == 3  # two turns, then the empty line that ends the chat
    (first_past, first_new), (second_past, second_new) = evaluated
    assert first_past == 0
    # the second turn starts from the whole first exchange already in the cache
    assert second_past >= first_new and second_new < second_past


def test_bench_model_json(capsys, smollm_path):
    code, out, _ = run(capsys, "bench", "model", "smollm2-135m", "-p", "8", "-n", "4", "-r", "2", "--json")
    assert code == 0
    records = json.loads(out)
    assert [r["test"] for r in records] == ["pp8", "tg4"]
    for r in records:
        assert r["avg_ts"] > 0 and r["stddev_ts"] >= 0 and r["n_threads"] >= 1 and len(r["samples_ts"]) == 2
