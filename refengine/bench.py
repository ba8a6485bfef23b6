"""llama-bench-style model figures: prompt processing (ppN) and text generation (tgN) in tokens/s.

As llama-bench does: ppN evaluates N tokens as a prompt (in micro-batches of n_ubatch), tgN decodes
N tokens one at a time, each after DEPTH tokens already in the cache (llama-bench's -d; 0 by
default). Token ids are random (the speed does not depend on them); the depth is filled once, untimed,
and each test runs once untimed to warm up.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from refengine.generate import decode_one, prefill


@dataclass
class BenchRecord:
    """One llama-bench row; the field names are llama-bench's JSON names."""

    model_filename: str
    model_type: str
    model_size: int  # bytes of weights
    model_n_params: int
    n_threads: int
    n_prompt: int
    n_gen: int
    n_depth: int
    test: str  # "pp512", "tg128", "pp512 @ d4096"
    avg_ts: float  # tokens per second, mean over repetitions
    stddev_ts: float
    samples_ts: list[float]
    backend: str = "refengine-numba"
    precision: str = "f32"
    numerics: str = "exact"  # or "ggml": llama.cpp's CPU arithmetic (refengine.nn.NUMERICS)

    def as_dict(self) -> dict:
        return asdict(self)


def n_threads() -> int:
    import numba

    return numba.get_num_threads()


class Context:
    """A KV cache holding `depth` random tokens, rewound to them before each timed run."""

    def __init__(self, model, n_ctx: int, depth: int, rng):
        self.model, self.depth = model, depth
        self.cache = model.new_cache(n_ctx)
        self.filler = rng.integers(0, model.config.n_vocab, size=depth)

    def rewound(self):
        # A sliding-window ring that moved past the depth cannot be rewound to it: fill it again.
        if self.cache.keep(self.depth) != self.depth:
            self.cache.keep(0)
            prefill(self.model, self.cache, self.filler)
        return self.cache


def time_prompt(context: Context, n_prompt: int, rng) -> float:
    tokens = rng.integers(0, context.model.config.n_vocab, size=n_prompt)
    cache = context.rewound()
    start = time.perf_counter()
    prefill(context.model, cache, tokens)
    return time.perf_counter() - start


def time_generation(context: Context, n_gen: int, rng) -> float:
    tokens = rng.integers(0, context.model.config.n_vocab, size=n_gen)
    cache = context.rewound()
    start = time.perf_counter()
    for token in tokens:
        decode_one(context.model, cache, int(token))
    return time.perf_counter() - start


def bench_model(
    session, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3, precision: str = "f32", depth: int = 0
) -> list[BenchRecord]:
    from refengine.info import file_type_name

    model, gguf_file = session.model, session.gguf
    file_type = file_type_name(gguf_file.get("general.file_type"))
    rng = np.random.default_rng(0)
    at = f" @ d{depth}" if depth else ""
    tests = []
    if n_prompt:
        context = Context(model, depth + n_prompt, depth, rng)
        tests.append((f"pp{n_prompt}{at}", n_prompt, 0, functools.partial(time_prompt, context, n_prompt, rng)))
    if n_gen:
        context = Context(model, depth + n_gen, depth, rng)
        tests.append((f"tg{n_gen}{at}", 0, n_gen, functools.partial(time_generation, context, n_gen, rng)))
    records = []
    for name, n_p, n_g, run in tests:
        run()  # warm-up: numba kernels load, pages fault in
        speeds = [(n_p + n_g) / run() for _ in range(repetitions)]
        records.append(
            BenchRecord(
                model_filename=os.path.basename(gguf_file.path),
                model_type=f"{gguf_file.architecture} {file_type or ''}".strip(),
                model_size=sum(t.nbytes for t in gguf_file.tensors.values()),
                model_n_params=gguf_file.n_params,
                n_threads=n_threads(),
                n_prompt=n_p,
                n_gen=n_g,
                n_depth=depth,
                test=name,
                avg_ts=statistics.fmean(speeds),
                stddev_ts=statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
                samples_ts=speeds,
                precision=precision,
                numerics=session.numerics,
            )
        )
    return records


def markdown(records: list[BenchRecord]) -> str:
    """llama-bench's table layout."""
    lines = [
        "| model | size | params | backend | threads | test | t/s |",
        "| ----- | ---: | -----: | ------- | ------: | ---: | --: |",
    ]
    for r in records:
        lines.append(
            f"| {r.model_type} | {r.model_size / 2**20:.2f} MiB | {r.model_n_params / 1e6:.2f} M "
            f"| {r.backend} {r.numerics} | {r.n_threads} | {r.test} | {r.avg_ts:.2f} ± {r.stddev_ts:.2f} |"
        )
    return "\n".join(lines)
