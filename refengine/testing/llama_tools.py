"""llama.cpp's own command-line tools (llama-perplexity, llama-eval-callback, llama-bench), as
scripts/build_llama_tools.sh builds them, and the figures their output holds.

The folder is $REFENGINE_LLAMA_TOOLS, or ~/.cache/refengine/llama-tools/<version>/bin, where <version> is
the llama-cpp-python release whose vendored llama.cpp they are built from.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from refengine.models import cache_dir

VERSION = "0.3.36"  # the oracle extra's llama-cpp-python (pyproject.toml); build_llama_tools.sh's default


def tools_dir() -> Path:
    return Path(os.environ.get("REFENGINE_LLAMA_TOOLS") or cache_dir() / "llama-tools" / VERSION / "bin")


def find_tool(name: str) -> Path | None:
    """The tool's path, or None when it is not built (run scripts/build_llama_tools.sh)."""
    path = tools_dir() / name
    return path if os.access(path, os.X_OK) else None


def run_tool(name: str, *args: str | os.PathLike, threads: int = 2, timeout: float = 3600) -> str:
    """Run a built tool on the CPU with `threads` threads; its stdout and stderr together (llama.cpp logs to both)."""
    path = find_tool(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not built in {tools_dir()} (scripts/build_llama_tools.sh)")
    argv = [str(path), *map(str, args), "-t", str(threads)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, errors="replace")
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{output[-3000:]}")
    return output


@dataclass(frozen=True)
class PerplexityOutput:
    ppl: float
    error: float
    chunk_ppl: list[float]  # the running estimate after each chunk


def parse_perplexity(output: str) -> PerplexityOutput:
    """The `[1]x,[2]y,...` estimates and the `Final estimate: PPL = x +/- y` line of llama-perplexity."""
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", output)
    if final is None:
        raise ValueError(f"no Final estimate in llama-perplexity's output:\n{output[-2000:]}")
    chunks = [float(x) for x in re.findall(r"\[\d+\]([\d.]+),", output)]
    return PerplexityOutput(float(final[1]), float(final[2]), chunks)


def parse_kl_divergence(output: str) -> dict[str, float]:
    """The closing statistics of llama-perplexity --kl-divergence: 'Mean    KLD' -> value, and so on
    (the value before any ±; percent signs dropped, so Δp and same-top figures are in percent)."""
    stats = {}
    for line in output[output.find("====== Perplexity statistics") :].splitlines():
        match = re.match(r"^\s*([^:=]+?)\s*:\s*(-?[\d.]+)", line)
        if match:
            stats[match[1]] = float(match[2])
    if "Mean    KLD" not in stats:
        raise ValueError(f"no KL divergence statistics in llama-perplexity's output:\n{output[-2000:]}")
    return stats
