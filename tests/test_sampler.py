"""Samplers on hand-made logits, and the stop-string bookkeeping of generation."""

import numpy as np
import pytest

from refengine.generate import _find_stop, _stop_prefix_len
from refengine.sampler import Sampler, SamplerConfig, SamplerError, apply_repetition_penalty

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.0], dtype=np.float32)  # argmax 1, runner-up 2


def draws(config, n=300, history=()):
    sampler = Sampler(config)
    return [sampler(LOGITS, list(history)) for _ in range(n)]


def test_temperature_zero_is_argmax():
    assert set(draws(SamplerConfig(temperature=0, seed=1), n=20)) == {1}


def test_same_seed_same_tokens_and_other_seed_differs():
    config = SamplerConfig(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    assert draws(config) == draws(config)
    assert draws(config) != draws(SamplerConfig(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=43))


def test_top_k_keeps_only_the_k_best():
    assert set(draws(SamplerConfig(temperature=5.0, top_k=2, top_p=1.0, min_p=0.0, seed=0))) == {1, 2}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # softmax(LOGITS): p(1) ~ 0.50, p(2) ~ 0.30, p(0) ~ 0.07: top_p=0.6 keeps ids 1 and 2 only
    got = set(draws(SamplerConfig(temperature=1.0, top_k=0, top_p=0.6, min_p=0.0, seed=0)))
    assert got == {1, 2}


def test_min_p_drops_tokens_far_below_the_best():
    # p(2)/p(1) = e^-0.5 ~ 0.61 survives min_p 0.5; p(0)/p(1) = e^-2 ~ 0.14 does not
    got = set(draws(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=0)))
    assert got == {1, 2}


def test_full_distribution_matches_softmax():
    n = 20000
    got = (
        np.bincount(draws(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3), n=n), minlength=5) / n
    )
    expected = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
    np.testing.assert_allclose(got, expected, atol=0.015)  # ~4 standard errors at n = 20000


def test_repetition_penalty_as_llama_cpp():
    logits = np.array([2.0, -2.0, 1.0])
    apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_array_equal(logits, [1.0, -4.0, 1.0])
    # greedy with a strong penalty on the best token picks the runner-up
    assert draws(SamplerConfig(temperature=0, repeat_penalty=10.0), n=1, history=[1]) == [2]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=2.0),
        dict(repeat_penalty=0.0),
        dict(repeat_last_n=-1),
    ],
)
def test_bad_settings_are_clear_errors(kwargs):
    with pytest.raises(SamplerError, match="--"):
        SamplerConfig(**kwargs)


def test_stop_strings():
    assert _find_stop("hello world", ("wor", "xyz")) == 6
    assert _find_stop("hello", ("xyz",)) is None
    # text that may still grow into a stop string is held back
    assert _stop_prefix_len("the end of", ("of the",)) == 2
    assert _stop_prefix_len("abc", ("xyz",)) == 0
