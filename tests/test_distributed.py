"""Several ranks with MPI (refengine.distributed), on this one machine: `mpiexec -np 2` and `-np 3` on
localhost, each rank a real `refengine` process holding a contiguous run of every MoE layer's experts.

The oracle is one process running the same command: the same greedy tokens, and logits within 1e-5 of
their scale (the ranks' partial sums are added in another order). The tests skip, saying why, where MPI cannot start
(no mpi4py or mpiexec: `make install` brings both, the `mpi` extra). MPICH's mpiexec runs more ranks
than there are CPUs without flags (Open MPI's would need --oversubscribe). Each rank gets one thread:
three ranks share this machine's two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from test_numa import write_uncached
from test_plan import deepseek_r1  # noqa: F401  (the session fixture: DeepSeek-R1's header over sparse files)

from refengine.cli import main

BIN = Path(sys.executable).parent
FIXTURES = Path(__file__).parent / "fixtures" / "sysroot"
ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
TIMEOUT = 300


@cache
def mpiexec() -> str:
    """The launcher, once checked that it starts two ranks that see each other; else skip, saying why."""
    launcher = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
    if launcher is None:
        pytest.skip("no mpiexec: install the mpi extra (pip install -e '.[mpi]', as make install does)")
    probe = "from mpi4py import MPI; c = MPI.COMM_WORLD; n = c.allreduce(1); c.rank or print(n)"
    try:
        run = subprocess.run(
            [launcher, "-np", "2", sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.skip("mpiexec -np 2 did not start two ranks within 60 s")
    if run.returncode != 0 or run.stdout.split() != ["2"]:
        pytest.skip(f"MPI cannot start two ranks here: {(run.stderr or run.stdout).strip()[-300:]}")
    return launcher


def ranks(n: int, *argv, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -np n refengine ARGV`; argv may hold ":" to give each rank its own command (MPMD)."""
    command = [mpiexec(), "-np", str(n), str(BIN / "refengine"), *map(str, argv)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **ONE_THREAD, **(env or {})}
    )


def one_process(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("n_ranks", [2, 3])
@pytest.mark.parametrize("arch", ["deepseek2", "qwen3moe", "mixtral"])
def test_ranks_generate_the_tokens_of_one_process(capsys, tiny_model, arch, n_ranks):
    path = tiny_model(arch, "q4_k_m")
    argv = ["generate", "-m", path, "-n", "16", "--temp", "0", "--json", "the history of"]
    expected = json.loads(one_process(capsys, *argv))["tokens"]
    run = ranks(n_ranks, *argv)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    result = json.loads(run.stdout)  # rank 0 alone prints
    assert len(expected) == 16 and result["tokens"] == expected
    assert [r["rank"] for r in result["ranks"]] == list(range(n_ranks))


@pytest.mark.parametrize(("arch", "n_ranks"), [("deepseek2", 3), ("qwen3moe", 2), ("mixtral", 3)])
def test_ranks_give_the_logits_of_one_process(capsys, tiny_model, tmp_path, arch, n_ranks):
    path = tiny_model(arch, "q4_k_m")
    tokens = "1,5,9,22,100,7,3,250,41"
    one_process(capsys, "logits", "-m", path, "--tokens", tokens, "--out", tmp_path / "one.npy")
    run = ranks(n_ranks, "logits", "-m", path, "--tokens", tokens, "--out", tmp_path / "ranks.npy")
    assert run.returncode == 0, run.stderr
    one, several = np.load(tmp_path / "one.npy"), np.load(tmp_path / "ranks.npy")
    assert one.shape == several.shape == (9, 512)
    # the ranks' partial sums are added in another order than one process adds the experts' outputs: float32
    # rounding, 1e-5 of the logits' scale (measured: 0 with 2 ranks, up to 1.3e-5 on logits of 10 with 3)
    np.testing.assert_allclose(several, one, rtol=0, atol=1e-5 * np.abs(one).max())


def test_ranks_give_the_perplexity_and_bench_of_one_process(capsys, tiny_model, tmp_path):
    path = tiny_model("qwen3moe", "q4_k_m")
    text = tmp_path / "text.txt"
    text.write_text("The history of the printing press begins with movable type. " * 60)
    argv = ["perplexity", "-m", path, "-f", text, "-c", "64", "--chunks", "3", "--json"]
    one = json.loads(one_process(capsys, *argv))
    run = ranks(2, *argv)
    assert run.returncode == 0, run.stderr
    several = json.loads(run.stdout)
    assert several["chunk_ppl"] == pytest.approx(one["chunk_ppl"], rel=1e-5)
    run = ranks(2, "bench", "model", path, "-p", "8", "-n", "4", "-r", "1", "--json")
    assert run.returncode == 0, run.stderr
    assert [r["test"] for r in json.loads(run.stdout)] == ["pp8", "tg4"]


def test_each_rank_reads_only_its_experts(tiny_model, tmp_path):
    """Each rank maps its own copy of the model (MPMD: one command per rank), written around the page cache,
    so that mincore on a copy shows what that rank alone brought in: its experts, and of the others' no
    more than a page at each place where its ranges meet theirs."""
    data = tiny_model("deepseek2", "q4_k_m").read_bytes()
    copies = [write_uncached(tmp_path / f"rank{r}.gguf", data) for r in range(2)]
    argv = ["generate", "-n", "8", "--temp", "0", "--json", "the history of"]
    run = ranks(1, *argv, "-m", copies[0], ":", "-np", "1", BIN / "refengine", *argv, "-m", copies[1])
    assert run.returncode == 0, run.stderr
    reports = json.loads(run.stdout)["ranks"]
    assert [r["rank"] for r in reports] == [0, 1]
    shares = [r["experts_share"] for r in reports]
    assert abs(shares[0] - shares[1]) <= max(shares) // 4  # 8 experts a layer: 4 each
    for r in reports:
        assert r["boundaries"] >= 1
        assert r["experts_resident"] <= r["experts_share"]
        assert r["other_experts_resident"] <= r["boundaries"] * r["page"], r
        assert r["experts_resident"] + r["other_experts_resident"] <= r["experts_share"] + r["boundaries"] * r["page"]
        assert r["experts_resident"] >= r["experts_share"] // 2  # its share was brought in (WILLNEED)


def test_ctrl_c_stops_every_rank_cleanly(tiny_model):
    """SIGINT to mpiexec, which passes it to every rank: rank 0 stops at the end of the pass it is in, as one
    process does (exit 130, one line), and the others follow it out; nothing is left running."""
    path = tiny_model("qwen3moe", "q4_k_m")
    command = [mpiexec(), "-np", "2", str(BIN / "refengine"), "generate", "-m", str(path), "-n", "100000"]
    command += ["--ctx", "100100", "--no-plan", "--temp", "0", "hello"]
    launcher = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ONE_THREAD},
        start_new_session=True,  # its own process group: the signal goes to mpiexec alone, as from a terminal
    )
    try:
        first = launcher.stdout.read(1)  # generation has started
        assert first, launcher.stderr.read()
        time.sleep(1)
        launcher.send_signal(signal.SIGINT)
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines[-1] == "refengine: interrupted" and lines.count("refengine: interrupted") == 1, err
    assert lines[-2].endswith("| interrupted")  # generate's own summary line, as in one process
    assert len(first + out) > 1  # what was generated before the stop was printed


def test_numa_placement_does_not_combine_with_mpi(tiny_model):
    run = ranks(2, "generate", "-m", tiny_model("mixtral", "q4_k_m"), "--numa", "split", "-n", "1", "hi")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "--numa" in run.stderr and "MPI" in run.stderr


def test_plan_hosts_sizes_each_host_with_its_share_of_the_experts(capsys, deepseek_r1):  # noqa: F811
    """DeepSeek-R1 (377 GiB) on 256 GB hosts: one does not fit; two do, each with the dense part and half of
    every layer's experts, and every buffer (each host runs attention for every token)."""
    from refengine.gguf import open_gguf
    from refengine.plan import plan
    from refengine.system import read_system

    system = read_system(FIXTURES / "host_256g")
    gguf = open_gguf(deepseek_r1[0])
    one = plan(gguf, system, n_ctx=4096)
    assert one.verdict == "does_not_fit" and one.hosts == ()
    two = plan(gguf, system, n_ctx=4096, hosts=2)
    assert two.verdict == "fits", two.message()
    routed, total = one.needs.weights["routed_experts"], one.needs.weights_total
    assert [h.verdict for h in two.hosts] == ["fits", "fits"]
    assert sum(h.routed_experts for h in two.hosts) == routed
    for h in two.hosts:
        assert h.routed_experts == routed // 2  # 256 experts a layer: 128 each, to the byte
        assert h.weights == total - routed + h.routed_experts and h.anon == one.needs.anon
    assert two.needs.mapping == one.needs.mapping  # each rank maps the whole file
    code = main(["plan", str(deepseek_r1[0]), "--hosts", "2", "--json", "--sysroot", str(FIXTURES / "host_256g")])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "fits" and [h["verdict"] for h in result["hosts"]] == ["fits", "fits"]
    main(["plan", str(deepseek_r1[0]), "--hosts", "2", "--sysroot", str(FIXTURES / "host_256g")])
    text, _ = capsys.readouterr()
    assert "hosts (2, one MPI rank each, alike)" in text and "verdict: fits" in text
