#!/usr/bin/env python3
"""Write a tiny synthetic GGUF model (random weights, llama.cpp's layout): see refengine.testing.

scripts/make_tiny_model.py --arch deepseek2 -o ds.gguf
scripts/make_tiny_model.py --arch qwen3moe --preset bigger --type Q4_K_M -o q.gguf
scripts/make_tiny_model.py --experts 256 --type Q4_K_M -o ds256.gguf   # deepseek2, 8 of 256 used
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from refengine.errors import RefengineError
from refengine.testing import MODELS, PRESETS, QTYPES, make_tiny_model, moe_spec


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--arch", type=click.Choice(MODELS), default="deepseek2", show_default=True, help="Which tiny model.")
@click.option(
    "--preset",
    type=click.Choice(sorted({p for presets in PRESETS.values() for p in presets})),
    default="tiny",
    show_default=True,
    help="tiny: a few MB; bigger: 200-280 MB at F32, for benchmarks.",
)
@click.option(
    "--experts",
    type=click.IntRange(min=1),
    help="Instead of a preset: a deepseek2 model with this many experts, 8 of them used (8, 64, 256).",
)
@click.option(
    "--type",
    "qtype",
    type=click.Choice(QTYPES),
    default="F32",
    show_default=True,
    help="Q4_K_M is made by llama.cpp's quantizer (needs llama-cpp-python).",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .gguf to write."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def main(arch: str, preset: str, experts: int | None, qtype: str, output: Path, seed: int) -> None:
    """Write a tiny synthetic GGUF model that llama.cpp loads and runs."""
    if experts is not None and arch != "deepseek2":
        raise click.UsageError("--experts makes a deepseek2 model: leave --arch at deepseek2")
    start = time.perf_counter()
    try:
        spec = moe_spec(experts) if experts is not None else None
        path = make_tiny_model(arch, output, preset=preset, qtype=qtype, seed=seed, spec=spec)
    except (RefengineError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    size = path.stat().st_size
    click.echo(f"{path}: {arch} {qtype}, {size:,} bytes ({size / 1e6:.1f} MB), {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
