"""A model ready to run: the open file, the architecture's model, its tokenizer,
and what loading them cost."""

from __future__ import annotations

import os
import threading
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

    @property
    def numerics(self) -> str:
        return self.model.numerics

    @classmethod
    def load(
        cls, model: str | GGUFFile, precision: str = "f32", numerics: str = "exact", cache_type: str | None = None
    ) -> Session:
        """`model` is a name or path, or a file the caller has already opened (the memory plan's).
        numerics "exact" or "ggml" (llama.cpp's CPU arithmetic, f32 only; see refengine.nn.NUMERICS), and in
        ggml numerics the KV cache type, f16 (default) or f32 (llama.cpp's -ctk/-ctv)."""
        start = time.perf_counter()
        if precision not in PRECISIONS:
            raise RefengineError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        gguf_file = model if isinstance(model, GGUFFile) else open_gguf(resolve_model(model))
        session = cls(
            gguf_file,
            load_model(gguf_file, PRECISIONS[precision], numerics, cache_type),
            Tokenizer.from_gguf(gguf_file),
            0.0,
        )
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


class PeakAnon:
    """The peak of this process's anonymous resident memory over a `with` block.

    The kernel keeps a peak of the whole resident set (VmHWM), which counts the mapped weights too,
    but none of the anonymous part alone; so a thread samples it every `interval` seconds from
    /proc/self/statm (resident minus shared pages: RssAnon), about 10 us a sample. A prefill step's
    activations live for tens of milliseconds, far longer than the interval, so the peak is seen.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE")
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:  # no /proc: the peak stays 0 (unknown)
            self._fd = None

    def sample(self) -> int:
        if self._fd is not None:
            _, resident, shared = os.pread(self._fd, 128, 0).split()[:3]
            self.peak = max(self.peak, (int(resident) - int(shared)) * self._page)
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakAnon:
        self.sample()
        if self._fd is not None:
            self._thread = threading.Thread(target=self._run, name="refengine-peak-anon", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
