"""Fuzzing the model loader and the chat template renderer: over 10,000 mutants, every one
must end in success or in one RefengineError (which the CLI prints as one line, exit 1), within 10 s
and 1 GB.

Metadata mutants change one to three keys of a tiny model (llama, gemma3, deepseek2): a value of another
type, out of range, a neighbour of the true value (so inconsistent with the tensors), removed, or an
array shortened, lengthened or with one bad element. Each goes through what `refengine generate --chat`
does with a file: the memory plan, the model and tokenizer, `info`, the chat template, two tokens. They
are GGUFFile objects in memory sharing the original's tensors, not files, so that thousands run in a
minute; a sample of them is also written out and run through the real CLI in subprocesses, which checks
the exit status, the one line on stderr, and the time and peak memory of each process.

Template mutants cut, repeat and splice the built-in templates (and smollm2's, when installed) with
jinja2 fragments, and render them. The counts and times are printed at the end of each test.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as VT

from refengine import chat as chat_module
from refengine.chat import BUILTIN_TEMPLATES, ChatTemplate, render, template_for
from refengine.errors import RefengineError, one_line
from refengine.generate import generate
from refengine.gguf import open_gguf
from refengine.info import render as render_info
from refengine.info import summarize
from refengine.plan import DoesNotFit, plan
from refengine.sampler import Sampler, SamplerConfig
from refengine.session import Session
from refengine.system import read_system
from refengine.testing import TinySpec, spec_for, write_tiny_model
from tests.gguf_mutants import ARRAY, rewrite, with_metadata

SEED = 12
N_METADATA = 7500
N_TEMPLATES = 5000
N_CLI = 12
SECONDS_EACH = 10.0
MEMORY_EACH = 1 << 30
SMALL = dict(n_vocab=300, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_ff=128, n_ctx_train=64)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Small tiny models to mutate: a dense GQA llama, gemma3 (window, sandwich norms), deepseek2
    (MLA, experts, groups, YaRN)."""
    root = tmp_path_factory.mktemp("fuzz_bases")
    made = {}
    for arch in ("llama", "gemma3", "deepseek2"):
        fields = {k: v for k, v in SMALL.items() if arch != "deepseek2" or k not in ("head_dim", "n_head_kv")}
        spec = TinySpec(**{**spec_for(arch).__dict__, **fields})
        made[arch] = write_tiny_model(arch, root / f"{arch}-plain.gguf", spec)
    # deepseek2 has no built-in template, and the file one is read from the model: give it ChatML
    chatml = {"tokenizer.chat_template": (BUILTIN_TEMPLATES["chatml"], VT.STRING)}
    made["deepseek2"] = rewrite(made["deepseek2"], root / "deepseek2.gguf", chatml)
    return made


@pytest.fixture
def one_thread(monkeypatch):
    """The kernels on the calling thread only: waking a second thread costs more than a tiny model's
    whole step, and on a shared machine a descheduled thread stalls every call for a scheduler tick."""
    from refengine.kernels import kernel_threads

    import refengine.threads

    monkeypatch.setattr(refengine.threads, "cores", lambda: 1)
    with kernel_threads(1):
        yield


# -- metadata mutants -------------------------------------------------------------------------------

INT_TYPES = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)
INT_RANGE = {
    VT.UINT8: (0, 2**8 - 1),
    VT.INT8: (-(2**7), 2**7 - 1),
    VT.UINT16: (0, 2**16 - 1),
    VT.INT16: (-(2**15), 2**15 - 1),
    VT.UINT32: (0, 2**32 - 1),
    VT.INT32: (-(2**31), 2**31 - 1),
    VT.UINT64: (0, 2**64 - 1),
    VT.INT64: (-(2**63), 2**63 - 1),
}
# Keys the readers look for that the tiny models may not carry: mutants add them too.
OPTIONAL_KEYS = [
    "{arch}.rope.scaling.type",
    "{arch}.rope.scaling.factor",
    "{arch}.rope.dimension_count",
    "{arch}.attention.key_length",
    "{arch}.attention.value_length",
    "{arch}.attention.head_count_kv",
    "{arch}.expert_count",
    "{arch}.expert_used_count",
    "{arch}.attention.sliding_window",
    "{arch}.rope.scaling.original_context_length",
    "{arch}.rope.scaling.yarn_log_multiplier",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.chat_template",
    "split.count",
]
STRINGS = ["", "linear", "yarn", "none", "llama", "gpt2", "x" * 5000, "caf\udce9", "\x1b[31mred\x07", "{{ 1/0 }}"]
FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-45, 3.4e38, 1e-6, 0.5, 1.0, 2.0]


def wrong_values(rng: random.Random, value, vtype) -> list[tuple[object, VT]]:
    """Replacements for one value: of every other type, out of range, near the true one."""
    n = rng.randint(0, 6)
    out: list[tuple[object, VT]] = [
        (rng.choice(STRINGS), VT.STRING),
        (rng.choice(FLOATS), rng.choice([VT.FLOAT32, VT.FLOAT64])),
        (rng.choice([True, False]), VT.BOOL),
        (np.arange(n, dtype=rng.choice([np.uint32, np.int32, np.float32, np.uint8])), ARRAY),
        ([rng.choice(STRINGS) for _ in range(n)], ARRAY),
    ]
    int_type = rng.choice(INT_TYPES)
    lo, hi = INT_RANGE[int_type]
    out += [(rng.choice([v for v in (lo, hi, 0, 1, 2, 3, 7, 64, 1 << 20, lo + 1, hi - 1) if lo <= v <= hi]), int_type)]
    if isinstance(value, int) and not isinstance(value, bool) and vtype in INT_RANGE:
        lo, hi = INT_RANGE[vtype]
        near = [value - 1, value + 1, value * 2, value // 2, 0, hi, value * 3]
        out += [(v, vtype) for v in near if lo <= v <= hi]
    if isinstance(value, float):
        out += [(value * rng.choice([-1, 0, 0.5, 2, 1e30]), vtype), (rng.choice(FLOATS), vtype)]
    if isinstance(value, np.ndarray) and value.size:
        out += array_variants(rng, value)
    if isinstance(value, list) and value:
        out += string_list_variants(rng, value)
    return [(stored(v, t), t) for v, t in out]


def stored(value, vtype):
    """The value as a file of that type would hold it (float32 rounds, and overflows to inf)."""
    if vtype == VT.FLOAT32:
        with np.errstate(over="ignore"):
            return float(np.float32(value))
    return value


def array_variants(rng: random.Random, value: np.ndarray) -> list[tuple[object, VT]]:
    cut = value[: rng.randint(0, len(value) - 1)]
    longer = np.concatenate([value, value[: rng.randint(1, len(value))]])
    one_bad = value.copy()
    i = rng.randrange(len(value))
    if one_bad.dtype.kind == "f":
        one_bad[i] = rng.choice([np.nan, np.inf, -1e30])
    elif one_bad.dtype.kind in "iu":
        info = np.iinfo(one_bad.dtype)
        one_bad[i] = rng.choice([info.max, info.min, 6, 0, 2, 3, 5])  # 6: a BYTE token, 3: CONTROL
    return [(cut, ARRAY), (longer, ARRAY), (one_bad, ARRAY), (value.astype(np.float64), ARRAY)]


def string_list_variants(rng: random.Random, value: list[str]) -> list[tuple[object, VT]]:
    i = rng.randrange(len(value))
    one_bad = list(value)
    one_bad[i] = rng.choice(["", value[0], "<0xZZ>", "<0x41>", "caf\udce9", "a b c", "x" * 3000])
    cut = value[: rng.randint(0, len(value) - 1)]
    return [(one_bad, ARRAY), (cut, ARRAY), (value + value[:3], ARRAY), (list(reversed(value)), ARRAY)]


def metadata_mutant(rng: random.Random, gguf_file):
    """A copy of gguf_file with one to three keys changed, and a description of the changes."""
    arch = gguf_file.architecture
    keys = list(gguf_file.metadata) + [k.format(arch=arch) for k in OPTIONAL_KEYS]
    changes: dict[str, tuple | None] = {}
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        key = rng.choice(keys)
        if key == "general.architecture" and rng.random() < 0.7:
            continue  # mostly about the architecture's own keys
        if rng.random() < 0.12:
            changes[key] = None
        else:
            value, vtype = gguf_file.metadata.get(key), gguf_file.value_types.get(key)
            changes[key] = rng.choice(wrong_values(rng, value, vtype))
    return with_metadata(gguf_file, changes), changes


def describe(changes: dict) -> str:
    def short(change):
        if change is None:
            return "removed"
        value, vtype = change
        shown = f"array[{len(value)}]" if isinstance(value, (list, np.ndarray)) else repr(value)[:40]
        return f"{shown} ({vtype.name})"

    return ", ".join(f"{k} = {short(c)}" for k, c in changes.items())


def run_like_generate_chat(gguf_file, system) -> str:
    """What `refengine generate --chat -n 2 --temp 0 PROMPT` does with a file, and what `info` does:
    "ok", or RefengineError."""
    info = summarize(gguf_file, with_tensors=True)
    render_info(info)
    __import__("json").dumps(info)
    plan(gguf_file, system, 64, "off", itemsize=4, n_batch=64)
    session = Session.load(gguf_file, "f32")
    tokenizer = session.tokenizer
    messages = [{"role": "user", "content": "the quick fox"}]
    text = render(template_for(session.gguf), messages, tokenizer)
    ids = tokenizer.encode(text, add_bos=False, parse_special=True)
    if not ids:
        return "ok"
    cache = session.new_cache(min(len(ids) + 2, 4096))
    generate(session.model, tokenizer, cache, ids[:64], 2, Sampler(SamplerConfig(temperature=0.0)))
    return "ok"


class Outcomes:
    """Counts, the slowest mutant, and the first few failures with their tracebacks."""

    def __init__(self):
        self.count = 0
        self.by_kind: dict[str, int] = {}
        self.failures: list[str] = []
        self.slowest = (0.0, "")
        self.peak = (0, "")
        self.start = time.perf_counter()

    def run(self, what: str, action) -> None:
        self.count += 1
        reset_peak_rss()
        start = time.perf_counter()
        try:
            kind = action()
        except RefengineError as e:
            line = one_line(e)
            kind = "error" if line and "\n" not in line else "bad message"
            if kind != "error":
                self.failures.append(f"{what}: message {str(e)!r}")
        except DoesNotFit:  # the plan's verdict (exit 3): not a failure of the loader
            kind = "does not fit"
        except Exception:
            kind = "traceback"
            if len(self.failures) < 8:
                self.failures.append(f"{what}:\n{traceback.format_exc()}")
        seconds = time.perf_counter() - start
        growth = peak_rss() - self.baseline if hasattr(self, "baseline") else 0
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if seconds > self.slowest[0]:
            self.slowest = (seconds, what)
        if growth > self.peak[0]:
            self.peak = (growth, what)

    def report(self, title: str) -> str:
        elapsed = time.perf_counter() - self.start
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.by_kind.items()))
        return (
            f"{title}: {self.count} mutants in {elapsed:.1f} s ({kinds}); slowest {self.slowest[0]:.2f} s, "
            f"largest peak RSS growth {self.peak[0] / 2**20:.0f} MiB"
        )


def peak_rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    """Let VmHWM measure from here (writing 5 to clear_refs resets it)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def check(outcomes: Outcomes, capsys, title: str) -> None:
    with capsys.disabled():
        print(f"\n{outcomes.report(title)}")
    assert not outcomes.failures, "\n\n".join(outcomes.failures)
    assert outcomes.slowest[0] < SECONDS_EACH, outcomes.slowest
    assert outcomes.peak[0] < MEMORY_EACH, outcomes.peak


def test_metadata_mutants_end_in_success_or_one_line(bases, capsys, one_thread):
    rng = random.Random(SEED)
    system = read_system(Path("/"))
    files = {arch: open_gguf(path) for arch, path in bases.items()}
    for gguf_file in files.values():  # each base itself runs cleanly (and compiles what it needs)
        assert run_like_generate_chat(gguf_file, system) == "ok"
    outcomes = Outcomes()
    outcomes.baseline = peak_rss()
    for i in range(N_METADATA):
        arch = ("llama", "llama", "gemma3", "deepseek2")[i % 4]
        mutant, changes = metadata_mutant(rng, files[arch])
        outcomes.run(f"#{i} {arch}: {describe(changes)}", lambda m=mutant: run_like_generate_chat(m, system))
    check(outcomes, capsys, "metadata")
    assert outcomes.by_kind.get("ok", 0) > N_METADATA // 10 and outcomes.by_kind.get("error", 0) > N_METADATA // 10


# -- template mutants ----------------------------------------------------------------------------------

FRAGMENTS = [
    "{{ ",
    " }}",
    "{% ",
    " %}",
    "{% for m in messages %}",
    "{% endfor %}",
    "{% if loop.first %}",
    "{% endif %}",
    "{{ messages[0]['content'] }}",
    "{{ message['role'] * 3 }}",
    "{{ messages | length }}",
    "{{ range(5) | list }}",
    "{{ range(10**6) | list | length }}",
    "{{ 'ab' * 10**7 }}",
    "{{ [1] * 10**7 }}",
    "{{ 1/0 }}",
    "{{ 1 + 'a' }}",
    "{{ raise_exception('bad role') }}",
    "{{ bos_token ~ eos_token }}",
    "{{ '\\ud800' }}",
    "{{ '%5000000d' % 3 }}",
    "{{ 'x'.rjust(10**8) }}",
    "{{ x.y.z }}",
    "{{ ''.__class__ }}",
    "{% set ns = namespace(n=0) %}",
    "{% macro m(x) %}{{ m(x) }}{% endmacro %}{{ m(1) }}",
    "{% include 'x' %}",
    "{{ messages | tojson }}",
    "{{ 2 ** 100000 }}",
    "{{ lipsum(5) }}",
    "{{ strftime_now('%Y') }}",
    "{% for i in range(300) %}{% for j in range(300) %}{{ '' }}{% endfor %}{% endfor %}",
]


def template_mutant(rng: random.Random, sources: list[str]) -> str:
    """Cuts, repeats and splices anywhere (mostly syntax errors), or whole fragments inserted and
    blocks repeated between tags (mostly templates that render)."""
    text = rng.choice(sources)
    for _ in range(rng.choice([1, 1, 2, 3])):
        # between two tags, where a fragment keeps the template well-formed
        bounds = [0, len(text)] + [m.end() for m in re.finditer(r"%}|}}", text)]
        if rng.random() < 0.7:
            i, j = sorted(rng.sample(bounds, 2)) if len(bounds) > 1 else (0, 0)
            operation = rng.choice(["insert", "insert", "repeat"])
        else:
            i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
            operation = rng.choice(["cut", "repeat", "insert", "swap"])
        if operation == "cut":
            text = text[:i] + text[j:]
        elif operation == "repeat":
            text = text[:j] + text[i:j] + text[j:]
        elif operation == "insert":
            text = text[:i] + rng.choice(FRAGMENTS) + text[i:]
        else:
            other = rng.choice(sources)
            k = rng.randrange(len(other) + 1)
            text = text[:i] + other[k : k + (j - i)] + text[j:]
    return text


class SmallTokenizer:
    bos_id, eos_id = 1, 2

    def token_to_piece(self, token_id):
        return {1: b"<s>", 2: b"</s>"}[token_id]


def test_template_mutants_end_in_success_or_one_line(capsys, monkeypatch, smollm_template):
    monkeypatch.setattr(chat_module, "RENDER_SECONDS", 0.5)  # the bound itself, shorter: thousands run
    rng = random.Random(SEED)
    sources = list(BUILTIN_TEMPLATES.values()) + ([smollm_template] if smollm_template else [])
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [],
    ]
    outcomes = Outcomes()
    outcomes.baseline = peak_rss()
    for i in range(N_TEMPLATES):
        source = template_mutant(rng, sources)
        messages = rng.choice(conversations)

        def action(source=source, messages=messages, name=f"mutant {i}"):
            render(ChatTemplate(source, name), messages, SmallTokenizer())
            return "ok"

        outcomes.run(f"template #{i}: {source[:200]!r}", action)
    check(outcomes, capsys, "templates")
    assert outcomes.by_kind.get("ok", 0) > N_TEMPLATES // 10 and outcomes.by_kind.get("error", 0) > N_TEMPLATES // 10


@pytest.fixture(scope="module")
def smollm_template():
    from refengine.models import ModelNotFound, resolve_model

    try:
        return template_for(open_gguf(resolve_model("smollm2-135m")))
    except ModelNotFound:
        return None


def test_mutant_count():
    assert N_METADATA + N_TEMPLATES >= 10_000


# -- a sample through the real CLI --------------------------------------------------------------------


def test_mutant_files_through_the_cli(bases, tmp_path, capsys):
    """Written out and run as `refengine generate --chat`: exit 0, or 1 with one line; time and memory,
    each child's own (os.wait4). The unchanged models run first, unmeasured, so that numba's kernels
    are compiled and cached before the mutants are timed."""
    rng = random.Random(SEED + 1)
    files = {arch: open_gguf(path) for arch, path in bases.items()}

    def generate(path) -> tuple[int, list[str], float, int]:
        argv = [sys.executable, "-m", "refengine.cli", "generate", "-m", path, "--chat", "-n", "2", "--temp", "0"]
        return run_measured([*map(str, argv), "the"], SECONDS_EACH * 3)

    for arch in ("llama", "gemma3", "deepseek2"):
        returncode, lines, _, _ = generate(bases[arch])
        assert returncode == 0, (arch, lines)
    start, slowest, largest, kinds = time.perf_counter(), 0.0, 0, {}
    for i in range(N_CLI):
        arch = ("llama", "gemma3", "deepseek2")[i % 3]
        mutant, changes = metadata_mutant(rng, files[arch])
        if i % 4 == 3:  # and a chat template of its own
            changes["tokenizer.chat_template"] = (template_mutant(rng, list(BUILTIN_TEMPLATES.values())), VT.STRING)
        path = rewrite(bases[arch], tmp_path / f"m{i}.gguf", changes)
        what = f"{arch}: {describe(changes)}"
        returncode, lines, seconds, peak = generate(path)
        assert returncode is not None, f"{what}: still running after {SECONDS_EACH * 3} s"
        assert returncode in (0, 1), (what, lines)
        if returncode == 1:
            assert len(lines) == 1 and lines[0].startswith("refengine: error: "), (what, lines)
        else:
            assert not any("Traceback" in line for line in lines), (what, lines)
        kinds[returncode] = kinds.get(returncode, 0) + 1
        slowest = max(slowest, seconds)
        largest = max(largest, peak)
    with capsys.disabled():
        print(
            f"\ncli: {N_CLI} mutant files in {time.perf_counter() - start:.1f} s "
            f"({kinds.get(0, 0)} ran, {kinds.get(1, 0)} one-line errors); slowest {slowest:.1f} s, "
            f"largest peak RSS {largest / 2**20:.0f} MiB"
        )
    assert slowest < SECONDS_EACH and largest < MEMORY_EACH


# Runs argv as its own child and prints that child's peak RSS: a child spawned straight from the test
# process starts as a copy of it, and Linux carries that image's high-water mark through exec into the
# child's ru_maxrss, so in a full suite every child would report pytest's own gigabytes.
MEASURE = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "print(usage.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status) % 256)\n"
)


def run_measured(argv: list[str], timeout: float) -> tuple[int | None, list[str], float, int]:
    """Run argv: its exit status (None if it was killed after `timeout` s), its stderr lines, its
    seconds and its own peak RSS, from the rusage os.wait4 returns for it alone, taken by a small
    launcher (MEASURE) so that the test process's memory is not counted as the child's."""
    import os
    import signal
    import threading

    began = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", MEASURE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    killer = threading.Timer(timeout, lambda: os.killpg(child.pid, signal.SIGKILL))
    killer.start()
    out, err = child.communicate()
    killer.cancel()
    killed = child.returncode == -9 and time.perf_counter() - began >= timeout
    return (
        None if killed else child.returncode,
        err.decode().strip().splitlines(),
        time.perf_counter() - began,
        int(out or 0) * 1024,
    )
