"""NUMA execution (refengine.numa): the syscalls, the node pools, shard placement and its read-back.

Most tests run on any Linux machine, this one-node one included: the syscalls on real buffers, with
/proc/self/numa_maps (the kernel's own account) as the oracle; the page targets of shard placement;
refusals simulated by a kernel that says EPERM or ENOSYS. The `numa` tests need two nodes and skip
elsewhere; `make test-numa` runs them inside the two-node QEMU guest (../shared/numa-vm).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from test_plan import deepseek_r1  # noqa: F401  (the session fixture: DeepSeek-R1's header over sparse files)

from refengine import numa
from refengine.cli import EXIT_ERROR, EXIT_USAGE, main
from refengine.gguf import open_gguf
from refengine.plan import assign_experts, expert_units
from refengine.system import read_system

FIXTURES = Path(__file__).parent / "fixtures" / "sysroot"
PAGE = mmap.PAGESIZE
SYSTEM = read_system()


@pytest.fixture
def two_nodes():
    """Skip, saying why, on a machine with fewer than two nodes we may use; fail there instead when
    REFENGINE_NUMA_REQUIRED is set, as `make test-numa` sets it inside the guest, so that a guest that
    came up with one node cannot pass by skipping."""
    allowed = len(SYSTEM.allowed_nodes())
    if allowed < 2:
        why = f"needs two NUMA nodes, this machine lets us use {allowed}"
        if os.environ.get("REFENGINE_NUMA_REQUIRED"):
            pytest.fail(f"{why}, though REFENGINE_NUMA_REQUIRED says this is the two-node guest")
        pytest.skip(f"{why}: run `make test-numa` (the two-node QEMU guest)")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def numa_maps_pages(address: int) -> dict[int, int]:
    """Pages per node of the mapping that starts at `address`, as /proc/self/numa_maps says (N0=12 ...)."""
    with open("/proc/self/numa_maps") as fh:
        for line in fh:
            if int(line.split()[0], 16) == address:
                return {int(n): int(c) for n, c in re.findall(r"\bN(\d+)=(\d+)", line)}
    raise AssertionError(f"no mapping at {address:#x} in numa_maps")


# -- syscalls --------------------------------------------------------------------------------------


def test_move_pages_query_and_get_mempolicy_agree_with_numa_maps_on_an_anonymous_buffer():
    kernel = numa.Kernel()
    buf = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(buf, dtype=np.uint8)
    base = view.ctypes.data
    node = SYSTEM.allowed_nodes()[0].id
    kernel.mbind(base, 64 * PAGE, numa.MPOL_BIND, [node])  # anonymous memory honours mbind
    buf[: 48 * PAGE] = b"\1" * (48 * PAGE)  # fault in 48 of the 64 pages
    status = kernel.move_pages(base + np.arange(64, dtype=np.uint64) * PAGE)
    assert (status[:48] == node).all()
    assert (status[48:] == -errno.ENOENT).all()  # never touched: no page
    assert numa_maps_pages(base) == {node: 48}
    assert kernel.node_of_address(base + 5 * PAGE) == node
    # Moving to the node they are on is a no-op that reports the node.
    assert (
        kernel.move_pages(base + np.arange(4, dtype=np.uint64) * PAGE, np.full(4, node), numa.MPOL_MF_MOVE) == node
    ).all()
    del view
    buf.close()


def test_set_mempolicy_binds_only_the_calling_thread():
    kernel = numa.Kernel()
    node = SYSTEM.allowed_nodes()[0].id
    seen = []

    def worker():
        kernel.set_mempolicy(numa.MPOL_BIND, [node])
        with open("/proc/thread-self/numa_maps") as fh:
            seen.append(fh.readline().split()[1])
        kernel.set_mempolicy(numa.MPOL_DEFAULT)
        with open("/proc/thread-self/numa_maps") as fh:
            seen.append(fh.readline().split()[1])

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [f"bind:{node}", "default"]
    assert read_system().policy.mode == SYSTEM.policy.mode  # the main thread's own policy is untouched


def test_a_file_mapping_is_read_back_page_by_page(tmp_path):
    path = tmp_path / "pages.bin"
    path.write_bytes(os.urandom(64 * PAGE))
    with open(path, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(m, dtype=np.uint8)
    base = view.ctypes.data
    kernel = numa.Kernel()
    assert kernel.mincore(base, 64 * PAGE).all()  # just written: all in the page cache
    view[: 10 * PAGE : PAGE].max()  # map 10 of them into this process (fault-around maps up to 64 KiB more)
    status = kernel.move_pages(base + np.arange(64, dtype=np.uint64) * PAGE)
    assert (status[:10] >= 0).all() and (status[32:] == -errno.ENOENT).all()
    assert sum(numa_maps_pages(base).values()) == np.count_nonzero(status >= 0)
    del view
    m.close()


def write_uncached(path: Path, data: bytes) -> Path:
    """Write `data` with O_DIRECT, around the page cache, so that none of the file is cached."""
    buf = mmap.mmap(-1, -(-len(data) // PAGE) * PAGE)  # page-aligned, as O_DIRECT needs; zero padding after
    buf[: len(data)] = data
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError as e:
        pytest.skip(f"{path.parent} does not take O_DIRECT ({e.strerror}): cannot write a file the page cache lacks")
    try:
        os.write(fd, buf)
    finally:
        os.close(fd)
    return path


# -- residency -------------------------------------------------------------------------------------


def test_residency_accounts_for_every_tensor_byte_and_agrees_with_numa_maps(tiny_model, tmp_path):
    path = write_uncached(tmp_path / "model.gguf", tiny_model("mixtral", "f32").read_bytes())
    model = open_gguf(path)
    tensors = sorted(model.tensors.values(), key=lambda t: t.offset)
    some = tensors[len(tensors) // 2]
    model._maps[0].madvise(mmap.MADV_RANDOM)  # no read-around: a fault reads its own page only
    some.data.max()  # bring one tensor's pages in, and nothing else but the header (and its readahead)
    with numa.ModelPages(model) as pages:
        result = numa.residency(pages, [n.id for n in SYSTEM.memory_nodes])
        base = pages.address(0)
    total = sum(t.nbytes for t in tensors)
    assert result.mapped == total
    assert sum(result.node_total(n) for n in result.nodes) + sum(result.not_resident.values()) == total
    for group in result.not_resident:
        assert result.group_total(group) == sum(t.nbytes for t in tensors if numa.weight_group(t.name) == group)
    resident = sum(result.node_total(n) for n in result.nodes)
    assert some.nbytes <= resident < total
    # Every page the report found is now mapped here, and numa_maps counts the same pages per node.
    kernel = numa.Kernel()
    n_pages = -(-path.stat().st_size // PAGE)
    found = kernel.move_pages(base + np.arange(n_pages, dtype=np.uint64) * PAGE)
    counted = {int(n): int(c) for n, c in zip(*np.unique(found[found >= 0], return_counts=True), strict=True)}
    assert numa_maps_pages(base) == counted
    in_tensors = sum(
        t.nbytes for t in tensors if (found[t.offset // PAGE : -(-(t.offset + t.nbytes) // PAGE)] >= 0).all()
    )
    assert in_tensors <= resident <= sum(counted.values()) * PAGE


# -- pools -----------------------------------------------------------------------------------------


def test_pool_threads_are_pinned_to_their_node_and_run_kernels_on_one_thread():
    import numba
    import refengine.kernels  # noqa: F401  (loaded, so tasks run under kernel_threads(1))

    cpus = numa.node_cpus(SYSTEM, [n.id for n in SYSTEM.allowed_nodes()])
    node = next(n for n, c in cpus.items() if c)
    one = {node: frozenset([min(cpus[node])])}  # a node cut to one CPU
    with numa.NodePools(cpus) as pools, numa.NodePools(one) as single:
        affinity = list(pools.map(node, lambda _: os.sched_getaffinity(0), range(8)))
        assert all(a == set(cpus[node]) for a in affinity)
        assert single.submit(node, os.sched_getaffinity, 0).result() == set(one[node])
        assert pools.submit(node, numba.get_num_threads).result() == 1
        assert pools.submit(node, threading.current_thread).result().name.startswith(f"refengine-node{node}")
        with pytest.raises(numa.NumaError, match="no worker pool"):
            pools.submit(max(cpus) + 1, print)
    assert os.sched_getaffinity(0) == SYSTEM.cpus_allowed  # the main thread is not pinned


# -- placement -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["f32", "q4_k_m"])
def test_shard_targets_put_each_expert_on_its_node_and_stripe_the_rest(tiny_model, variant):
    model = open_gguf(tiny_model("qwen3moe", variant))
    cpus = {0: frozenset([0]), 1: frozenset([1])}  # two nodes on paper
    placement = numa.Placement.shard(model, cpus)
    units = expert_units(model)
    assert placement.experts == assign_experts(units, [0, 1])
    with numa.ModelPages(model) as pages:
        target = placement.targets(pages, 0)
        owned = list(pages.owned_pages(0))
    # Every page that holds tensor bytes has exactly one owner; pages before the tensors have none.
    first = min(t.offset for t in model.tensors.values()) // PAGE
    assert (target[:first] == -1).all() and (target[first:] >= 0).all()
    assert sum(end - lo for _, lo, end in owned) == len(target) - first
    for unit, lo, end in owned:
        assert unit.start < (lo + 1) * PAGE and unit.end > (end - 1) * PAGE  # it has bytes in each page it owns
        if unit.expert is not None:
            assert (target[lo:end] == placement.node_of(*unit.expert)).all()
    # A page two units share is the earlier one's.
    ends = {unit: end for unit, _, end in owned}
    shared = 0
    for a, b in zip(pages.units[0], pages.units[0][1:], strict=False):
        if (a.end - 1) // PAGE == b.start // PAGE and a in ends:
            assert ends[a] == b.start // PAGE + 1
            shared += 1
    assert shared > 0
    # Per node, the expert pages are the bytes assign_experts gave it, give or take a shared page per slice.
    expert_pages = {0: 0, 1: 0}
    for unit, lo, end in owned:
        if unit.expert is not None:
            expert_pages[placement.node_of(*unit.expert)] += end - lo
    n_slices = sum(1 for u in pages.units[0] if u.expert is not None)
    for node in (0, 1):
        planned = sum(b for key, b in units.items() if placement.experts[key] == node)
        assert abs(expert_pages[node] * PAGE - planned) <= n_slices * PAGE
    # Dense pages alternate by stripe.
    stripe = numa.STRIPE_BYTES // PAGE
    dense = [p for unit, lo, end in owned if unit.expert is None for p in range(lo, end)]
    assert all(target[p] == (p // stripe) % 2 for p in dense)


def slice_bytes_by_node(unit: numa.Unit, node_of_page: np.ndarray) -> dict[int, int]:
    """Bytes of one expert slice on each node, given every page's node (a page counts the bytes it holds)."""
    first, end = unit.start // PAGE, -(-unit.end // PAGE)
    edges = np.arange(first, end + 1, dtype=np.int64) * PAGE
    edges[0], edges[-1] = unit.start, unit.end
    held: dict[int, int] = {}
    for node, nbytes in zip(node_of_page[first:end].tolist(), np.diff(edges).tolist(), strict=True):
        held[node] = held.get(node, 0) + nbytes
    return held


@pytest.mark.parametrize(("arch", "variant"), [("qwen3moe", "f32"), ("qwen3moe", "q4_k_m"), ("deepseek2", "q4_k_m")])
def test_split_targets_cut_every_expert_slice_evenly_within_a_page(tiny_model, arch, variant):
    model = open_gguf(tiny_model(arch, variant))
    cpus = {0: frozenset([0]), 1: frozenset([1])}  # two nodes on paper
    placement = numa.Placement.split(model, cpus)
    p = placement.partition
    with numa.ModelPages(model) as pages:
        target = placement.targets(pages, 0)
        slices = [u for u in pages.units[0] if u.expert is not None]
    assert len(slices) == 3 * sum(el.n_expert for el in p.layers.values())
    for unit in slices:
        layer, e = unit.expert
        nbytes = unit.end - unit.start
        held = slice_bytes_by_node(unit, target)
        assert set(held) <= {0, 1} and sum(held.values()) == nbytes
        for node in (0, 1):
            ff, out = p.share(layer, e, node)
            rows = ff if unit.tensor != "ffn_down_exps" else out
            assert abs(held.get(node, 0) - len(rows) * unit.row_bytes) < PAGE  # the rows' bytes, give or take a page
            assert abs(held.get(node, 0) - nbytes / 2) < PAGE + unit.row_bytes  # an even split, give or take a page
    # Pages alternate between the nodes within each slice in row order: node 0's rows come first.
    for unit in slices:
        nodes = target[unit.start // PAGE + 1 : -(-unit.end // PAGE)]
        assert (np.diff(nodes) >= 0).all()


def test_row_partition_gives_every_worker_the_same_bytes_of_any_routing(tiny_model):
    """The routing-independent balance split is for: every worker reads the same bytes for any set of experts,
    where by_expert (shard) and contiguous (MPI) give each expert's bytes to one worker."""
    from refengine.partition import ExpertPartition, even_cuts

    model = open_gguf(tiny_model("deepseek2", "q4_k_m"))
    routed = sum(t.nbytes for t in model.tensors.values() if numa.weight_group(t.name) == "routed_experts")
    rng = np.random.default_rng(0)
    for workers in [(0, 1), (0, 1, 2)]:
        rows = ExpertPartition.by_rows(model, workers)
        whole = ExpertPartition.by_expert(model, workers)
        contiguous = ExpertPartition.contiguous(model, workers)
        for p in (rows, whole, contiguous):
            assert sum(p.worker_bytes().values()) == routed
        for layer, el in rows.layers.items():
            assert rows.ff_cuts[layer] == even_cuts(el.n_ff, len(workers)) and rows.ff_cuts[layer][-1] == el.n_ff
            for _ in range(20):
                chosen = rng.choice(el.n_expert, size=2, replace=False)
                read = rows.token_bytes(layer, chosen)
                assert max(read.values()) - min(read.values()) <= sum(el.row_bytes.values()) * len(chosen)  # a row
                assert sum(read.values()) == sum(whole.token_bytes(layer, chosen).values())
                owners = {whole.owner(layer, int(e)) for e in chosen}
                assert sum(1 for b in whole.token_bytes(layer, chosen).values() if b) == len(owners)
            owners = [contiguous.owner(layer, e) for e in range(el.n_expert)]
            assert owners == sorted(owners) and set(owners) == set(workers)  # one run of experts per worker


def test_plan_split_gives_each_node_an_even_share_of_every_expert(deepseek_r1):  # noqa: F811
    """R1's header on four sub-NUMA nodes: each holds a quarter of every expert's rows (2048 and 7168 rows
    cut in four: to the byte), and a quarter of the rest, and the plan says so node by node."""
    from refengine.plan import plan

    gguf = open_gguf(deepseek_r1[0])
    p = plan(gguf, read_system(FIXTURES / "snc4"), n_ctx=4096, numa="split")
    assert p.verdict == "fits", p.message()
    routed = p.needs.weights["routed_experts"]
    rest = p.needs.weights_total - routed
    for share in p.nodes:
        assert abs(share.weights - (routed + rest) / 4) <= 3  # _spread's remainder goes to the first node
        assert share.experts == len(expert_units(gguf))
    shard = plan(gguf, read_system(FIXTURES / "snc4"), n_ctx=4096, numa="shard")
    assert sum(s.weights for s in shard.nodes) == sum(s.weights for s in p.nodes) == p.needs.weights_total


class RefusingKernel(numa.Kernel):
    """A kernel inside a container: set_mempolicy is EPERM, moving is ENOSYS, and queries say every
    page is on node 1 (so that a one-node machine has something to move)."""

    def set_mempolicy(self, mode, nodes=()):
        raise OSError(errno.EPERM, "set_mempolicy: Operation not permitted")

    def move_pages(self, addresses, nodes=None, flags=0):
        if nodes is not None:
            raise OSError(errno.ENOSYS, "move_pages: Function not implemented")
        return np.ones(len(addresses), dtype=np.int32)


def test_refused_syscalls_warn_once_with_the_bytes_that_stayed(tiny_model):
    model = open_gguf(tiny_model("mixtral", "q4_k_m"))
    cpus = numa.node_cpus(SYSTEM, [SYSTEM.allowed_nodes()[0].id])
    placement = numa.Placement.shard(model, cpus)
    with numa.NodePools(cpus) as pools, numa.ModelPages(model) as pages:
        report = numa.place(pages, placement, pools, RefusingKernel())
    placed = sum(report.target.values())
    assert placed >= sum(t.nbytes for t in model.tensors.values())
    assert report.stayed == placed and report.moved == 0
    assert report.refusals.first == {"set_mempolicy": errno.EPERM, "move_pages": errno.ENOSYS}
    line = report.warning()
    assert "\n" not in line
    assert "set_mempolicy (EPERM)" in line and "move_pages (ENOSYS)" in line and f"{placed} bytes" in line


def test_cli_warns_once_when_placement_is_refused_and_carries_on(capsys, monkeypatch, tiny_model):
    path = tiny_model("mixtral", "q4_k_m")

    def refuse(self, mode, nodes=()):
        raise OSError(errno.EPERM, "set_mempolicy: Operation not permitted")

    monkeypatch.setattr(numa.Kernel, "set_mempolicy", refuse)
    code, out, err = run(capsys, "numa", path, "--numa", "shard", "--json")
    assert code == 0
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "set_mempolicy (EPERM)" in warnings[0]
    report = json.loads(out)
    assert report["placement"]["refused"] == {"set_mempolicy": "EPERM"}
    assert report["not_resident"]["total"] == 0  # the pages were still brought in, where the kernel liked


def test_numa_report_json(capsys, tiny_model):
    path = tiny_model("mixtral", "f32")
    code, out, _ = run(capsys, "numa", path, "--json")
    assert code == 0
    report = json.loads(out)
    model = open_gguf(path)
    assert report["mapped"] == sum(t.nbytes for t in model.tensors.values())
    assert [n["node"] for n in report["nodes"]] == [n.id for n in SYSTEM.memory_nodes]
    assert sum(n["total"] for n in report["nodes"]) + report["not_resident"]["total"] == report["mapped"]
    assert report["placement"] is None  # --numa off reads, it moves nothing
    code, out, _ = run(capsys, "numa", path)
    assert code == 0 and "routed experts" in out and "not resident" in out


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--numa-nodes", "7"], ["node 7 does not exist", "nodes 0"]),
        (["--numa-nodes", "0", "--sysroot", FIXTURES / "two_nodes_cpuset1"], ["node 0 is outside", "Mems_allowed 1"]),
        (["--numa-nodes", "0", "--sysroot", FIXTURES / "two_nodes_bind1"], ["node 0 is outside", "bind:1"]),
        (["--numa-nodes", "0-x"], ["--numa-nodes", "'0-x'"]),
    ],
)
def test_bad_nodes_are_one_line_errors(capsys, tiny_model, argv, needles):
    if "does not exist" in needles[0] and len(SYSTEM.nodes) > 7:
        pytest.skip("this machine has a node 7")
    path = tiny_model("mixtral", "q4_k_m")
    # a list that does not parse is a bad flag value: a usage error, exit 2, "refengine COMMAND: error: ..."
    expected, prefix = (EXIT_USAGE, "refengine ") if argv[-1] == "0-x" else (EXIT_ERROR, "refengine: error: ")
    for command in (["numa", path, "--numa", "shard"], ["generate", "-m", path, "--no-plan", "--numa", "shard", "hi"]):
        code, _, err = run(capsys, *command, *argv)
        assert code == expected and "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(prefix) and ": error: " in lines[0]
        assert all(needle in lines[0] for needle in needles), lines[0]


def test_distribute_spreads_threads_over_the_nodes_as_llama_cpp(monkeypatch):
    monkeypatch.setenv("OMP_PLACES", "unset")  # restored after the test
    monkeypatch.setenv("OMP_PROC_BIND", "unset")
    system = read_system(FIXTURES / "two_nodes")
    cpus = numa.node_cpus(system, [0, 1])
    settings = numa.spread_threads(system, [0, 1], 4)
    first, second = (",".join(map(str, sorted(cpus[n]))) for n in (0, 1))
    assert settings["OMP_PLACES"] == f"{{{first}}},{{{second}}},{{{first}}},{{{second}}}"
    assert os.environ["OMP_PROC_BIND"] == "close"


def test_generate_shard_and_split_give_the_tokens_of_off(capsys, tiny_model):
    """On any machine: placement and expert dispatch through the pools change no token, and --json reports
    the bytes placed per node."""
    path = tiny_model("mixtral", "f32")
    tokens, reports = {}, {}
    for mode in ("off", "shard", "split"):
        code, out, err = run(capsys, "generate", "-m", path, "-n", "12", "--temp", "0", "--json", "--numa", mode, "hi")
        assert code == 0, err
        assert "warning" not in err
        tokens[mode], reports[mode] = json.loads(out)["tokens"], json.loads(out).get("numa")
    assert len(tokens["off"]) == 12 and tokens["shard"] == tokens["off"] and tokens["split"] == tokens["off"]
    assert reports["off"] is None  # --numa off runs nothing of refengine.numa
    model = open_gguf(path)
    routed = sum(t.nbytes for t in model.tensors.values() if numa.weight_group(t.name) == "routed_experts")
    n_slices = sum(3 * n for n in {key[0]: key[1] + 1 for key in expert_units(model)}.values())
    for mode in ("shard", "split"):
        placed = reports[mode]["placement"]
        assert reports[mode]["mode"] == mode and placed["stayed_bytes"] == 0
        # whole pages of experts, per node: the expert bytes give or take a shared page per slice
        assert abs(sum(placed["experts"].values()) - routed) <= n_slices * PAGE
        assert sum(placed["target"].values()) >= sum(t.nbytes for t in model.tensors.values())


@pytest.mark.parametrize("arch", ["deepseek2", "qwen3moe"])
def test_experts_run_on_the_pools_give_the_bits_of_off(tiny_model, arch):
    """Each expert on its node's pool (forced here, where one node would not dispatch): a batch, where each
    expert is a matrix product over its tokens, and a decoded token, where each is a fused matvec."""
    from refengine.session import Session

    session = Session.load(str(tiny_model(arch, "q4_k_m")))

    def logits() -> tuple[np.ndarray, np.ndarray]:
        cache = session.new_cache(8)
        batch = session.model.forward(np.array([1, 5, 9, 22, 100, 7]), cache)  # (6, n_vocab)
        return batch, session.model.forward(np.array([3]), cache)  # (1, n_vocab)

    off = logits()
    runtime = numa.NumaRuntime("shard", SYSTEM)
    try:
        runtime.attach(session.gguf, session.model, dispatch=True)
        blocks = [b for layer in session.model.layers for b in vars(layer).values() if hasattr(b, "dispatch")]
        assert blocks and all(isinstance(b.dispatch, numa.ExpertDispatch) for b in blocks)
        shard = logits()
    finally:
        runtime.close()
    assert np.array_equal(shard[0], off[0]) and np.array_equal(shard[1], off[1])


def greedy_tokens(session, prompt: str, n: int) -> list[int]:
    from refengine.generate import generate
    from refengine.sampler import Sampler, SamplerConfig

    ids = session.tokenizer.encode(prompt)
    cache = session.new_cache(len(ids) + n)
    return generate(session.model, session.tokenizer, cache, ids, n, Sampler(SamplerConfig(temperature=0))).tokens


@pytest.mark.parametrize(("arch", "variant"), [("deepseek2", "q4_k_m"), ("mixtral", "f32")])
def test_split_on_two_pools_computes_what_off_does_and_evens_the_reads(tiny_model, arch, variant):
    """Two pools standing for two nodes (each pinned to one CPU of this machine), every expert cut by rows over
    them: a batch's logits are off's within float32 rounding (BLAS picks its kernel by the matrix's size, and a
    node's rows are a smaller matrix; off runs an expert's two or three tokens through the matvec kernels,
    split's row ranges go through the tiles), and so is the next decoded token's, over that batch's cache;
    under shard, which makes off's calls expert by expert, both are off's to the bit; the greedy tokens are
    off's. Each token's reads are even over the pools, where shard's
    follow its routing."""
    from refengine.session import Session

    session = Session.load(str(tiny_model(arch, variant)))
    allowed = sorted(SYSTEM.cpus_allowed or {0})
    cpus = {0: frozenset(allowed[:1]), 1: frozenset(allowed[-1:])}

    def logits() -> tuple[np.ndarray, np.ndarray]:
        cache = session.new_cache(8)
        batch = session.model.forward(np.array([1, 5, 9, 22, 100, 7]), cache)  # (6, n_vocab)
        return batch, session.model.forward(np.array([3]), cache)  # (1, n_vocab)

    off_logits, off_tokens = logits(), greedy_tokens(session, "hello world", 12)
    reads = {}
    with numa.NodePools(cpus) as pools:
        for mode, kind in (("split", numa.SplitDispatch), ("shard", numa.ExpertDispatch)):
            placement = numa.Placement.for_mode(mode, session.gguf, cpus)
            meter = numa.ReadMeter(placement.expert_nodes, len(session.model.moe_blocks()))
            for il, block in session.model.moe_blocks():
                block.dispatch = kind(il, placement, pools, meter)
            try:
                batch, one = logits()
                meter.one_token.clear()  # count the greedy run's tokens only
                tokens = greedy_tokens(session, "hello world", 12)
            finally:
                for _, block in session.model.moe_blocks():
                    block.dispatch = None
            np.testing.assert_allclose(batch, off_logits[0], rtol=0, atol=1e-5 * np.abs(off_logits[0]).max())
            np.testing.assert_allclose(one, off_logits[1], rtol=0, atol=1e-5 * np.abs(off_logits[1]).max())
            if mode == "shard":  # the same calls as off, expert by expert
                assert np.array_equal(batch, off_logits[0])
                assert np.array_equal(one, off_logits[1])
            assert tokens == off_tokens
            reads[mode] = meter.as_dict()
    split, shard = reads["split"], reads["shard"]
    assert split["tokens"] == shard["tokens"] == 11  # the first token comes out of the prompt's batch
    assert split["max_over_mean"]["worst"] <= 1.02
    assert shard["max_over_mean"]["worst"] >= 1.5  # some token chose experts of one node only
    per_token = [n["read_per_token"] for n in split["nodes"]]
    assert sum(per_token) == pytest.approx(sum(n["read_per_token"] for n in shard["nodes"]))


# -- on two nodes (the QEMU guest) -----------------------------------------------------------------


@pytest.mark.numa
def test_shard_placement_read_back_matches_the_plan(capsys, tiny_model, two_nodes):
    path = tiny_model("qwen3moe", "q4_k_m")  # expert slices of 4.5 pages: most boundaries are shared pages
    code, out, err = run(capsys, "numa", path, "--numa", "shard", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["placement"]["stayed_bytes"] == 0 and report["placement"]["refused"] == {}
    assert report["not_resident"]["total"] == 0
    model = open_gguf(path)
    nodes = [n["node"] for n in report["nodes"]]
    units = expert_units(model)
    planned = assign_experts(units, [n for n in nodes if numa.node_cpus(SYSTEM, [n])[n]])
    n_slices = 3 * len(units)
    for entry in report["nodes"]:
        want = sum(b for key, b in units.items() if planned[key] == entry["node"])
        assert abs(entry["groups"]["routed_experts"] - want) <= n_slices * PAGE
        assert entry["groups"]["routed_experts"] > 0
    # Page by page: every page is on the node Placement.targets gives it, read back with move_pages.
    placement = numa.Placement.shard(model, numa.node_cpus(SYSTEM, nodes))
    with numa.ModelPages(model) as pages:
        target = placement.targets(pages, 0)
        numa.residency(pages, nodes)  # maps the cached pages into this process
        placed = np.flatnonzero(target >= 0)
        where = numa.Kernel().move_pages(pages.address(0) + placed.astype(np.uint64) * PAGE)
    assert (where == target[placed]).all()
    assert set(target[placed].tolist()) == set(nodes)


@pytest.mark.numa
def test_shard_generates_exactly_the_tokens_of_off_on_two_nodes(tiny_model, two_nodes):
    """In one process (numba loads once in the slow guest): off first, then the same model under shard,
    which moves the pages off touched onto their planned nodes and sends each expert to its node's pool."""
    from refengine.generate import generate
    from refengine.sampler import Sampler, SamplerConfig
    from refengine.session import Session

    session = Session.load(str(tiny_model("mixtral", "f32")))
    prompt = session.tokenizer.encode("hello world")

    def tokens() -> list[int]:
        cache = session.new_cache(len(prompt) + 12)
        return generate(
            session.model, session.tokenizer, cache, prompt, 12, Sampler(SamplerConfig(temperature=0))
        ).tokens

    off = tokens()
    runtime = numa.NumaRuntime("shard", SYSTEM)
    try:
        assert runtime.attach(session.gguf, session.model) is None  # no warning: nothing refused or left behind
        assert runtime.report.stayed == 0 and len([b for b in runtime.report.target.values() if b]) >= 2
        dispatched = [b for layer in session.model.layers for b in vars(layer).values() if hasattr(b, "dispatch")]
        assert dispatched and all(b.dispatch is not None for b in dispatched)
        shard = tokens()
    finally:
        runtime.close()
    assert len(off) == 12 and shard == off


@pytest.mark.numa
def test_split_placement_read_back_cuts_every_expert_within_a_page(capsys, tiny_model, two_nodes):
    path = tiny_model("qwen3moe", "q4_k_m")  # expert slices of 4.5 pages, cut in two: shared pages everywhere
    code, out, err = run(capsys, "numa", path, "--numa", "split", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["placement"]["stayed_bytes"] == 0 and report["placement"]["refused"] == {}
    assert report["not_resident"]["total"] == 0
    nodes = [n["node"] for n in report["nodes"]]
    model = open_gguf(path)
    placement = numa.Placement.split(model, numa.node_cpus(SYSTEM, nodes))
    with numa.ModelPages(model) as pages:
        target = placement.targets(pages, 0)
        numa.residency(pages, nodes)  # maps the cached pages into this process
        placed = np.flatnonzero(target >= 0)
        where = np.full(target.size, -1, dtype=np.int32)
        where[placed] = numa.Kernel().move_pages(pages.address(0) + placed.astype(np.uint64) * PAGE)
        slices = [u for u in pages.units[0] if u.expert is not None]
    assert (where[placed] == target[placed]).all()  # page by page where Placement.targets says
    workers = placement.expert_nodes
    assert len(workers) == 2
    for unit in slices:  # each expert's slice of each tensor: an even split over both nodes, within a page
        held = slice_bytes_by_node(unit, where)
        assert all(abs(held.get(node, 0) - (unit.end - unit.start) / 2) < PAGE for node in workers), (unit, held)


@pytest.mark.numa
def test_split_generates_exactly_the_tokens_of_off_on_two_nodes(tiny_model, two_nodes):
    """In one process (numba loads once in the slow guest), for each MoE architecture and MLA layout: off first,
    then the same model under split, which moves the pages off touched onto their nodes and runs every
    expert's rows on both nodes' pools, each token's reads even over them."""
    from refengine.session import Session

    for arch in ("deepseek2", "deepseek2-kvb", "qwen3moe", "mixtral"):
        session = Session.load(str(tiny_model(arch, "f32")))
        off = greedy_tokens(session, "hello world", 8)
        runtime = numa.NumaRuntime("split", SYSTEM)
        try:
            assert runtime.attach(session.gguf, session.model) is None  # nothing refused, nothing left behind
            assert runtime.report.stayed == 0 and all(runtime.report.experts.values())
            assert all(isinstance(b.dispatch, numa.SplitDispatch) for _, b in session.model.moe_blocks())
            split = greedy_tokens(session, "hello world", 8)
            reads = runtime.meter.as_dict()
        finally:
            runtime.close()
        assert len(off) == 8 and split == off, arch
        assert reads["tokens"] == 7 and reads["max_over_mean"]["worst"] <= 1.02, (arch, reads)


DISTRIBUTE_PROBE = """
import json, os
import numpy as np
from refengine import numa
from refengine.kernels import dequantize_rows
from refengine.system import read_system
numa.NumaRuntime("distribute", read_system())
dequantize_rows(8, np.zeros((64, 34), np.uint8))  # a parallel kernel: numba starts its threads now
print(json.dumps([sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")]))
"""


@pytest.mark.numa
def test_distribute_pins_numba_threads_over_the_nodes(two_nodes):
    """A fresh process (OpenMP reads its settings once): numba's threads end up pinned, one per node in turn."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", DISTRIBUTE_PROBE], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    pinned = [frozenset(cpus) for cpus in json.loads(probe.stdout)]
    cpus = numa.node_cpus(SYSTEM, [n.id for n in SYSTEM.allowed_nodes()])
    workers = [c for c in cpus.values() if c]
    assert all(node_cpus in pinned for node_cpus in workers)  # a thread pinned to each node's CPUs
