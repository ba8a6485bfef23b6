"""Generation as small pure steps: prefill the prompt, decode one token, sample, repeat.

`generate` strings them together, streams text through a callback and returns
a GenerationResult with the timings a user of llama.cpp expects to see.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from refengine.nn import KVCache
from refengine.nonfinite import locate
from refengine.sampler import NonFiniteLogits, Sampler


@dataclass
class Timings:
    load_s: float = 0.0
    prompt_s: float = 0.0
    generation_s: float = 0.0
    n_prompt: int = 0
    n_generated: int = 0

    @property
    def prompt_tok_s(self) -> float:
        return self.n_prompt / self.prompt_s if self.prompt_s else 0.0

    @property
    def generation_tok_s(self) -> float:
        # the first token comes out of prefill, so decode time covers the rest
        return max(self.n_generated - 1, 0) / self.generation_s if self.generation_s else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "prompt_tok_s": self.prompt_tok_s, "generation_tok_s": self.generation_tok_s}


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "length" | "eos" | "stop" | "interrupted"
    timings: Timings = field(default_factory=Timings)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "text": self.text,
            "timings": self.timings.as_dict(),
            "finish_reason": self.finish_reason,
        }


def prefill(model, cache: KVCache, tokens: list[int]) -> np.ndarray:
    """Evaluate the prompt as one batch; logits of its last position (n_vocab,)."""
    return model.forward(np.asarray(tokens), cache, all_logits=False)[-1]


def decode_one(model, cache: KVCache, token: int) -> np.ndarray:
    """Evaluate one token at the next position; its logits (n_vocab,)."""
    return model.forward(np.asarray([token]), cache, all_logits=False)[-1]


def generate(
    model,
    tokenizer,
    cache: KVCache,
    prompt_tokens: list[int],
    max_tokens: int,
    sampler: Sampler,
    stop: tuple[str, ...] = (),
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate up to `max_tokens` after `prompt_tokens`, continuing from `cache`.

    Stops at an end-of-generation token, at any `stop` string (which is not
    emitted), or at `max_tokens`. Ctrl-C ends it early with what was produced.
    """
    result = GenerationResult(prompt_tokens=list(prompt_tokens))
    timings = result.timings
    timings.n_prompt = len(prompt_tokens)
    history = list(prompt_tokens)
    decoder = tokenizer.stream()
    emitted = ""  # text already passed to on_text
    held = ""  # decoded text held back because it might begin a stop string
    try:
        start = time.perf_counter()
        logits = prefill(model, cache, prompt_tokens)
        timings.prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        while len(result.tokens) < max_tokens:
            token = sampler(logits, history)
            if tokenizer.is_eog(token):
                result.finish_reason = "eos"
                break
            result.tokens.append(token)
            history.append(token)
            held += decoder.feed(token)
            cut = _find_stop(held, stop)
            if cut is not None:
                held = held[:cut]
                result.finish_reason = "stop"
                break
            ready = len(held) - _stop_prefix_len(held, stop)
            if ready and on_text:
                on_text(held[:ready])
            emitted, held = emitted + held[:ready], held[ready:]
            if len(result.tokens) == max_tokens:
                break
            logits = decode_one(model, cache, token)
        timings.generation_s = time.perf_counter() - start
    except KeyboardInterrupt:
        result.finish_reason = "interrupted"
    except NonFiniteLogits as e:  # name the layer that produced them (refengine.nonfinite)
        raise locate(e, model, history) from None
    held += decoder.flush() if result.finish_reason != "stop" else ""
    if held and on_text:
        on_text(held)
    result.text = emitted + held
    timings.n_generated = len(result.tokens)
    return result


def _find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best
