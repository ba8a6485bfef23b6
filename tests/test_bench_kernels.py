"""`refengine bench kernels`: the records it reports, that ggml's own kernels compute the same thing
(--vs-ggml checks the outputs), and one-line errors for bad input. Runs are tiny (a few MB, no time
budget beyond the minimum passes), so the figures are not benchmarks; their consistency is tested."""

import importlib.util
import json
import math

import pytest

from refengine.benchkernels import default_size_mb, thread_bounds, word_chunks
from refengine.cli import EXIT_ERROR, EXIT_USAGE, main

HAS_LIBGGML = importlib.util.find_spec("llama_cpp") is not None


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, "bench", "kernels", *argv, "--size-mb", "4", "--budget", "0", "--json")
    assert code == 0, err
    return json.loads(out)


def assert_consistent(record: dict):
    for key in ("gbps", "read_bw_gbps", "gbps_whole_pass", "us_per_call", "mb"):
        assert math.isfinite(record[key]) and record[key] > 0, (key, record)
    assert record["read_bw_fraction"] == pytest.approx(record["gbps"] / record["read_bw_gbps"])
    assert record["passes"] >= 3
    assert record["gbps"] >= record["gbps_whole_pass"] * 0.999  # the sum of per-call bests is never slower


def test_matvec_reports_both_numerics_and_the_call_overhead(capsys):
    run_record = run_json(capsys, "--types", "Q4_K,Q8_0", "--threads", "1")
    assert run_record["op"] == "matvec" and run_record["threads"] == 1
    rows = [(r["type"], r["numerics"]) for r in run_record["results"]]
    assert rows == [("Q4_K", "exact"), ("Q4_K", "ggml"), ("Q8_0", "exact"), ("Q8_0", "ggml")]
    for record in run_record["results"]:
        assert_consistent(record)
        assert record["ggml_gbps"] is None
    assert record["shape"] == "2048 x 640"  # 32-value blocks: gemma3's 2048 x 640 layers
    assert run_record["results"][0]["shape"] == "640 x 2048"
    costs = run_record["overhead_us"]
    assert set(costs) == {"matvec() exact", "bound kernel exact", "bound kernel ggml"}
    assert all(0 < us < 1e5 for us in costs.values())


def test_matvec_shape_and_one_numerics(capsys):
    run_record = run_json(capsys, "--types", "Q6_K", "--numerics", "ggml", "--shape", "256x512")
    [record] = run_record["results"]
    assert (record["numerics"], record["shape"]) == ("ggml", "256 x 512")
    assert record["mb"] == pytest.approx((4 << 20) // (256 * 2 * 210) * 256 * 2 * 210 / 1e6)


@pytest.mark.skipif(not HAS_LIBGGML, reason="llama-cpp-python (libggml) is not installed")
@pytest.mark.parametrize("op", ["dequant", "quantize"])
def test_vs_ggml_runs_ggmls_kernels_on_the_same_data_with_the_same_output(capsys, op):
    run_record = run_json(capsys, "--op", op, "--types", "Q4_K,Q5_0", "--vs-ggml")
    assert run_record["ggml_features"]  # what libggml-cpu was built for
    for record in run_record["results"]:
        assert_consistent(record)
        assert record["matches_ggml"] is True, record
        assert record["vs_ggml"] == pytest.approx(record["gbps"] / record["ggml_gbps"])


@pytest.mark.skipif(not HAS_LIBGGML, reason="llama-cpp-python (libggml) is not installed")
def test_vs_ggml_matvec_and_the_markdown_table(capsys):
    code, out, err = run(capsys, "bench", "kernels", "--types", "Q5_0", "--vs-ggml", "--size-mb", "4", "--budget", "0")
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| op |"))
    assert header.split(" | ")[-3:] == ["ggml GB/s", "vs ggml", "same output |"]
    assert sum(line.startswith("| matvec | Q5_0 |") for line in lines) == 2
    assert "ggml graph compute" in out


@pytest.mark.parametrize(
    ("argv", "code", "needles"),
    [
        (["--types", "Q9_Z"], EXIT_ERROR, ["unknown ggml type 'Q9_Z'"]),
        (["--types", "IQ2_XS"], EXIT_ERROR, ["no matvec kernel for IQ2_XS"]),
        (["--op", "quantize", "--types", "IQ2_XS"], EXIT_ERROR, ["no quantize kernel for IQ2_XS"]),
        (["--shape", "12x"], EXIT_USAGE, ["'12x' is not N_OUTxN_IN"]),
        (["--shape", "100x100", "--types", "Q4_K"], EXIT_ERROR, ["100 columns are not whole blocks of 256"]),
        (["--op", "transpose"], EXIT_USAGE, ["transpose"]),
        (["--threads", "0"], EXIT_USAGE, ["--threads"]),
    ],
)
def test_bad_input_is_one_line(capsys, argv, code, needles):
    got, _, err = run(capsys, "bench", "kernels", *argv, "--size-mb", "1", "--budget", "0")
    assert got == code
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert all(needle in lines[0] for needle in needles), lines[0]


def test_help(capsys):
    code, out, _ = run(capsys, "bench", "kernels", "-h")
    assert code == 0
    assert "--vs-ggml" in out and "--numerics" in out and "read" in out


def test_probe_reads_the_bytes_of_each_call():
    import numpy as np

    data = np.arange(4096, dtype=np.uint8).reshape(64, 64)
    pieces = [data[i : i + 3] for i in range(0, 64, 3)]
    chunks = word_chunks(data, pieces)
    assert [c.nbytes for c in chunks] == [p.nbytes // 8 * 8 for p in pieces]  # whole words inside each piece
    assert all(c.ctypes.data % 8 == 0 for c in chunks)
    floats = np.zeros((4, 256), dtype=np.float32)
    assert [c.nbytes for c in word_chunks(floats, [floats[:2], floats[2:]])] == [2048, 2048]
    assert thread_bounds(5, 2) == [(0, 2), (2, 5)] and thread_bounds(1, 4) == [(0, 1)]
    assert default_size_mb() >= 512
