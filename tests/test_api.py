"""refengine.load: the Python API other engines' tests use (README, "Python API")."""

from __future__ import annotations

import numpy as np
import pytest

import refengine
from refengine.api import APIError, Model
from refengine.errors import RefengineError


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return refengine.load(tiny_model("llama"))


def test_load_by_path_and_precision(tiny_model):
    f32, f64 = refengine.load(tiny_model("llama")), refengine.load(str(tiny_model("llama")), precision="f64")
    assert isinstance(f32, Model) and f32.architecture == "llama" and f32.n_vocab == 512
    ids = f32.tokenize("the model of the expert layer")
    assert ids[0] == f32.bos_id
    a, b = f32.logits(ids), f64.logits(ids)
    assert a.shape == b.shape == (len(ids), 512) and a.dtype == np.float32 and b.dtype == np.float64
    assert np.abs(a - b).max() < 1e-3  # float32 rounding only: both compute the same function


def test_bad_arguments_are_refengine_errors(tiny):
    with pytest.raises(APIError, match="precision"):
        refengine.load("smollm2-135m", precision="f16")
    with pytest.raises(APIError, match="outside the vocabulary"):
        tiny.logits([1, 512])
    with pytest.raises(APIError, match="no tokens"):
        tiny.logits([])
    with pytest.raises(RefengineError, match="no such file"):
        refengine.load("/nonexistent/model.gguf")


def test_greedy_generate_follows_the_logits(tiny):
    prompt = tiny.tokenize("one two three")
    result = tiny.generate(prompt, max_tokens=6, temperature=0.0)
    eos = [i for i, t in enumerate(result.tokens) if tiny.session.tokenizer.is_eog(t)]
    generated = result.tokens[: eos[0]] if eos else result.tokens
    assert generated, "nothing was generated"
    logits = tiny.logits(prompt + generated)  # teacher-forced: each position's argmax is the next token
    n = len(prompt)
    assert [int(t) for t in np.argmax(logits[n - 1 : n - 1 + len(generated)], axis=-1)] == generated
    assert result.text == tiny.detokenize(generated)


def test_calls_do_not_share_state(tiny):
    ids = tiny.tokenize("the little water")
    first = tiny.logits(ids)
    tiny.generate("other words", max_tokens=3)
    np.testing.assert_array_equal(tiny.logits(ids), first)


@pytest.mark.oracle
def test_readme_example_checks_llama_cpp(smollm_path):
    """The README's example: another engine's logits (llama.cpp through llama-cpp-python here) against
    refengine's, by KL and top-1. llama.cpp rounds activations to 8 bits: the bar is statistical."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    oracle = refengine.load("smollm2-135m")
    ids = oracle.tokenize("The history of the printing press begins in the fifteenth century, when")
    llm = llama_cpp.Llama(str(smollm_path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    ours = oracle.logits(ids)
    logp = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    logq = theirs - np.logaddexp.reduce(theirs, axis=-1, keepdims=True)
    kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)  # KL(refengine || engine) per position
    assert kl.mean() < 0.02
    assert np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= 0.9
    llm.close()
