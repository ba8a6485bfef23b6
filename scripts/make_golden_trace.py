#!/usr/bin/env python3
"""Write tests/golden/eval_callback.json: the sums llama.cpp's llama-eval-callback prints for every named
tensor of one forward pass (scripts/build_llama_tools.sh builds the tool).

Run by hand; tests/test_trace.py checks refengine's traces against the file without llama.cpp. Cases:
the tiny deepseek2 model (refengine.testing, seed 0, F32) and gguf-py's F32 dequantization of each real
model (refengine.testing.f32copy), each on tests/trace_oracle.PROMPT, with an F32 KV cache and flash
attention off. Per case: the tokens llama.cpp evaluated, each named node's last print (op, ne, sum),
and min_matched, how many of them refengine's trace names.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from pathlib import Path

import click

import refengine
from refengine.compare import llama_candidates, parse_eval_callback
from refengine.testing import write_tiny_model
from refengine.testing.f32copy import f32_copy
from refengine.testing.llama_tools import VERSION, run_tool
from refengine.testing.trace_oracle import GOLDEN_PATH, PROMPT, eval_callback_args

REAL = ["smollm2-135m", "gemma3-270m"]


def evaluated_tokens(log: str) -> list[int]:
    """The ids eval-callback prints after `number of input tokens = N`, one a line."""
    match = re.search(r"number of input tokens = (\d+)\n", log)
    if match is None:
        raise ValueError("no token list in llama-eval-callback's log")
    lines = log[match.end() :].splitlines()[: int(match[1])]
    return [int(line.split()[-1]) for line in lines]


def case(model_path: Path, ours: str | Path, arch: str) -> dict:
    log = run_tool("llama-eval-callback", *eval_callback_args(model_path))
    nodes = parse_eval_callback(log)
    names = set(refengine.load(ours).trace(refengine.load(ours).tokenize(PROMPT)).names)
    matched = sum(any(c in nodes for c in llama_candidates(n, nodes)) for n in names)
    click.echo(f"  {model_path.name}: {len(nodes)} named nodes, {matched} of them in refengine's trace")
    return {
        "arch": arch,
        "model": model_path.name,
        "sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "tokens": evaluated_tokens(log),
        "min_matched": matched,
        # llama.cpp's masked router scores sum to -inf: no use, and not JSON
        "nodes": {n.name: {"op": n.op, "ne": list(n.ne), "sum": n.sum} for n in nodes.values() if math.isfinite(n.sum)},
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--skip-real", is_flag=True, help="Only the tiny model.")
def main(skip_real: bool) -> None:
    """Regenerate the llama-eval-callback golden."""
    golden = json.loads(GOLDEN_PATH.read_text()) if GOLDEN_PATH.exists() else {}
    golden.update(llama_cpp_python=VERSION, prompt=PROMPT)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_model("deepseek2", Path(tmp) / "deepseek2.gguf")
        golden["deepseek2"] = case(tiny, tiny, "deepseek2")
    if not skip_real:
        for name in REAL:
            golden[name] = case(f32_copy(name), name, refengine.load(name).architecture)
    GOLDEN_PATH.write_text(json.dumps(golden, indent=1) + "\n")
    click.echo(f"{GOLDEN_PATH}: {GOLDEN_PATH.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
