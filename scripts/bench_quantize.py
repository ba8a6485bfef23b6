#!/usr/bin/env python
"""Benchmark the quantizer: MB/s of float32 input, ours against llama.cpp's ggml.

Kernels, per type, on the same random (rows, 4096) float32 input:
  ours 2 thr    refengine.kernels.quantize_rows, numba parallel over blocks (2 threads)
  ours 1 thr    the same kernel with numba limited to one thread
  ggml 1 thr    ggml's quantize_row_*_ref through ctypes: single-threaded C, as it is
  ggml 2 thr    the same on two Python threads, each quantizing half the rows (ctypes
                releases the GIL), which is how llama_model_quantize parallelises it
Every type is first checked byte-identical to ggml on a sample; a type that is not is
reported FAIL and not timed. Compile time is excluded (one warm-up call).

File: a ~240 MB F32 llama-architecture GGUF written for the run, quantized to each
--mixes by `refengine quantize` (quantize_file) and by llama_cpp.llama_model_quantize
with nthread 2; MB/s of input tensor data, and whether the two files are identical.

Needs llama-cpp-python (the oracle extra). Figures are noise on a busy machine: the
share of the CPUs other processes took while timing is printed with each row.

    .venv/bin/python scripts/bench_quantize.py
    .venv/bin/python scripts/bench_quantize.py --types Q4_K,Q8_0 --mixes Q4_K_M --json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numba
import numpy as np
from bench_dequant import OtherProcesses, cpu_model
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import ggml_oracle  # noqa: E402
from refengine.kernels import quantize_rows  # noqa: E402

from refengine.quantize import MIXES, quantize_file  # noqa: E402

N_COLS = 4096
DEFAULT_MB = 32  # float32 input per type and run: K-quants take about a second of it
# The file benchmark's model: 4 layers of a 1024-wide llama with an 8192-token vocabulary,
# about 61M parameters, 245 MB as F32. Random weights: quantization cost does not depend on them.
FILE_MODEL = dict(n_embd=1024, n_ff=2816, n_layer=4, n_head=8, n_head_kv=2, n_vocab=8192)


def best_rate(fn, n_bytes: int, repeats: int) -> float:
    """Input MB/s of the fastest of `repeats` runs of fn()."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n_bytes / 1e6 / best


def ggml_on_threads(ggml_type: T, x: np.ndarray, n_threads: int) -> None:
    parts = np.array_split(x, n_threads)
    threads = [threading.Thread(target=ggml_oracle.quantize_ref, args=(ggml_type, p)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def bench_kernels(types: list[T], size_mb: int, repeats: int) -> list[dict]:
    x = np.random.default_rng(0).standard_normal((size_mb * 2**20 // 4 // N_COLS, N_COLS)).astype(np.float32)
    rows = []
    for ggml_type in types:
        sample = x[:16]
        if not np.array_equal(quantize_rows(ggml_type, sample), ggml_oracle.quantize_ref(ggml_type, sample)):
            rows.append({"type": ggml_type.name, "exact": False})
            continue
        watch = OtherProcesses()
        record = {"type": ggml_type.name, "exact": True}
        record["ours_2"] = best_rate(lambda t=ggml_type: quantize_rows(t, x), x.nbytes, repeats)
        numba.set_num_threads(1)
        try:
            record["ours_1"] = best_rate(lambda t=ggml_type: quantize_rows(t, x), x.nbytes, repeats)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        record["ggml_1"] = best_rate(lambda t=ggml_type: ggml_oracle.quantize_ref(t, x), x.nbytes, repeats)
        record["ggml_2"] = best_rate(lambda t=ggml_type: ggml_on_threads(t, x, 2), x.nbytes, repeats)
        record["others"] = watch.share()
        rows.append(record)
        print(f"  {ggml_type.name} done", file=sys.stderr)
    return rows


def write_file_model(path: Path) -> Path:
    m = FILE_MODEL
    rng = np.random.default_rng(1)
    head_dim = m["n_embd"] // m["n_head"]
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(m["n_layer"])
    writer.add_context_length(2048)
    writer.add_embedding_length(m["n_embd"])
    writer.add_feed_forward_length(m["n_ff"])
    writer.add_head_count(m["n_head"])
    writer.add_head_count_kv(m["n_head_kv"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32))

    add("token_embd.weight", m["n_vocab"], m["n_embd"])
    writer.add_tensor("output_norm.weight", np.ones(m["n_embd"], np.float32))
    add("output.weight", m["n_vocab"], m["n_embd"])
    kv = m["n_head_kv"] * head_dim
    for i in range(m["n_layer"]):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(m["n_embd"], np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(m["n_embd"], np.float32))
        for name, shape in (("attn_q", (m["n_embd"], m["n_embd"])), ("attn_k", (kv, m["n_embd"])),
                            ("attn_v", (kv, m["n_embd"])), ("attn_output", (m["n_embd"], m["n_embd"])),
                            ("ffn_gate", (m["n_ff"], m["n_embd"])), ("ffn_up", (m["n_ff"], m["n_embd"])),
                            ("ffn_down", (m["n_embd"], m["n_ff"]))):  # fmt: skip
            add(f"blk.{i}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bench_file(mixes: list[str]) -> list[dict]:
    import llama_cpp

    records = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        source = write_file_model(Path(tmp) / "model-f32.gguf")
        for mix in mixes:
            watch = OtherProcesses()
            ours = quantize_file(source, Path(tmp) / "ours.gguf", mix)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = MIXES[mix].ftype, 2
            theirs = Path(tmp) / "llama.gguf"
            start = time.perf_counter()
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(theirs).encode(), ctypes.byref(params))
            llama_s = time.perf_counter() - start
            identical = rc == 0 and theirs.read_bytes() == (Path(tmp) / "ours.gguf").read_bytes()
            records.append(
                {
                    "mix": mix,
                    "input_mb": ours.input_bytes / 1e6,
                    "ours_mb_s": ours.mb_per_s,
                    "llama_mb_s": ours.input_bytes / 1e6 / llama_s,
                    "identical": identical,
                    "others": watch.share(),
                }
            )
            print(f"  {mix} done", file=sys.stderr)
    return records


def markdown(kernels: list[dict], files: list[dict]) -> str:
    lines = [
        f"Machine: {cpu_model()}, numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads",
        "",
        "| type | ours 2 thr | ours 1 thr | ggml 1 thr | ggml 2 thr | ours/ggml 1 thr | ours/ggml 2 thr | others |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in kernels:
        if not r["exact"]:
            lines.append(f"| {r['type']} | FAIL: not byte-identical to ggml | | | | | | |")
            continue
        lines.append(
            f"| {r['type']} | {r['ours_2']:.0f} | {r['ours_1']:.0f} | {r['ggml_1']:.0f} | {r['ggml_2']:.0f} "
            f"| {r['ours_1'] / r['ggml_1']:.2f} | {r['ours_2'] / r['ggml_2']:.2f} | {r['others']:.0%} |"
        )
    lines.append("\nMB/s of float32 input. File level (refengine quantize vs llama_model_quantize, nthread 2):\n")
    lines.append("| mix | input MB | ours MB/s | llama.cpp MB/s | identical file | others |")
    lines.append("|---|---:|---:|---:|---|---:|")
    for r in files:
        lines.append(
            f"| {r['mix']} | {r['input_mb']:.0f} | {r['ours_mb_s']:.0f} | {r['llama_mb_s']:.0f} "
            f"| {'yes' if r['identical'] else 'NO'} | {r['others']:.0%} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default=",".join(t.name for t in ggml_oracle.REF_FUNCTIONS))
    parser.add_argument("--mixes", default="Q4_K_M,Q8_0", help="file-level mixes ('' to skip)")
    parser.add_argument("--mb", type=int, default=DEFAULT_MB, help="float32 input per type, MB")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        types = [T[name] for name in args.types.split(",") if name]
        mixes = [name for name in args.mixes.split(",") if name]
        assert all(m in MIXES for m in mixes), mixes
    except (KeyError, AssertionError) as e:
        parser.error(f"unknown type or mix {e}")
    for ggml_type in types:  # compile outside the timing
        quantize_rows(ggml_type, np.zeros((1, N_COLS), np.float32))
    kernels = bench_kernels(types, args.mb, args.repeats)
    files = bench_file(mixes) if mixes else []
    print(json.dumps({"kernels": kernels, "files": files}, indent=1) if args.json else markdown(kernels, files))
    return 0 if all(r["exact"] for r in kernels) and all(r["identical"] for r in files) else 1


if __name__ == "__main__":
    sys.exit(main())
