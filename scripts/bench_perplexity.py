#!/usr/bin/env python3
"""refengine perplexity beside llama-perplexity, alternating in one run on the same text and threads.

Each round runs llama-perplexity (scripts/build_llama_tools.sh builds it) on the quantized file, then
refengine's perplexity in this process, over the same chunks of tests/data/python_reference.txt.xz;
the ratio of their times is the figure (a ratio in one run, since the machine's speed varies). Also
reported: refengine's peak anonymous memory over the run (RssAnon, sampled after each chunk) and
llama-perplexity's peak RSS (its weights are mapped too, so the two are not the same measure).
"""

from __future__ import annotations

import json
import lzma
import resource
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent

import refengine  # noqa: E402
from refengine.models import resolve_model  # noqa: E402
from refengine.session import rss_anon_bytes  # noqa: E402
from refengine.testing.llama_tools import parse_perplexity, run_tool  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "--model", default="gemma3-270m", show_default=True)
@click.option("--chunks", default=40, show_default=True, type=click.IntRange(min=1), help="Chunks of 512 tokens.")
@click.option("-r", "--rounds", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
def main(model: str, chunks: int, rounds: int, as_json: bool) -> None:
    """Time refengine perplexity against llama-perplexity (-c 512, 2 threads)."""
    text = lzma.decompress((ROOT / "tests/data/python_reference.txt.xz").read_bytes())
    loaded = refengine.load(model)
    loaded.perplexity(text, 512, 1)  # compiles the kernels once, outside the timing
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        text_path = Path(tmp) / "text.txt"
        text_path.write_bytes(text)
        for _ in range(rounds):
            start = time.perf_counter()
            theirs = parse_perplexity(
                run_tool("llama-perplexity", "-m", resolve_model(model), "-f", text_path, "-c", 512, "--chunks", chunks)
            )
            llama_s = time.perf_counter() - start
            peak = [rss_anon_bytes()]
            ours = loaded.perplexity(text, 512, chunks, on_chunk=lambda i, r, peak=peak: peak.append(rss_anon_bytes()))
            record = {
                "model": model,
                "tokens": chunks * 512,
                "llama_perplexity_s": llama_s,
                "refengine_s": ours.seconds,
                "ratio": ours.seconds / llama_s,
                "ppl_llama": theirs.ppl,
                "ppl_refengine": ours.ppl,
                "refengine_peak_rss_anon_mib": max(peak) / 2**20,
                "llama_perplexity_max_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
            records.append(record)
            if not as_json:
                click.echo(
                    f"{model}, {chunks * 512} tokens: llama-perplexity {llama_s:.1f} s (PPL {theirs.ppl:.4f}), "
                    f"refengine {ours.seconds:.1f} s (PPL {ours.ppl:.4f}): {ours.seconds / llama_s:.2f}x; "
                    f"refengine peak RssAnon {record['refengine_peak_rss_anon_mib']:.0f} MiB, "
                    f"llama-perplexity max RSS {record['llama_perplexity_max_rss_mib']:.0f} MiB"
                )
                sys.stdout.flush()
    if as_json:
        click.echo(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
