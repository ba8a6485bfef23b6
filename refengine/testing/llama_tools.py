"""llama.cpp's own command-line tools (llama-perplexity, llama-eval-callback, llama-bench), as
scripts/build_llama_tools.sh builds them, and the figures their output holds.

The folder is $REFENGINE_LLAMA_TOOLS, or ~/.cache/refengine/llama-tools/<version>/bin, where <version> is
the llama-cpp-python release whose vendored llama.cpp they are built from.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
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


# llama.cpp's logger prints from a worker thread that the process does not wait for at exit
# (ggml-org/llama.cpp issue 22142): the last lines of a log, in the log file as on stdout, are often
# lost (up to a third of an eval-callback log in runs here). This library, preloaded, makes the
# process wait 0.3 s at the very end of exit (its atexit handler is the first registered, so it runs
# last), which lets the thread print the rest: every run here then had its whole log.
DRAIN_SOURCE = """
#include <stdlib.h>
#include <unistd.h>
static void wait_for_log(void) { usleep(300000); }
__attribute__((constructor)) static void register_wait(void) { atexit(wait_for_log); }
"""
# What the last line of each tool's log holds, to tell a whole log from a cut one.
LAST_LINES = {
    "llama-perplexity": ("Final estimate: PPL", "Same top p:"),
    "llama-eval-callback": ("result_output = ",),
}
ATTEMPTS = 4


def drain_library() -> Path | None:
    """The preload library above, compiled once into the tools' cache (None without a C compiler)."""
    target = cache_dir() / "llama-tools" / "drain_log.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "drain_log.c"
        source.write_text(DRAIN_SOURCE)
        built = Path(tmp) / "drain_log.so"
        try:
            subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", built, source], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        os.replace(built, target)
    return target


def run_tool(name: str, *args: str | os.PathLike, threads: int = 2, timeout: float = 3600) -> str:
    """Run a built tool on the CPU with `threads` threads and return its whole log (from --log-file,
    with drain_library preloaded; a log still cut short is run again, up to ATTEMPTS times)."""
    path = find_tool(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not built in {tools_dir()} (scripts/build_llama_tools.sh)")
    env = dict(os.environ)
    drain = drain_library()
    if drain is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, [str(drain), env.get("LD_PRELOAD")]))
    ends = LAST_LINES.get(name, ())
    for _ in range(ATTEMPTS):
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "log.txt"
            argv = [str(path), *map(str, args), "-t", str(threads), "--log-file", str(log)]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, errors="replace", env=env)
            output = log.read_text(errors="replace") if log.exists() else ""
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{(output + done.stderr)[-3000:]}")
        if not ends or any(end in output for end in ends):
            return output
    raise RuntimeError(f"{name}: the log was cut short in {ATTEMPTS} runs (no {' or '.join(ends)!r})")


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
