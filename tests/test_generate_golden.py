"""End to end: greedy generation from a fixed prompt equals the committed text.

The golden continuations (tests/golden/generate_<model>.json) are transformers' float64
greedy tokens on the same GGUF file (scripts/make_golden_generate.py), on prompts chosen
so that no step is closer than 0.07 nats between the reference's top two tokens. The
float32 path decodes through the fused matvec kernels and the float64 path through the
exact tiled one; both must reproduce all 32 tokens, and the command line the same text.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from refengine.generate import generate
from refengine.sampler import Sampler, SamplerConfig
from refengine.session import Session

GOLDEN = Path(__file__).parent / "golden"
MODELS = ["gemma3-270m", "smollm2-135m"]
PATH_FIXTURES = {"gemma3-270m": "gemma_path", "smollm2-135m": "smollm_path"}  # conftest.py


def golden(model: str) -> dict:
    return json.loads((GOLDEN / f"generate_{model}.json").read_text())


@pytest.mark.parametrize("precision", ["f32", pytest.param("f64", marks=pytest.mark.slow)])
@pytest.mark.parametrize("model", MODELS)
def test_greedy_generation_matches_golden(request, model, precision):
    request.getfixturevalue(PATH_FIXTURES[model])  # skips when the model is not installed
    g = golden(model)
    session = Session.load(model, precision)
    prompt_tokens = session.tokenizer.encode(g["prompt"])
    assert prompt_tokens == g["prompt_tokens"]
    result = generate(
        session.model,
        session.tokenizer,
        session.new_cache(128),
        prompt_tokens,
        max_tokens=len(g["tokens"]),
        sampler=Sampler(SamplerConfig(temperature=0)),
    )
    assert result.tokens == g["tokens"], f"first difference at token {first_difference(result.tokens, g['tokens'])}"
    assert result.text == g["text"]
    assert result.finish_reason == "length"


def test_cli_streams_the_golden_text(smollm_path):
    g = golden("smollm2-135m")
    n = len(g["tokens"])
    # the golden text is the exact function's (transformers in float64); generate's default numerics, ggml,
    # is llama.cpp's arithmetic, whose greedy text parts from it within these tokens (tests/test_ggml_forward.py)
    cmd = [sys.executable, "-m", "refengine.cli", "generate", "-m", "smollm2-135m", "--temp", "0", "-n", str(n)]
    run = subprocess.run([*cmd, "--numerics", "exact", g["prompt"]], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == g["text"] + "\n"  # the stream, then a newline to end the line
    stats = run.stderr.strip().splitlines()[-1]
    assert "tok/s" in stats and "RssAnon" in stats


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def generate_json(cmd: list[str], timeout: float) -> dict:
    """`refengine generate --json` in a process of its own, run twice: numba compiles the kernels a run
    needs on first use (LLVM's memory then counts in RssAnon, 100-150 MiB) and caches them on disk, so the
    second run's figures are the run's own, whatever ran before it."""
    for _ in range(2):
        run = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=timeout)
        assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize("model", MODELS)
def test_generation_memory_is_the_kv_cache_and_activations_plus_100_mib(request, model):
    """RssAnon during generation is at most the KV cache, the activations and 100 MiB, measured in a
    process of its own; the weights stay file-backed. KV cache and activations are the memory plan's
    figures for this run."""
    from refengine.gguf import open_gguf
    from refengine.plan import plan
    from refengine.system import read_system

    path = request.getfixturevalue(PATH_FIXTURES[model])
    g = golden(model)
    n_ctx = 2048
    cmd = [sys.executable, "-m", "refengine.cli", "generate", "-m", model, "-c", str(n_ctx), "--temp", "0"]
    peak = generate_json([*cmd, "-n", "32", g["prompt"]], timeout=300)["peak_rss_anon"]
    needs = plan(open_gguf(path), read_system(), n_ctx, n_batch=len(g["prompt_tokens"])).needs
    budget = needs.kv_cache + needs.activations + (100 << 20)
    print(f"{model}: peak RssAnon {peak >> 20} MiB, budget {budget >> 20} MiB")
    assert 0 < peak <= budget


def test_long_prompt_memory_is_the_kv_cache_and_one_micro_batch_plus_100_mib(gemma_path):
    """A 5,000-token prompt at --ctx 8192: the true peak of anonymous memory over the whole run (sampled
    through prefill, not only when text is printed) is the KV cache as the plan sizes it (the sliding-
    window layers keep their ring only), one micro-batch's activations and 100 MiB. Before prompts were
    micro-batched, this run peaked at about 1.6 GB."""
    from refengine.gguf import open_gguf
    from refengine.plan import plan
    from refengine.system import read_system
    from refengine.tokenizer import Tokenizer

    n_ctx = 8192
    prompt = " ".join(f"item {i}," for i in range(860))
    n_prompt = len(Tokenizer.from_gguf(open_gguf(gemma_path)).encode(prompt))
    assert 5000 <= n_prompt <= 5600
    cmd = [sys.executable, "-m", "refengine.cli", "generate", "-m", "gemma3-270m", "-c", str(n_ctx), "--temp", "0"]
    peak = generate_json([*cmd, "-n", "4", prompt], timeout=600)["peak_rss_anon"]
    needs = plan(open_gguf(gemma_path), read_system(), n_ctx, n_batch=n_prompt).needs
    budget = needs.kv_cache + needs.activations + (100 << 20)
    print(
        f"{n_prompt} tokens: peak RssAnon {peak >> 20} MiB, budget {budget >> 20} MiB "
        f"(KV cache {needs.kv_cache >> 20}, activations {needs.activations >> 20})"
    )
    assert 0 < peak <= budget
