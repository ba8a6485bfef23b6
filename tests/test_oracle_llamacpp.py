"""The forward pass against live llama.cpp (llama-cpp-python), on both real models.

For each prompt of oracle_utils.PROMPTS, llama.cpp greedily continues it by N_GENERATE
tokens; the whole sequence is then teacher-forced through llama.cpp (one batch) and
through refengine (one forward call at f32), and their next-token distributions compared
at every position. llama.cpp is not exact (8-bit activations in its quantized matmuls),
so the bar is statistical, not a per-logit tolerance; see oracle_utils for the bounds.
"""

import numpy as np
import pytest

from refengine.testing.oracle_utils import (
    CASES,
    MAX_MEAN_KL,
    MIN_TOP1,
    MODELS,
    N_GENERATE,
    PROMPTS,
    decisive_disagreements,
    kl_divergence,
    llama_cpp_generate_and_score,
    log_softmax,
    model_path,
    open_llama,
    prompt,
    refengine_logits,
    session,
    top2_margin,
)

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[oracle]')")

pytestmark = [pytest.mark.oracle, pytest.mark.slow]


@pytest.fixture(scope="module")
def llama_cpp_run(request):
    """(model, case) -> (tokens, first, llama.cpp's logits at positions first..), each made once:
    the per-prompt tests and the per-model top-1 test look at the same runs."""
    llms, runs = {}, {}

    def run(model: str, case: str):
        if (model, case) not in runs:
            if model not in llms:
                llms[model] = open_llama(model_path(request, model))
            p = prompt(model, case)
            n_prompt, tokens, first, logits = llama_cpp_generate_and_score(llms[model], p)
            assert len(tokens) == n_prompt + N_GENERATE
            # Both sides must read the same prompt, BOS included as each model asks.
            ours = session(model, "f32").tokenizer.encode(p.text, parse_special=p.parse_special)
            assert ours == tokens[:n_prompt]
            runs[model, case] = tokens, first, logits
        return runs[model, case]

    yield run
    for llm in llms.values():
        llm.close()


@pytest.mark.parametrize(("model", "case"), CASES)
def test_next_token_distributions_match_llama_cpp(llama_cpp_run, model, case):
    tokens, first, theirs = llama_cpp_run(model, case)
    ours = refengine_logits(model, "f32", tokens, first)
    assert ours.shape == theirs.shape

    kl = kl_divergence(log_softmax(theirs), log_softmax(ours))
    their_top1, our_top1 = np.argmax(theirs, axis=-1), np.argmax(ours, axis=-1)
    flips = decisive_disagreements(their_top1, top2_margin(theirs), our_top1)
    print(
        f"{model} {case}: {len(ours)} positions, mean KL {kl.mean():.5f} nats (max {kl.max():.4f}), "
        f"top-1 {np.mean(their_top1 == our_top1):.1%}"
    )
    assert kl.mean() <= MAX_MEAN_KL, f"mean KL(llama.cpp || refengine) {kl.mean():.4f} nats"
    assert not len(flips), f"llama.cpp was sure of another token at positions {flips + first}"


@pytest.mark.parametrize("model", MODELS)
def test_top1_agrees_with_llama_cpp(llama_cpp_run, model):
    agree = total = 0
    for p in PROMPTS[model]:
        tokens, first, theirs = llama_cpp_run(model, p.name)
        ours = refengine_logits(model, "f32", tokens, first)
        agree += int(np.sum(np.argmax(theirs, axis=-1) == np.argmax(ours, axis=-1)))
        total += len(ours)
    print(f"{model}: top-1 agreement {agree / total:.1%} over {total} positions")
    assert agree / total >= MIN_TOP1
