"""The Python API: refengine as an oracle inside another engine's tests.

    import refengine
    model = refengine.load("smollm2-135m", precision="f64")
    ids = model.tokenize("The capital of France is")
    logits = model.logits(ids)                          # (len(ids), n_vocab) float64
    trace = model.trace(ids, filter=r"l_out-\\d+")      # every layer's output, llama.cpp's names
    text = model.generate("Once upon a time", max_tokens=32).text
    result = model.perplexity(open("wiki.test.raw", "rb").read())

The CLI's perplexity, trace and compare commands are built on it. `Model.session` is the
underlying refengine.session.Session (the architecture's model, the tokenizer, the open file).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from refengine.errors import RefengineError
from refengine.nn import NUMERICS
from refengine.session import PRECISIONS, Session

if TYPE_CHECKING:
    from refengine.generate import GenerationResult
    from refengine.kld import KLDReport
    from refengine.perplexity import PerplexityResult
    from refengine.trace import Trace

Precision = Literal["f32", "f64"]
Numerics = Literal["exact", "ggml"]
CacheType = Literal["f16", "f32"]


class APIError(RefengineError):
    """A bad argument to the Python API: an unknown precision, no tokens, an id out of range."""


class Model:
    """A loaded model. Every method evaluates from an empty KV cache: calls do not affect each other."""

    def __init__(self, session: Session, precision: Precision):
        self.session = session
        self.precision = precision

    @property
    def architecture(self) -> str:
        return self.session.gguf.architecture

    @property
    def n_vocab(self) -> int:
        return self.session.model.config.n_vocab

    @property
    def numerics(self) -> str:
        """ "exact" or "ggml": see refengine.load."""
        return self.session.numerics

    @property
    def dtype(self) -> np.dtype:
        """The dtype of logits and traced tensors: float32 or float64, as the precision."""
        return self.session.model.dtype

    @property
    def bos_id(self) -> int | None:
        """The BOS id, or None when the model adds no BOS (llama.cpp's llama_vocab_get_add_bos)."""
        return self.session.tokenizer.bos_id if self.session.tokenizer.vocab.add_bos else None

    def tokenize(self, text: str | bytes, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """llama.cpp's ids for text. add_bos None follows the model; parse_special reads <|im_start|> etc."""
        return self.session.tokenizer.encode(text, add_bos=add_bos, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.session.tokenizer.decode(list(tokens))

    def _tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            raise APIError("no tokens to evaluate")
        bad = (ids < 0) | (ids >= self.n_vocab)
        if bad.any():
            raise APIError(f"token id {int(ids[bad][0])} is outside the vocabulary (0..{self.n_vocab - 1})")
        return ids

    def logits(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """The logits of every position, teacher-forced in one batch: (n_tokens, n_vocab) in self.dtype.
        tokens are evaluated as given: add BOS yourself (tokenize does, when the model wants it)."""
        ids = self._tokens(tokens)
        cache = self.session.new_cache(len(ids))
        return self.session.model.forward(ids, cache, all_logits=True)

    def trace(
        self,
        tokens: Sequence[int] | np.ndarray,
        filter: str | None = None,  # noqa: A002  (the documented keyword)
        positions: Literal["all", "last"] = "all",
    ) -> Trace:
        """Every intermediate tensor of one forward pass, by llama.cpp's graph names (inp_embd, attn_norm-0,
        Qcur-0, ..., result_output), in forward order. filter: a regular expression the names must match
        (re.search); positions "last" keeps only the last position of each tensor."""
        from refengine.trace import record

        return record(self, self._tokens(tokens), filter, positions)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Continue a prompt (text, tokenized with BOS as the model asks, or ids). temperature 0 is greedy."""
        from refengine.generate import generate
        from refengine.sampler import Sampler, SamplerConfig

        ids = self.tokenize(prompt) if isinstance(prompt, str | bytes) else [int(t) for t in self._tokens(prompt)]
        sampler = Sampler(SamplerConfig(temperature, top_k, top_p, min_p, seed=seed))
        cache = self.session.new_cache(len(ids) + max_tokens)
        return generate(
            self.session.model, self.session.tokenizer, cache, ids, max_tokens, sampler, tuple(stop), on_text
        )

    def perplexity(
        self,
        text: str | bytes,
        n_ctx: int = 512,
        n_chunks: int | None = None,
        kl_divergence_base: str | os.PathLike | None = None,
        on_chunk: Callable | None = None,
    ) -> PerplexityResult:
        """Perplexity of a text exactly as `llama-perplexity -c n_ctx` computes it (refengine.perplexity).
        With kl_divergence_base, also write llama.cpp's KL-divergence base file of these logits there."""
        from refengine.kld import LogitsFileWriter
        from refengine.perplexity import n_chunks_for, perplexity

        tokens = self.tokenize(text)
        if kl_divergence_base is None:
            return perplexity(self.session, tokens, n_ctx, n_chunks, on_chunk=on_chunk)
        n_chunk = n_chunks_for(len(tokens), n_ctx, n_chunks)
        writer = LogitsFileWriter(kl_divergence_base, n_ctx, self.n_vocab, n_chunk, np.asarray(tokens))
        try:
            result = perplexity(
                self.session, tokens, n_ctx, n_chunk, on_chunk=on_chunk, on_logits=lambda i, x, t: writer.write(x)
            )
        except BaseException:  # Ctrl-C included: no half-written file is left behind
            writer.discard()
            raise
        writer.close()
        return result

    def kl_divergence(
        self, kl_divergence_base: str | os.PathLike, n_chunks: int | None = None, on_chunk: Callable | None = None
    ) -> KLDReport:
        """This model against a llama.cpp base file, as `llama-perplexity --kl-divergence`: the file's tokens
        and n_ctx; KLD, PPL(Q) against PPL(base), delta-p and same-top share (refengine.kld)."""
        from refengine.kld import kl_divergence, open_logits_file

        return kl_divergence(self.session, open_logits_file(kl_divergence_base), n_chunks, on_chunk).report()


def load(
    name_or_path: str | os.PathLike,
    precision: Precision = "f32",
    numerics: Numerics = "exact",
    cache_type: CacheType | None = None,
) -> Model:
    """Load a GGUF model by path (any split of a split model) or short name (gemma3-270m, smollm2-135m).

    precision "f32" computes as a float32 engine does; "f64" accumulates everything in float64, the
    exact function the file defines. numerics "exact" computes the file's function; "ggml" (f32 only)
    computes as llama.cpp's CPU backend does: activations quantized to 8 bits for each matmul, integer
    dot products, an f16 KV cache, or with cache_type "f32" llama.cpp's -ctk f32 -ctv f32 (flash attention off).
    Weights stay memory-mapped; nothing is copied."""
    if precision not in PRECISIONS:
        raise APIError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if numerics not in NUMERICS:
        raise APIError(f"numerics {numerics!r}: use one of {', '.join(NUMERICS)}")
    if numerics == "ggml" and precision != "f32":
        raise APIError("numerics 'ggml' is llama.cpp's float32 arithmetic: use precision 'f32' (f64 is exact)")
    if cache_type is not None and numerics != "ggml":
        raise APIError(f"cache_type {cache_type!r} is for numerics 'ggml'; exact numerics caches in its precision")
    return Model(Session.load(os.fspath(name_or_path), precision, numerics, cache_type), precision)
