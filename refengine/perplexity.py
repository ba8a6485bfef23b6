"""Perplexity of a text, computed as llama.cpp's `llama-perplexity` computes it
(tools/perplexity/perplexity.cpp, `perplexity`), so that the two can be compared number for number.

- The file is read verbatim, less one trailing newline (common/arg.cpp's `-f`), and tokenized once,
  with BOS when the model asks for one.
- The tokens are cut into n_chunk = n_tokens // n_ctx chunks of n_ctx tokens (the rest is dropped).
  Each chunk is evaluated from an empty KV cache, its first token replaced by BOS.
- Only the second half of a chunk is scored, so every scored token has at least n_ctx/2 tokens of
  context: the logits at positions first = n_ctx/2 .. n_ctx-2 predict the tokens at first+1 .. n_ctx-1,
  n_ctx - 1 - first per chunk.
- PPL = exp(mean NLL); its error is PPL times the standard error of the mean NLL, and
  `Final estimate: PPL = x +/- y` is printed as llama.cpp prints it.

The last token of a chunk is never evaluated (its logits would score nothing), the unscored first
half is evaluated without logits, and the scored half in slices of at most LOGITS_BUDGET bytes of
logits, so memory does not grow with the text. Each forward call decodes every weight tile again,
so fewer, larger slices are faster: best of 3 on one loaded machine, a gemma3-270m chunk took 15.9 s
with its scored half in one call (255 MiB of logits), 18.5 s in 128 MiB slices, 25.7 s in 64 MiB and
42 s in 32 MiB. 128 MiB (gemma3: two calls) keeps most of the speed for half the memory; smollm2's
whole scored half is 48 MiB. llama-perplexity itself holds 4 chunks' scored logits at once (1 GiB
on gemma3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from refengine.errors import RefengineError

LOGITS_BUDGET = 128 << 20  # bytes of float32 logits one forward call may return
SOFTMAX_ROWS = 16  # rows per log-softmax step, to keep its (rows, n_vocab) temporaries small


class PerplexityError(RefengineError):
    """A text too short for the context, a bad --ctx or --chunks."""


def read_text(path: str | Path) -> bytes:
    """The file's bytes as llama.cpp's `-f` reads them: verbatim, less one trailing newline."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PerplexityError(f"{path}: {e.strerror}") from None
    return data[:-1] if data.endswith(b"\n") else data


def n_chunks_for(n_tokens: int, n_ctx: int, n_chunks: int | None = None) -> int:
    """How many chunks llama-perplexity scores: n_tokens // n_ctx, at most n_chunks."""
    if n_ctx < 4:
        raise PerplexityError(f"--ctx must be at least 4 to score half of each chunk, got {n_ctx}")
    if n_tokens < 2 * n_ctx:
        raise PerplexityError(
            f"the text is {n_tokens} tokens; perplexity with a context of {n_ctx} needs at least {2 * n_ctx}"
        )
    if n_chunks is not None and n_chunks < 1:
        raise PerplexityError(f"--chunks must be at least 1, got {n_chunks}")
    most = n_tokens // n_ctx
    return most if n_chunks is None else min(n_chunks, most)


def chunk_input(tokens: np.ndarray, bos_id: int | None) -> np.ndarray:
    """One chunk as it is evaluated: a copy with its first token replaced by BOS (when the model adds one)."""
    chunk = np.array(tokens, dtype=np.int64)  # (n_ctx,)
    if bos_id is not None:
        chunk[0] = bos_id
    return chunk


def scored_logits(session, chunk: np.ndarray, first: int):
    """Evaluate a chunk from an empty cache; yield (start, logits) for positions first .. n_ctx-2.

    logits is (n_rows, n_vocab) for positions start .. start+n_rows-1, in slices of at most
    LOGITS_BUDGET bytes. The first half goes through without logits (all_logits=False).
    """
    n_ctx = len(chunk)
    n_vocab = session.model.config.n_vocab
    cache = session.new_cache(n_ctx)
    session.model.forward(chunk[:first], cache, all_logits=False)
    rows = max(1, LOGITS_BUDGET // (4 * n_vocab))
    for start in range(first, n_ctx - 1, rows):
        stop = min(start + rows, n_ctx - 1)
        yield start, session.model.forward(chunk[start:stop], cache, all_logits=True)  # (stop - start, n_vocab)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] for each row: (n, n_vocab), (n,) -> (n,) float64.

    As llama.cpp's log_softmax: the max subtracted in the logits' own precision, exp in that
    precision, the sum of the exponentials in float64."""
    nll = np.empty(len(targets), dtype=np.float64)
    for i in range(0, len(targets), SOFTMAX_ROWS):
        x = logits[i : i + SOFTMAX_ROWS]  # (rows, n_vocab)
        top = x.max(axis=-1, keepdims=True)
        sum_exp = np.exp(x - top).sum(axis=-1, dtype=np.float64)
        picked = np.take_along_axis(x, targets[i : i + SOFTMAX_ROWS, None], axis=-1)[:, 0]
        nll[i : i + SOFTMAX_ROWS] = np.log(sum_exp) - (picked - top[:, 0])
    return nll


@dataclass
class PerplexityResult:
    """What llama-perplexity reports, and how long it took."""

    n_ctx: int
    n_tokens: int  # of the whole text
    n_chunk: int
    n_scored: int  # tokens scored: n_chunk * (n_ctx - 1 - n_ctx // 2)
    nll_sum: float = 0.0
    nll2_sum: float = 0.0
    chunk_ppl: list[float] = field(default_factory=list)  # the running estimate after each chunk, as [1]x,[2]y,...
    seconds: float = 0.0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_scored)

    @property
    def ppl_error(self) -> float:
        """PPL times the standard error of the mean NLL, as llama.cpp's Final estimate (0 when undefined)."""
        mean = self.nll_sum / self.n_scored
        var = self.nll2_sum / self.n_scored - mean * mean
        return self.ppl * math.sqrt(var / (self.n_scored - 1)) if var > 0 and self.n_scored > 1 else 0.0

    def add(self, nll: np.ndarray) -> None:
        self.nll_sum += float(nll.sum())
        self.nll2_sum += float(np.square(nll).sum())

    def final_line(self) -> str:
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_error:.5f}"

    def as_dict(self) -> dict:
        done = len(self.chunk_ppl) * (self.n_ctx - 1 - self.n_ctx // 2)
        return {
            **asdict(self),
            "ppl": self.ppl if done == self.n_scored else None,
            "ppl_error": self.ppl_error if done == self.n_scored else None,
            "tokens_per_s": self.n_chunk * self.n_ctx / self.seconds if self.seconds else 0.0,
        }


def perplexity(
    session,
    tokens: list[int] | np.ndarray,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    on_chunk: Callable[[int, PerplexityResult], None] | None = None,
    on_logits: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `tokens` (the text's ids, BOS included) under a refengine Session.

    on_chunk(i, result) is called after chunk i is scored. on_logits(i, logits, targets) receives
    every scored slice of chunk i in order (the KL-divergence base file writer uses it).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n_chunk = n_chunks_for(len(tokens), n_ctx, n_chunks)
    first = n_ctx // 2
    bos = session.tokenizer.bos_id if session.tokenizer.vocab.add_bos else None
    result = PerplexityResult(n_ctx, len(tokens), n_chunk, n_chunk * (n_ctx - 1 - first))
    start_time = time.perf_counter()
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]  # (n_ctx,) as tokenized: the targets keep the original first token
        for start, logits in scored_logits(session, chunk_input(chunk, bos), first):
            targets = chunk[start + 1 : start + 1 + len(logits)]  # the token each row predicts
            result.add(token_nll(logits, targets))
            if on_logits is not None:
                on_logits(i, logits, targets)
        done = (i + 1) * (n_ctx - 1 - first)
        result.chunk_ppl.append(math.exp(result.nll_sum / done))
        result.seconds = time.perf_counter() - start_time
        if on_chunk is not None:
            on_chunk(i, result)
    return result
