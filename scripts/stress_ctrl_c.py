"""Run tests/test_cli.py's Ctrl-C test many times in a row under CPU load.

    .venv/bin/python scripts/stress_ctrl_c.py            # 50 runs, 2 busy-loop processes, every other
                                                          # run with a cold numba cache
    .venv/bin/python scripts/stress_ctrl_c.py -n 10 --load 0

The load is one busy loop (`while True: pass`) per --load, started here and stopped at the end. A
cold numba cache (an empty NUMBA_CACHE_DIR) makes the first decoded token compile its kernels, the
window where a Ctrl-C could be lost in llvmlite's ctypes callback (refengine/signals.py holds it).
Stops at the first failure, with its traceback; exit status 1 then.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=50, help="runs in a row (default 50)")
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes alongside (default 2)")
    parser.add_argument("--warm-only", action="store_true", help="keep numba's cache warm in every run")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from refengine.models import resolve_model
    from tests.test_cli import test_ctrl_c_keeps_the_text_and_exits_130 as test

    model = resolve_model("smollm2-135m")
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    passed, start = 0, time.perf_counter()
    try:
        for i in range(args.runs):
            cold = not args.warm_only and i % 2 == 0
            if cold:
                os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-cold-")
            else:
                os.environ.pop("NUMBA_CACHE_DIR", None)
            began = time.perf_counter()
            try:
                test(model)
            except Exception:
                print(f"run {i + 1}: FAILED ({'cold' if cold else 'warm'} cache)\n{traceback.format_exc()}")
                break
            passed += 1
            print(f"run {i + 1}: passed ({'cold' if cold else 'warm'} cache, {time.perf_counter() - began:.1f} s)")
    finally:
        for process in load:
            process.kill()
            process.wait()
    print(f"{passed} of {args.runs} passed in a row, {args.load} busy loops, {time.perf_counter() - start:.0f} s")
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
