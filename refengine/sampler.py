"""Choosing the next token from logits.

The order of the filters follows llama.cpp's default sampler chain:
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
temperature 0 is greedy (argmax) and ignores the rest.

Logits that are not finite (NaN or infinite: a broken model, or float overflow) are refused with
NonFiniteLogits rather than sampled: argmax over NaN picks token 0, and softmax over them is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from refengine.errors import RefengineError
from refengine.nn import softmax


class SamplerError(RefengineError):
    pass


class NonFiniteLogits(SamplerError):
    """The model produced NaN or infinite logits. `n_evaluated`: the tokens evaluated so far."""

    def __init__(self, message: str, n_evaluated: int):
        super().__init__(message)
        self.n_evaluated = n_evaluated


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self):
        finite = all(math.isfinite(v) for v in (self.temperature, self.top_p, self.min_p, self.repeat_penalty))
        checks = [
            (finite, "--temp, --top-p, --min-p and --repeat-penalty must be finite numbers"),
            (self.temperature >= 0, "--temp must be >= 0"),
            (self.top_k >= 0, "--top-k must be >= 0"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "--min-p must be in [0, 1]"),
            (self.repeat_penalty > 0, "--repeat-penalty must be > 0"),
            (self.repeat_last_n >= 0, "--repeat-last-n must be >= 0"),
            (self.seed is None or self.seed >= 0, "--seed must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplerError(message)


class Sampler:
    def __init__(self, config: SamplerConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        """One token id from logits (n_vocab,), given the ids generated or prompted so far."""
        c = self.config
        check_finite(logits, len(history))
        logits = logits.astype(np.float64)  # a copy: the caller's logits stay as the model made them
        if c.repeat_penalty != 1.0 and c.repeat_last_n and history:
            apply_repetition_penalty(logits, history[-c.repeat_last_n :], c.repeat_penalty)
        if c.temperature == 0:
            return int(np.argmax(logits))
        ids = np.arange(len(logits))
        if c.top_k:
            keep = np.argpartition(-logits, min(c.top_k, len(logits)) - 1)[: c.top_k]
            ids, logits = keep, logits[keep]
        order = np.argsort(-logits, kind="stable")  # most likely first
        ids, logits = ids[order], logits[order]
        probs = softmax(logits)
        if c.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (at least one token)
            cut = int(np.searchsorted(np.cumsum(probs), c.top_p)) + 1
            ids, logits, probs = ids[:cut], logits[:cut], probs[:cut]
        if c.min_p > 0.0:
            keep = probs >= c.min_p * probs[0]
            ids, logits = ids[keep], logits[keep]
        probs = softmax(logits, temperature=c.temperature)
        return int(ids[self.rng.choice(len(ids), p=probs)])


def check_finite(logits: np.ndarray, n_evaluated: int) -> None:
    """Raise NonFiniteLogits unless every logit is a finite number."""
    finite = np.isfinite(logits)
    if not finite.all():
        bad = logits[~finite]
        kinds = ", ".join(f"{n} {name}" for name, n in _count_kinds(bad) if n)
        raise NonFiniteLogits(
            f"the model's logits are not finite ({kinds} of {logits.size}) after {n_evaluated} tokens",
            n_evaluated,
        )


def _count_kinds(values: np.ndarray) -> list[tuple[str, int]]:
    return [
        ("NaN", int(np.isnan(values).sum())),
        ("+inf", int(np.isposinf(values).sum())),
        ("-inf", int(np.isneginf(values).sum())),
    ]


def apply_repetition_penalty(logits: np.ndarray, recent: list[int], penalty: float) -> None:
    """As llama.cpp (and the CTRL paper): divide positive logits by the penalty, multiply negative ones."""
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    values = logits[seen]
    with np.errstate(over="ignore"):  # a tiny penalty may push a logit to inf: softmax takes care of it
        logits[seen] = np.where(values > 0, values / penalty, values * penalty)
