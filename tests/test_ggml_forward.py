"""numerics="ggml" against llama.cpp on whole models: the bar (teacher-forced over the prompt and 32
greedy tokens, mean KL <= 1e-3 and top-1 >= 99%), and past it, the same logits to the bit.

- goldens (no llama.cpp needed): llama.cpp's top-16 log-probs of every position, written by
  scripts/make_golden_logits.py (gemma3-270m, smollm2-135m, every prompt of oracle_utils) and
  scripts/make_golden_moe.py (the tiny MoE models of moe_oracle). Ours must give the same top-16 ids and
  the same float32 log-probs: computed from the same logits by the same code, they are equal only if
  the logits are;
- live (oracle): llama-cpp-python's logits, teacher-forced and decoded one token at a time, against ours,
  array_equal, on tiny models of every architecture (dense F32 and Q4_K_M, MoE, both MLA layouts);
- the API and the CLI's --numerics.
"""

from __future__ import annotations

import numpy as np
import pytest

import refengine
from refengine.api import APIError
from refengine.cli import main
from refengine.errors import RefengineError
from refengine.session import Session
from refengine.testing import MOE_MODELS
from refengine.testing.moe_oracle import PROMPTS, load_golden_moe, make_q4_k_m
from refengine.testing.oracle_utils import MODELS, TOP_K, binned_kl, load_golden, log_softmax

MAX_MEAN_KL = 1e-3  # numerics ggml against llama.cpp, nats
MIN_TOP1 = 0.99


def ggml_logits(session: Session, tokens, first: int = 0) -> np.ndarray:
    """Teacher-forced logits of positions first.. (the prefix only fills the cache), as oracle_utils does."""
    tokens = np.asarray(tokens)
    cache = session.new_cache(len(tokens))
    if first:
        session.model.forward(tokens[:first], cache, all_logits=False)
    return session.model.forward(tokens[first:], cache, all_logits=True)


def check_against_golden(label: str, logits: np.ndarray, top_ids: np.ndarray, top_logprobs: np.ndarray) -> None:
    logp = log_softmax(logits)  # float64, as the golden scripts compute it
    ids = np.argsort(-logp, axis=-1, kind="stable")[:, :TOP_K]
    ours = np.take_along_axis(logp, ids, axis=-1).astype(np.float32)
    kl = binned_kl(top_ids, top_logprobs.astype(np.float64), logp)  # a lower bound of the full KL
    top1 = np.mean(logp.argmax(axis=-1) == top_ids[:, 0])
    print(f"{label}: {len(logp)} positions, KL >= {kl.mean():.2e}, top-1 {top1:.1%}")
    assert kl.mean() <= MAX_MEAN_KL and top1 >= MIN_TOP1, f"{label}: mean KL {kl.mean():.2e}, top-1 {top1:.1%}"
    assert np.array_equal(ids, top_ids), f"{label}: the top-{TOP_K} tokens differ from llama.cpp's"
    diff = np.abs(ours - top_logprobs)
    assert diff.max() == 0, f"{label}: log-probs differ from llama.cpp's by up to {diff.max():.3g}"


# ---------------------------------------------------------------- goldens


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    folder, made = tmp_path_factory.mktemp("ggml_moe"), {}

    def get(arch: str):
        if arch not in made:
            made[arch] = make_q4_k_m(arch, folder)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", MOE_MODELS)
def test_tiny_moe_models_equal_llama_cpp_golden(moe_files, arch):
    meta, cases = load_golden_moe()
    path = moe_files(arch)
    session = Session.load(str(path), "f32", "ggml")
    for prompt in PROMPTS:
        golden = cases[arch, prompt.name]
        check_against_golden(f"{arch} {prompt.name}", ggml_logits(session, golden.tokens), golden.top_ids,
                             golden.top_logprobs)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_real_models_equal_llama_cpp_golden(request, model):
    request.getfixturevalue({"gemma3-270m": "gemma_path", "smollm2-135m": "smollm_path"}[model])  # skips if absent
    _, cases = load_golden(model)
    session = Session.load(model, "f32", "ggml")
    for name, golden in cases.items():
        logits = ggml_logits(session, golden.tokens, golden.first)
        check_against_golden(f"{model} {name}", logits, golden.top_ids, golden.top_logprobs)


# ---------------------------------------------------------------- live, against llama-cpp-python

LIVE_MODELS = [("llama", "f32"), ("gemma3", "q4_k_m"), ("qwen2", "q4_k_m"), ("qwen3", "q4_k_m"),
               ("qwen3moe", "q4_k_m"), ("mixtral", "q4_k_m"), ("deepseek2", "q4_k_m"), ("deepseek2-kvb", "q4_k_m"),
               ("deepseek2-lite", "q4_k_m")]  # fmt: skip
SEQUENCE = [int(t) for t in np.random.default_rng(11).integers(0, 500, size=40)]


@pytest.mark.oracle
@pytest.mark.parametrize(("arch", "variant"), LIVE_MODELS, ids=lambda v: v)
def test_tiny_models_equal_llama_cpp_to_the_bit(tiny_model, arch, variant):
    """One batch of 40 tokens (llama.cpp's logits_all), then 6 tokens decoded one at a time after a prompt of 10,
    each against llama_decode's logits of that token: array_equal."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = tiny_model(arch, variant)
    session = Session.load(str(path), "f32", "ggml")
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(SEQUENCE)
        theirs = np.array(llm.scores[: len(SEQUENCE)], dtype=np.float32)
        ours = ggml_logits(session, SEQUENCE)
        assert np.array_equal(ours, theirs), f"batch: logits differ by up to {np.abs(ours - theirs).max():.3g}"
        llm.reset()
        llm.eval(SEQUENCE[:10])
        cache = session.new_cache(64)
        session.model.forward(np.array(SEQUENCE[:10]), cache, all_logits=False)
        for i in range(10, 16):
            llm.eval(SEQUENCE[i : i + 1])
            theirs = np.array(llm.scores[i], dtype=np.float32)
            ours = session.model.forward(np.array(SEQUENCE[i : i + 1]), cache)[0]
            assert np.array_equal(ours, theirs), f"decode step {i}: differ by up to {np.abs(ours - theirs).max():.3g}"
    finally:
        llm.close()


@pytest.mark.oracle
def test_f32_cache_equals_llama_cpp_with_its_f32_cache(tiny_model):
    """--cache-type f32: llama.cpp with -ctk f32 -ctv f32 and flash attention off multiplies K*Q and V*softmax
    in float32, as our exact attention kernels do, up to the order of float32 additions. On an F32 model, so
    that no activation is rounded to 8 bits: there an addition's last bit can flip a rounding, and the logits
    of a quantized model part by ~1e-2."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = tiny_model("llama")
    f32_cache = refengine.load(path, numerics="ggml", cache_type="f32")
    assert f32_cache.session.new_cache(8).layers[0].k.dtype == np.float32
    f32 = int(llama_cpp.GGML_TYPE_F32)
    llm = llama_cpp.Llama(
        str(path), n_ctx=128, logits_all=True, n_threads=2, type_k=f32, type_v=f32, flash_attn=False, verbose=False
    )
    try:
        llm.eval(SEQUENCE)
        theirs = np.array(llm.scores[: len(SEQUENCE)], dtype=np.float32)
    finally:
        llm.close()
    ours, f16_cache = f32_cache.logits(SEQUENCE), refengine.load(path, numerics="ggml").logits(SEQUENCE)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 1e-6 * scale  # measured 2.6e-7
    assert np.abs(f16_cache - theirs).max() > 100 * np.abs(ours - theirs).max()  # the cache type is what moved


def test_f32_cache_decodes_as_it_prefills(tiny_model):
    """One token at a time through an F32 cache gives the logits of the whole sequence at once."""
    model = refengine.load(tiny_model("llama"), numerics="ggml", cache_type="f32").session.model
    batch = model.forward(np.array(SEQUENCE[:12]), model.new_cache(16))
    cache = model.new_cache(16)
    stepped = np.concatenate([model.forward(np.array([t]), cache) for t in SEQUENCE[:12]])
    np.testing.assert_allclose(stepped, batch, rtol=0, atol=1e-5 * np.abs(batch).max())


# ---------------------------------------------------------------- API and CLI


def test_api_numerics(tiny_model):
    path = tiny_model("llama", "q4_k_m")
    exact, ggml = refengine.load(path), refengine.load(path, numerics="ggml")
    assert (exact.numerics, ggml.numerics) == ("exact", "ggml")
    ids = list(range(1, 20))
    a, b = exact.logits(ids), ggml.logits(ids)
    assert a.shape == b.shape and not np.array_equal(a, b)  # two computations, close to each other
    assert np.mean(a.argmax(-1) == b.argmax(-1)) > 0.8
    with pytest.raises(APIError, match="f32"):
        refengine.load(path, precision="f64", numerics="ggml")
    with pytest.raises(APIError, match="numerics"):
        refengine.load(path, numerics="fast")
    with pytest.raises(APIError, match="cache_type"):
        refengine.load(path, cache_type="f32")  # exact numerics caches in its precision
    with pytest.raises(RefengineError, match="cache type 'q8_0'"):
        refengine.load(path, numerics="ggml", cache_type="q8_0")


def test_cli_numerics_flag(tiny_model, tmp_path, capsys):
    path = str(tiny_model("llama", "q4_k_m"))
    assert (
        main(["logits", "-m", path, "--tokens", "1,2,3,4", "--numerics", "ggml", "--out", str(tmp_path / "g.npy")]) == 0
    )
    expected = refengine.load(path, numerics="ggml").logits([1, 2, 3, 4])
    assert np.array_equal(np.load(tmp_path / "g.npy"), expected)
    capsys.readouterr()
    assert main(["generate", "-m", path, "-n", "2", "--precision", "f64", "--numerics", "ggml", "--no-plan", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--numerics" in err and "f64" in err
    assert main(["logits", "-m", path, "--tokens", "1,2", "--cache-type", "f32", "--out", str(tmp_path / "e.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cache-type" in err and "--numerics ggml" in err
    args = ["logits", "-m", path, "--tokens", "1,2,3,4", "--numerics", "ggml", "-ctk", "f32", "--out"]
    assert main([*args, str(tmp_path / "f.npy")]) == 0
    expected = refengine.load(path, numerics="ggml", cache_type="f32").logits([1, 2, 3, 4])
    assert np.array_equal(np.load(tmp_path / "f.npy"), expected)
