#!/usr/bin/env python3
"""Write tests/golden/perplexity.json and tests/golden/kld_base_tiny_llama.bin.xz from llama.cpp's own
llama-perplexity (scripts/build_llama_tools.sh builds it).

Run by hand; tests/test_perplexity.py checks refengine against the files without llama.cpp.
  - For each real model, over N_CHUNKS chunks of N_CTX tokens of tests/data/python_reference.txt.xz:
    llama-perplexity's PPL, error and running estimates on the quantized file and on gguf-py's F32
    dequantization of it (refengine.testing.f32copy).
  - On the tiny llama model (refengine.testing, seed 0; its sha256 is kept): the same over TINY_CHUNKS
    chunks of TINY_CTX, and the KL-divergence base file llama-perplexity writes for it (xz-compressed).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import tempfile
import time
from pathlib import Path

import click

from refengine.models import resolve_model
from refengine.testing import write_tiny_model
from refengine.testing.f32copy import f32_copy
from refengine.testing.llama_tools import VERSION, parse_perplexity, run_tool
from refengine.testing.perplexity_oracle import (
    GOLDEN_BASE,
    GOLDEN_PATH,
    MODELS,
    N_CHUNKS,
    N_CTX,
    TINY_ARCH,
    TINY_CHUNKS,
    TINY_CTX,
    TINY_TEXT_BYTES,
    reference_text,
)


def llama_perplexity(model: Path, text: Path, n_ctx: int, n_chunks: int, *extra: str) -> dict:
    start = time.perf_counter()
    out = parse_perplexity(
        run_tool("llama-perplexity", "-m", model, "-f", text, "-c", n_ctx, "--chunks", n_chunks, *extra)
    )
    seconds = time.perf_counter() - start
    click.echo(f"  {model.name}: PPL {out.ppl:.4f} +/- {out.error:.5f} ({seconds:.0f} s)")
    return {"ppl": out.ppl, "error": out.error, "chunk_ppl": out.chunk_ppl, "seconds": seconds}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--skip-real", is_flag=True, help="Only the tiny model (seconds instead of many minutes).")
def main(skip_real: bool) -> None:
    """Regenerate the perplexity goldens from llama-perplexity."""
    golden = json.loads(GOLDEN_PATH.read_text()) if GOLDEN_PATH.exists() else {}
    golden.update(llama_cpp_python=VERSION, n_ctx=N_CTX, n_chunks=N_CHUNKS)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_bytes(reference_text())
        if not skip_real:
            golden["models"] = {}
            for name in MODELS:
                click.echo(name)
                golden["models"][name] = {
                    "quantized": llama_perplexity(resolve_model(name), text, N_CTX, N_CHUNKS),
                    "f32": llama_perplexity(f32_copy(name), text, N_CTX, N_CHUNKS),
                }
        click.echo(f"tiny {TINY_ARCH}")
        tiny = write_tiny_model(TINY_ARCH, Path(tmp) / "tiny.gguf")
        tiny_text = Path(tmp) / "tiny.txt"
        tiny_text.write_bytes(reference_text()[:TINY_TEXT_BYTES])
        base = Path(tmp) / "base.kld"
        result = llama_perplexity(tiny, tiny_text, TINY_CTX, TINY_CHUNKS, "--kl-divergence-base", base)
        golden["tiny"] = {
            "arch": TINY_ARCH,
            "sha256": hashlib.sha256(tiny.read_bytes()).hexdigest(),
            "n_ctx": TINY_CTX,
            "n_chunks": TINY_CHUNKS,
            "text_bytes": TINY_TEXT_BYTES,
            **result,
        }
        GOLDEN_BASE.write_bytes(lzma.compress(base.read_bytes(), preset=9))
    GOLDEN_PATH.write_text(json.dumps(golden, indent=1) + "\n")
    click.echo(f"{GOLDEN_PATH}, {GOLDEN_BASE} ({GOLDEN_BASE.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
