"""A model ready to run: the open file, the architecture's model, its tokenizer,
and what loading them cost."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from refengine.arch import load_model
from refengine.errors import RefengineError
from refengine.gguf import GGUFFile, open_gguf
from refengine.models import resolve_model
from refengine.nn import KVCache
from refengine.tokenizer import Tokenizer

PRECISIONS = {"f32": np.float32, "f64": np.float64}


@dataclass
class Session:
    gguf: GGUFFile
    model: object  # a refengine.arch DecoderModel
    tokenizer: Tokenizer
    load_s: float

    @classmethod
    def load(cls, model: str | GGUFFile, precision: str = "f32") -> Session:
        """`model` is a name or path, or a file the caller has already opened (the memory plan's)."""
        start = time.perf_counter()
        gguf = model if isinstance(model, GGUFFile) else open_gguf(resolve_model(model))
        session = cls(gguf, load_model(gguf, PRECISIONS[precision]), Tokenizer.from_gguf(gguf), 0.0)
        session.load_s = time.perf_counter() - start
        return session

    def new_cache(self, n_ctx: int) -> KVCache:
        if n_ctx < 1:
            raise RefengineError(f"--ctx must be at least 1, got {n_ctx}")
        try:
            return self.model.new_cache(n_ctx)
        except (MemoryError, OverflowError, OSError) as e:  # the mapping refused (ENOMEM), or a size past int64
            reason = getattr(e, "strerror", None) or e
            raise RefengineError(f"--ctx {n_ctx}: cannot allocate the KV cache: {reason}") from None


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory (not the file-backed weights), from /proc/self/status."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
