"""NUMA execution: per-node worker pools, expert placement on the nodes' memory, and placement read
back from the kernel. `--numa off|distribute|shard|split` on generate, bench model and logits, and
`refengine numa MODEL` (numastat for the model), are built on this module; docs/numa.md has the design.

    off         nothing here runs: the kernel places pages and threads as it likes.
    distribute  numba's threads are spread over the nodes as llama.cpp's --numa distribute spreads its
                own: thread i on node i mod n_nodes, with all of that node's allowed CPUs. Pages stay
                where first touch puts them; nothing is moved.
    shard       one worker pool per node, its threads pinned to the node's allowed CPUs. Each routed
                expert (its slices of every ffn_*_exps tensor of its layer) gets one node, as
                plan.assign_experts chooses; only that node's pool computes it (ExpertDispatch).
    split       the same pools; every routed expert is cut by rows over the nodes (partition.by_rows):
                each node holds and computes its rows of every expert, in two phases per layer
                (SplitDispatch), so every token gives each node the same work whatever its routing.
    Under shard and split every other page of the model is interleaved over the nodes in stripes of
    STRIPE_BYTES. No page is copied: the mapping stays the only copy of the weights, 1x the model.

How pages are put on a node, as seen in the two-node guest (../shared/numa-vm/examples/file_pages.py):
mbind on a read-only shared file mapping returns 0 but is ignored for page-cache pages. What works:
a thread of the node's pool sets its own policy, set_mempolicy(MPOL_BIND, node), and brings the pages
into the page cache itself (posix_fadvise WILLNEED allocates exactly the range asked, in the calling
thread; touching each page then maps it); move_pages(MPOL_MF_MOVE) then migrates what landed
elsewhere: readahead stragglers, and pages that were cached on another node before we started.

Ownership of a page that two units share (expert slices are seldom page-aligned): it belongs to the
unit that comes first in the file. So expert e's first page, shared with expert e - 1, is e - 1's.
Under split, a page that holds two nodes' rows of one slice is likewise the node's whose rows come first.

Placement is verified, never assumed: after populating, every page's node is read back with
move_pages in query mode (nodes=NULL), and what is still on the wrong node is moved or counted.
When the kernel refuses a call (EPERM under a container's seccomp profile, ENOSYS without NUMA,
EACCES for pages another process maps), placement carries on: the refusal is recorded once per call,
and the report says, in one warning line, how many bytes stayed where they were.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refengine.errors import RefengineError
from refengine.gguf import GGUFFile
from refengine.partition import EXPERT_TENSORS, ExpertPartition
from refengine.plan import GROUPS, NUMA_MODES, expert_units, size, weight_group
from refengine.system import SystemInfo, format_ids

PAGE = mmap.PAGESIZE
PLACING_MODES = ("shard", "split")  # the modes that place pages and run experts on the nodes' pools
# Dense pages are interleaved in stripes rather than page by page: a fault reads ahead up to 128 KiB
# around itself, onto the faulting thread's node, so 4 KiB stripes would leave most pages to move.
STRIPE_BYTES = 2 << 20
POPULATE_BYTES = 16 << 20  # the work of one populate task: small enough for Ctrl-C, big enough for I/O
QUERY_PAGES = 1 << 16  # pages per move_pages call (512 KiB of addresses)

# Linux's numbers (include/uapi/linux/mempolicy.h, arch syscall tables).
SYSCALLS = {
    "x86_64": {"mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239, "move_pages": 279},
    "aarch64": {"mbind": 235, "get_mempolicy": 236, "set_mempolicy": 237, "move_pages": 239},
}
MPOL_DEFAULT, MPOL_BIND = 0, 2
MPOL_F_NODE, MPOL_F_ADDR = 1, 2  # get_mempolicy: return the node of the page at `addr`
MPOL_MF_MOVE = 2  # move_pages, mbind: move pages that only this process maps
MASK_BITS = 1024  # node masks we pass: nodes 0-1023, as libnuma's default


class NumaError(RefengineError):
    """A NUMA request this machine cannot meet (a node that does not exist or is not allowed), or
    a placement that cannot be read. The message names the node or the call."""


# -- the raw calls ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _check(result: int, name: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")
    return result


class Kernel:
    """The memory-policy system calls through ctypes, each raising OSError(errno) when refused.

    Tests replace methods of an instance to simulate refusals; placement code only calls these.
    """

    def __init__(self) -> None:
        self.numbers = SYSCALLS.get(platform.machine())

    def _syscall(self, name: str, *args) -> int:
        if self.numbers is None:
            raise OSError(errno.ENOSYS, f"{name}: no syscall numbers for {platform.machine()}")
        return _check(_libc.syscall(ctypes.c_long(self.numbers[name]), *args), name)

    @staticmethod
    def _mask(nodes: Iterable[int]) -> ctypes.Array:
        mask = (ctypes.c_ulong * (MASK_BITS // 64))()
        for node in nodes:
            mask[node // 64] |= 1 << (node % 64)
        return mask

    def set_mempolicy(self, mode: int, nodes: Iterable[int] = ()) -> None:
        """The calling thread's policy for the pages it allocates from now on."""
        nodes = list(nodes)
        mask = self._mask(nodes)
        # The kernel reads maxnode - 1 bits (a historical off-by-one that libnuma also pads for).
        mask_arg, maxnode = (ctypes.byref(mask), MASK_BITS + 1) if nodes else (None, 0)
        self._syscall("set_mempolicy", ctypes.c_int(mode), mask_arg, ctypes.c_ulong(maxnode))

    def mbind(self, address: int, length: int, mode: int, nodes: Iterable[int], flags: int = 0) -> None:
        """The policy of a range of this process's mappings (ignored for page-cache pages: see above)."""
        mask = self._mask(nodes)
        self._syscall(
            "mbind",
            ctypes.c_void_p(address),
            ctypes.c_ulong(length),
            ctypes.c_int(mode),
            ctypes.byref(mask),
            ctypes.c_ulong(MASK_BITS + 1),
            ctypes.c_uint(flags),
        )

    def node_of_address(self, address: int) -> int:
        """The node of the page at `address`, through get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR).
        Unlike a move_pages query this faults the page in if it is not mapped."""
        node = ctypes.c_int(-1)
        self._syscall(
            "get_mempolicy",
            ctypes.byref(node),
            None,
            ctypes.c_ulong(0),
            ctypes.c_void_p(address),
            ctypes.c_ulong(MPOL_F_NODE | MPOL_F_ADDR),
        )
        return node.value

    def move_pages(self, addresses: np.ndarray, nodes: np.ndarray | None = None, flags: int = 0) -> np.ndarray:
        """Per page (uint64 addresses), its node after the call, or -errno (-ENOENT: not present).

        nodes=None only asks where each page is; otherwise page i is moved to nodes[i]."""
        addresses = np.ascontiguousarray(addresses, dtype=np.uint64)
        status = np.full(len(addresses), -errno.ENOENT, dtype=np.int32)
        if len(addresses) == 0:
            return status
        if nodes is not None:
            nodes = np.ascontiguousarray(nodes, dtype=np.int32)
        self._syscall(
            "move_pages",
            ctypes.c_int(0),  # this process
            ctypes.c_ulong(len(addresses)),
            ctypes.c_void_p(addresses.ctypes.data),
            None if nodes is None else ctypes.c_void_p(nodes.ctypes.data),
            ctypes.c_void_p(status.ctypes.data),
            ctypes.c_int(flags),
        )
        return status

    @staticmethod
    def mincore(address: int, length: int) -> np.ndarray:
        """Per page of [address, address + length): True if it is in the page cache (no I/O, no fault)."""
        vec = np.zeros((length + PAGE - 1) // PAGE, dtype=np.uint8)
        _check(_libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec.ctypes.data), "mincore")
        return (vec & 1).astype(bool)


@dataclass
class Refusals:
    """The calls the kernel refused during placement, the first errno of each: warned about once."""

    first: dict[str, int] = field(default_factory=dict)

    def record(self, e: OSError) -> None:
        name = str(e.strerror).split(":", 1)[0] if e.strerror else "syscall"
        self.first.setdefault(name, e.errno or 0)

    def __bool__(self) -> bool:
        return bool(self.first)

    def describe(self) -> str:
        return ", ".join(f"{name} ({errno.errorcode.get(code, code)})" for name, code in self.first.items())


# -- which nodes, which CPUs -----------------------------------------------------------------------


def choose_nodes(system: SystemInfo, requested: Iterable[int] | None = None) -> tuple[int, ...]:
    """The nodes to place on and run on: `requested` (--numa-nodes), else every node we may use."""
    allowed = [n.id for n in system.allowed_nodes()]
    if requested is None:
        return tuple(allowed)
    existing = {n.id for n in system.nodes}
    chosen = []
    for node in requested:
        if node not in existing:
            raise NumaError(f"--numa-nodes: node {node} does not exist (this machine has nodes {format_ids(existing)})")
        if node not in allowed:
            raise NumaError(
                f"--numa-nodes: node {node} is outside the nodes this process may use ({format_ids(allowed)}: "
                f"Mems_allowed {format_ids(system.mems_allowed or existing)}, memory policy {system.policy})"
            )
        if node not in chosen:
            chosen.append(node)
    if not chosen:
        raise NumaError("--numa-nodes: no node given")
    return tuple(chosen)


def node_cpus(system: SystemInfo, nodes: Iterable[int]) -> dict[int, frozenset[int]]:
    """Each node's CPUs this process may run on; a memory-only node has none."""
    by_id = {n.id: n for n in system.nodes}
    return {node: system.cpus_on(by_id[node]) for node in nodes}


def spread_threads(system: SystemInfo, nodes: Iterable[int], n_threads: int) -> dict[str, str]:
    """--numa distribute: the OpenMP settings that pin numba's thread i to node i mod n_nodes, with all
    of that node's allowed CPUs (llama.cpp's ggml_thread_cpumask_numa_distribute does the same for its
    own threads). Set in os.environ before numba first starts its threads; OpenMP reads them once."""
    cpus = [c for c in node_cpus(system, nodes).values() if c]
    if not cpus:
        return {}
    places = ",".join("{" + ",".join(map(str, sorted(cpus[i % len(cpus)]))) + "}" for i in range(n_threads))
    settings = {"OMP_PLACES": places, "OMP_PROC_BIND": "close"}
    os.environ.update(settings)
    return settings


# -- pools -----------------------------------------------------------------------------------------


class NodePools:
    """One thread pool per node with CPUs, its threads pinned to that node's allowed CPUs.

    A task runs numba kernels on its own thread only (kernel_threads(1)): the pool's threads are the
    node's parallelism, and the kernels release the GIL, so they run at once. `with NodePools(...)`
    or close() shuts them down; on Ctrl-C queued tasks are cancelled and running ones finish.
    """

    def __init__(self, cpus: dict[int, frozenset[int]], threads_per_node: int | None = None):
        self.cpus = {node: c for node, c in cpus.items() if c}
        if not self.cpus:
            raise NumaError("no node has a CPU this process may run on")
        self.sizes = {node: threads_per_node or len(c) for node, c in self.cpus.items()}
        self.pools = {
            node: ThreadPoolExecutor(
                max_workers=self.sizes[node],
                thread_name_prefix=f"refengine-node{node}",
                initializer=os.sched_setaffinity,
                initargs=(0, c),  # pid 0: the calling thread, which is the new worker
            )
            for node, c in self.cpus.items()
        }

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(self.pools)

    def threads(self, node: int) -> int:
        """How many tasks `node`'s pool runs at once."""
        return self.sizes[node]

    def submit(self, node: int, fn: Callable, *args) -> Future:
        """Run fn(*args) on one of `node`'s threads."""
        if node not in self.pools:
            raise NumaError(f"node {node} has no worker pool (pools: {format_ids(self.pools)})")
        return self.pools[node].submit(_single_threaded, fn, *args)

    def map(self, node: int, fn: Callable, *iterables) -> Iterator:
        """fn over the items on `node`'s threads, results in order."""
        futures = [self.submit(node, fn, *args) for args in zip(*iterables, strict=True)]
        return (f.result() for f in futures)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> NodePools:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _single_threaded(fn: Callable, *args):
    kernels = sys.modules.get("refengine.kernels")
    if kernels is None:  # no kernel has been loaded, so none can run: spare placement the numba import
        return fn(*args)
    with kernels.kernel_threads(1):
        return fn(*args)


# -- the model's pages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A run of a split's bytes that is placed as one: a tensor, or one expert's slice of a 3-D one."""

    start: int  # byte offset in the split
    end: int
    group: str  # plan.GROUPS
    expert: tuple[int, int] | None = None  # (layer, expert) for routed expert slices
    tensor: str = ""  # for expert slices, the tensor kind: ffn_gate_exps, ffn_up_exps or ffn_down_exps
    row_bytes: int = 0  # for expert slices, the bytes of one of its rows


class ModelPages:
    """The model's own mapping of each split, and the units that own its pages.

    Placement works through the model's mapping, not a second one: move_pages(MPOL_MF_MOVE) refuses
    (EACCES) a page that more than one mapping maps, even two of the same process."""

    def __init__(self, gguf_file: GGUFFile):
        self.paths = list(gguf_file.splits)
        # GGUFFile keeps one read-only mapping per split, in the order of `splits`.
        self.views = [np.frombuffer(m, dtype=np.uint8) for m in gguf_file._maps]  # (file bytes,) uint8 each
        self.fds = [os.open(path, os.O_RDONLY) for path in self.paths]  # for posix_fadvise
        self.units: list[list[Unit]] = [[] for _ in self.paths]
        split_of = {Path(p): i for i, p in enumerate(self.paths)}
        routed = expert_units(gguf_file)  # checks the expert tensors' shapes
        for t in gguf_file.tensors.values():
            if t.nbytes == 0:
                continue
            units, group = self.units[split_of[Path(t.path)]], weight_group(t.name)
            if group == "routed_experts" and routed:
                _, layer, kind = t.name.split(".")[:3]
                n_expert, step = t.shape[0], t.nbytes // t.shape[0]
                units += [
                    Unit(t.offset + e * step, t.offset + (e + 1) * step, group, (int(layer), e), kind, t.row_bytes)
                    for e in range(n_expert)
                ]
            else:
                units.append(Unit(t.offset, t.offset + t.nbytes, group))
        for units in self.units:
            units.sort(key=lambda u: u.start)

    def address(self, split: int) -> int:
        return self.views[split].ctypes.data

    def owned_pages(self, split: int) -> Iterator[tuple[Unit, int, int]]:
        """(unit, first page, end page) of the pages each unit owns: a shared page is the earlier unit's."""
        taken = 0
        for unit in self.units[split]:
            first = max(unit.start // PAGE, taken)
            end = -(-unit.end // PAGE)
            if end > first:
                yield unit, first, end
                taken = end

    def close(self) -> None:
        self.views.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> ModelPages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- shard placement -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where --numa shard or split puts each page: the routed experts as an ExpertPartition over the nodes
    with CPUs says, everything else in stripes over every chosen node."""

    partition: ExpertPartition  # workers: the nodes with CPUs, which compute experts
    stripe_nodes: tuple[int, ...]  # every chosen node: dense pages are interleaved over them

    @classmethod
    def for_mode(cls, mode: str, gguf_file: GGUFFile, cpus: dict[int, frozenset[int]]) -> Placement:
        """shard: each expert whole on one node, balanced by bytes (plan.assign_experts; within a layer every
        expert is equally likely a priori, so equal bytes per layer per node is also equal expected load).
        split: rows of every expert on every node (partition.ExpertPartition.by_rows)."""
        workers = tuple(node for node, c in cpus.items() if c) or tuple(cpus)
        if mode == "split":
            return cls(ExpertPartition.by_rows(gguf_file, workers), tuple(cpus))
        return cls(ExpertPartition.by_expert(gguf_file, workers), tuple(cpus))

    @classmethod
    def shard(cls, gguf_file: GGUFFile, cpus: dict[int, frozenset[int]]) -> Placement:
        return cls.for_mode("shard", gguf_file, cpus)

    @classmethod
    def split(cls, gguf_file: GGUFFile, cpus: dict[int, frozenset[int]]) -> Placement:
        return cls.for_mode("split", gguf_file, cpus)

    @property
    def expert_nodes(self) -> tuple[int, ...]:
        return self.partition.workers

    @property
    def experts(self) -> dict[tuple[int, int], int]:
        """(layer, expert) -> node, for shard."""
        return self.partition.owners

    def node_of(self, layer: int, expert: int) -> int:
        """shard: the node that holds expert `expert` of layer `layer`, and whose pool computes it."""
        return self.partition.owner(layer, expert)

    def targets(self, pages: ModelPages, split: int) -> np.ndarray:
        """The node for each page of the split, -1 for pages no tensor uses (the header).

        A page two units share is the earlier unit's (ModelPages.owned_pages); under split, a page that holds
        the rows of two nodes within one expert slice is likewise the node whose rows come first in it."""
        target = np.full(-(-len(pages.views[split]) // PAGE), -1, dtype=np.int32)
        stripe_pages = max(1, STRIPE_BYTES // PAGE)
        stripes = np.asarray(self.stripe_nodes, dtype=np.int32)
        workers = np.asarray(self.partition.workers, dtype=np.int32)
        for unit, first, end in pages.owned_pages(split):
            if unit.expert is None:
                target[first:end] = stripes[(np.arange(first, end) // stripe_pages) % len(stripes)]
            elif self.partition.kind != "rows":
                target[first:end] = self.partition.owner(*unit.expert)
            else:
                layer = unit.expert[0]
                cuts = self.partition.ff_cuts if EXPERT_TENSORS[unit.tensor] == "ff" else self.partition.out_cuts
                # the row that holds each page's first byte of this unit, and the worker whose rows it is in
                first_byte = np.maximum(np.arange(first, end, dtype=np.int64) * PAGE, unit.start) - unit.start
                row = first_byte // unit.row_bytes
                target[first:end] = workers[np.searchsorted(cuts[layer], row, side="right") - 1]
        return target


@dataclass
class PlacementReport:
    """What placing did: bytes per node wanted, bytes moved, bytes left on another node, refusals."""

    target: dict[int, int]  # node -> bytes (whole pages) meant to live there
    experts: dict[int, int] = field(default_factory=dict)  # node -> bytes (whole pages) of routed experts among them
    mode: str = "shard"
    moved: int = 0  # bytes move_pages migrated
    stayed: int = 0  # bytes still on another node (or not resident) after placement
    refusals: Refusals = field(default_factory=Refusals)

    def warning(self) -> str | None:
        """The one warning line, when the kernel refused a call; None otherwise."""
        if not self.refusals and not self.stayed:
            return None
        refused = f"the kernel refused {self.refusals.describe()}; " if self.refusals else ""
        return (
            f"--numa {self.mode}: {refused}{size(self.stayed)} of the model stayed where it was "
            f"({self.stayed} bytes not on their planned node); carrying on"
        )

    def as_dict(self) -> dict:
        return {
            "target": {str(node): b for node, b in self.target.items()},
            "experts": {str(node): b for node, b in self.experts.items()},
            "moved_bytes": self.moved,
            "stayed_bytes": self.stayed,
            "refused": {name: errno.errorcode.get(code, code) for name, code in self.refusals.first.items()},
        }


def place(pages: ModelPages, placement: Placement, pools: NodePools, kernel: Kernel | None = None) -> PlacementReport:
    """Put every page on its node (Placement.targets) without copying it, then read back and fix."""
    kernel = kernel or Kernel()
    mode = "split" if placement.partition.kind == "rows" else "shard"
    report = PlacementReport(target=dict.fromkeys(placement.stripe_nodes, 0), mode=mode)
    report.experts = dict.fromkeys(placement.expert_nodes, 0)
    targets = [placement.targets(pages, split) for split in range(len(pages.paths))]
    for split, target in enumerate(targets):
        for node in placement.stripe_nodes:
            report.target[node] += int(np.count_nonzero(target == node)) * PAGE
        for unit, first, end in pages.owned_pages(split):
            if unit.expert is not None:
                nodes, counts = np.unique(target[first:end], return_counts=True)
                for node, count in zip(nodes.tolist(), counts.tolist(), strict=True):
                    report.experts[node] += count * PAGE
    futures = []
    for split, target in enumerate(targets):
        for node, first, end in _runs(target):
            runner = node if node in pools.pools else pools.nodes[0]  # a memory-only node: any thread may bind
            for lo in range(first, end, POPULATE_BYTES // PAGE):
                hi = min(end, lo + POPULATE_BYTES // PAGE)
                futures.append(pools.submit(runner, _populate, kernel, pages, split, lo, hi, node, report.refusals))
    for f in futures:
        f.result()
    for split, target in enumerate(targets):
        report.moved += _move_stragglers(kernel, pages, split, target, report.refusals)
        wrong = target >= 0
        wrong &= _where(kernel, pages, split, np.flatnonzero(wrong), report.refusals, wrong.size) != target
        report.stayed += int(np.count_nonzero(wrong)) * PAGE
    return report


def _runs(target: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(node, first page, end page) for each run of equal targets, skipping -1."""
    if target.size == 0:
        return
    edges = np.flatnonzero(np.diff(target)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [target.size]])
    for first, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if target[first] >= 0:
            yield int(target[first]), first, end


def _populate(kernel: Kernel, pages: ModelPages, split: int, first: int, end: int, node: int, refusals) -> None:
    """On a pool thread: bind this thread's allocations to `node`, bring pages [first, end) in, unbind."""
    try:
        kernel.set_mempolicy(MPOL_BIND, [node])
    except OSError as e:
        refusals.record(e)  # the pages land where the kernel likes; _move_stragglers tries to fix that
    try:
        length = (end - first) * PAGE
        try:  # allocates exactly this range in this thread (no readahead beyond it); async I/O
            os.posix_fadvise(pages.fds[split], first * PAGE, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # some file systems do not read ahead; the touch below faults the pages instead
        pages.views[split][first * PAGE : end * PAGE : PAGE].max()  # one byte a page: maps each page
    finally:
        try:
            kernel.set_mempolicy(MPOL_DEFAULT)
        except OSError as e:
            refusals.record(e)


def _where(
    kernel: Kernel, pages: ModelPages, split: int, page_ids: np.ndarray, refusals: Refusals, n_pages: int
) -> np.ndarray:
    """Per page of the split, the node move_pages reports for `page_ids` (-ENOENT elsewhere or refused)."""
    status = np.full(n_pages, -errno.ENOENT, dtype=np.int32)
    base = pages.address(split)
    for lo in range(0, len(page_ids), QUERY_PAGES):
        ids = page_ids[lo : lo + QUERY_PAGES]
        try:
            status[ids] = kernel.move_pages(base + ids.astype(np.uint64) * PAGE)
        except OSError as e:
            refusals.record(e)
            break
    return status


def _move_stragglers(kernel: Kernel, pages: ModelPages, split: int, target: np.ndarray, refusals: Refusals) -> int:
    """move_pages(MPOL_MF_MOVE) every page of the split not on its target node; the bytes moved."""
    placed = np.flatnonzero(target >= 0)
    status = _where(kernel, pages, split, placed, refusals, target.size)
    wrong = placed[status[placed] != target[placed]]
    moved = 0
    base = pages.address(split)
    for lo in range(0, len(wrong), QUERY_PAGES):
        ids = wrong[lo : lo + QUERY_PAGES]
        try:
            after = kernel.move_pages(base + ids.astype(np.uint64) * PAGE, target[ids], MPOL_MF_MOVE)
        except OSError as e:
            refusals.record(e)
            break
        moved += int(np.count_nonzero(after == target[ids])) * PAGE
    return moved


# -- reading placement back ------------------------------------------------------------------------


@dataclass
class Residency:
    """Bytes of the model per node and tensor group, as the kernel reports them: numastat for a model."""

    model: str
    mapped: int  # bytes of tensor data
    nodes: dict[int, dict[str, int]]  # node -> group -> bytes resident there
    not_resident: dict[str, int]  # group -> bytes not in memory

    def node_total(self, node: int) -> int:
        return sum(self.nodes[node].values())

    def group_total(self, group: str) -> int:
        return sum(n[group] for n in self.nodes.values()) + self.not_resident[group]

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "mapped": self.mapped,
            "nodes": [
                {"node": node, "groups": dict(groups), "total": self.node_total(node)}
                for node, groups in self.nodes.items()
            ],
            "not_resident": {"groups": dict(self.not_resident), "total": sum(self.not_resident.values())},
        }


def residency(pages: ModelPages, nodes: Iterable[int], kernel: Kernel | None = None) -> Residency:
    """Where each byte of the model's tensors lives now, read back from the kernel without reading the disk.

    mincore says which pages are in the page cache; those are touched (a minor fault, no I/O) so that
    move_pages can see them in our mapping, and move_pages in query mode names their node. A byte counts
    on its page's node: pages shared by two tensors are split by the bytes each has in them.
    """
    kernel = kernel or Kernel()
    result = Residency(
        model=str(pages.paths[0]),
        mapped=0,
        nodes={node: dict.fromkeys(GROUPS, 0) for node in sorted(nodes)},
        not_resident=dict.fromkeys(GROUPS, 0),
    )
    for split in range(len(pages.paths)):
        view = pages.views[split]
        cached = kernel.mincore(pages.address(split), len(view))
        present = np.flatnonzero(cached)
        view[present * PAGE].max(initial=0)  # map them into our page tables
        refusals = Refusals()
        status = _where(kernel, pages, split, present, refusals, cached.size)
        if refusals:
            raise NumaError(f"{pages.paths[split]}: cannot read where its pages are: {refusals.describe()}")
        for unit in pages.units[split]:
            first, end = unit.start // PAGE, -(-unit.end // PAGE)
            edges = np.arange(first, end + 1, dtype=np.int64) * PAGE
            edges[0], edges[-1] = unit.start, unit.end
            in_page = np.diff(edges)  # (end - first,) this unit's bytes in each of its pages
            where = status[first:end]
            result.mapped += unit.end - unit.start
            for node in np.unique(where).tolist():
                held = int(in_page[where == node].sum())
                if node < 0:
                    result.not_resident[unit.group] += held
                else:
                    result.nodes.setdefault(node, dict.fromkeys(GROUPS, 0))[unit.group] += held
    return result


def render_residency(r: Residency, report: PlacementReport | None = None) -> str:
    """A numastat-like table, MiB per tensor group and node."""
    nodes = list(r.nodes)
    header = f"{'MiB':<16}" + "".join(f"{f'node {n}':>12}" for n in nodes) + f"{'not resident':>14}{'total':>12}"
    lines = [f"{r.model}: {size(r.mapped)} of tensors", header, "-" * len(header)]

    def row(label: str, per_node: list[int], missing: int) -> str:
        cells = "".join(f"{b / 2**20:>12.2f}" for b in per_node)
        return f"{label:<16}{cells}{missing / 2**20:>14.2f}{(sum(per_node) + missing) / 2**20:>12.2f}"

    for group in GROUPS:
        if r.group_total(group):
            lines.append(row(group.replace("_", " "), [r.nodes[n][group] for n in nodes], r.not_resident[group]))
    lines.append(row("total", [r.node_total(n) for n in nodes], sum(r.not_resident.values())))
    if report is not None:
        lines.append(
            f"--numa {report.mode} planned "
            + ", ".join(
                f"node {n}: {b / 2**20:.2f} MiB ({report.experts.get(n, 0) / 2**20:.2f} of experts)"
                for n, b in report.target.items()
            )
            + f"; moved {size(report.moved)}, {size(report.stayed)} not on its planned node"
        )
    return "\n".join(lines)


# -- the running engine ----------------------------------------------------------------------------


class ReadMeter:
    """The bytes of expert weights each node's pool reads, per MoE layer call: how even the nodes' work is.

    A call for one token is that token's share of one layer; a decoded token is n_layers such calls in a row.
    The bytes are the rows each pool's tasks computed (ExpertPartition.token_bytes), not a hardware count."""

    def __init__(self, nodes: Iterable[int], n_layers: int):
        self.nodes = tuple(nodes)
        self.n_layers = max(n_layers, 1)
        self.one_token: list[np.ndarray] = []  # (n_nodes,) bytes, one per one-token call
        self.batch = np.zeros(len(self.nodes), dtype=np.int64)  # bytes read by calls over several tokens

    def add(self, one_token: bool, read: dict[int, int]) -> None:
        row = np.array([read[node] for node in self.nodes], dtype=np.int64)
        if one_token:
            self.one_token.append(row)
        else:
            self.batch += row

    def per_token(self) -> np.ndarray:
        """(n_tokens, n_nodes) bytes each node read for each decoded token (whole tokens only)."""
        n_tokens = len(self.one_token) // self.n_layers
        if not n_tokens:
            return np.zeros((0, len(self.nodes)), dtype=np.int64)
        calls = np.stack(self.one_token[: n_tokens * self.n_layers])  # (n_tokens * n_layers, n_nodes)
        return calls.reshape(n_tokens, self.n_layers, -1).sum(axis=1)

    def as_dict(self) -> dict:
        tokens = self.per_token()
        ratio = tokens.max(axis=1) / np.maximum(tokens.mean(axis=1), 1) if len(tokens) else np.zeros(0)
        return {
            "tokens": len(tokens),
            "nodes": [
                {
                    "node": node,
                    "read_per_token": float(tokens[:, i].mean()) if len(tokens) else 0.0,
                    "read_batches": int(self.batch[i]),
                }
                for i, node in enumerate(self.nodes)
            ],
            # per decoded token, the busiest node's bytes over the nodes' mean: 1 is perfectly even
            "max_over_mean": {
                "mean": float(ratio.mean()) if len(ratio) else None,
                "worst": float(ratio.max()) if len(ratio) else None,
            },
        }


def _one_token(inputs: list[np.ndarray]) -> bool:
    """A decoded token's call: every expert's input is the same one row (MoE.__call__'s decode path)."""
    return bool(inputs) and len(inputs[0]) == 1 and all(x is inputs[0] for x in inputs)


class NodeDispatch:
    """What the NUMA dispatches share: one address space, so a layer's input and output need no exchange."""

    def layer_input(self, x: np.ndarray) -> np.ndarray:
        return x

    def combine(self, routed: np.ndarray) -> np.ndarray:
        return routed


@dataclass
class ExpertDispatch(NodeDispatch):
    """--numa shard: each chosen expert runs whole on the pool of the node that holds it, all at once."""

    layer: int
    placement: Placement
    pools: NodePools
    meter: ReadMeter | None = None

    def run(self, moe, experts: list[int], inputs: list[np.ndarray]) -> list[np.ndarray]:
        futures = [
            self.pools.submit(self.placement.node_of(self.layer, e), moe.run_expert, e, xe)
            for e, xe in zip(experts, inputs, strict=True)
        ]
        if self.meter is not None:
            self.meter.add(_one_token(inputs), self.placement.partition.token_bytes(self.layer, experts))
        return [f.result() for f in futures]


@dataclass
class SplitDispatch(NodeDispatch):
    """--numa split: every node computes its rows of every chosen expert, from its own memory, in two phases.

        1. h[:, ff_k] = silu(gate[ff_k] x) * up[ff_k] x     node k's rows of the intermediate features
        2. y[:, out_k] = down[out_k] h                       node k's rows of the output, from the whole h

    h and y are ordinary arrays every node's threads write their own columns of (one address space: nothing
    is copied between the phases). A node's rows are cut further, one task per thread of its pool, so a node
    runs as many tasks at once as it has CPUs; that is 2 x n_threads hand-offs a layer, however many experts
    are chosen. Each element of h and y is computed as MoE.run_expert computes it, so the result is the same.
    """

    layer: int
    placement: Placement
    pools: NodePools
    meter: ReadMeter | None = None
    min_rows: int = 32  # rows per task at the least: a smaller task costs more to hand off than it computes

    def __post_init__(self):
        p = self.placement.partition
        self.ff_tasks: list[tuple[int, range]] = []
        self.out_tasks: list[tuple[int, range]] = []
        for node in p.workers:
            ff, out = p.share(self.layer, 0, node)
            self.ff_tasks += [(node, r) for r in self._parts(node, ff)]
            self.out_tasks += [(node, r) for r in self._parts(node, out)]
        self.n_ff, self.n_embd = p.layers[self.layer].n_ff, p.layers[self.layer].n_embd

    def _parts(self, node: int, rows: range) -> list[range]:
        n = max(1, min(self.pools.threads(node), len(rows) // self.min_rows))
        cuts = [rows.start + k * len(rows) // n for k in range(n + 1)]
        return [range(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]

    def run(self, moe, experts: list[int], inputs: list[np.ndarray]) -> list[np.ndarray]:
        h = [np.empty((len(xe), self.n_ff), dtype=xe.dtype) for xe in inputs]  # (n_routed, n_ff_exp) each
        y = [np.empty((len(xe), self.n_embd), dtype=xe.dtype) for xe in inputs]  # (n_routed, n_embd) each
        _wait([self.pools.submit(node, _gate_up, moe, experts, ff, inputs, h) for node, ff in self.ff_tasks])
        _wait([self.pools.submit(node, _down, moe, experts, out, h, y) for node, out in self.out_tasks])
        if self.meter is not None:
            self.meter.add(_one_token(inputs), self.placement.partition.token_bytes(self.layer, experts))
        return y


def _gate_up(moe, experts: list[int], ff: range, inputs: list[np.ndarray], h: list[np.ndarray]) -> None:
    for e, xe, he in zip(experts, inputs, h, strict=True):
        moe.gate_up_rows(e, ff, xe, he)


def _down(moe, experts: list[int], out: range, h: list[np.ndarray], y: list[np.ndarray]) -> None:
    for e, he, ye in zip(experts, h, y, strict=True):
        moe.down_rows(e, out, he, ye)


def _wait(futures: list[Future]) -> None:
    """Every task's end (a barrier between the phases); the first task error is raised after all have ended."""
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


class NumaRuntime:
    """The --numa mode of one command: thread spreading before the model loads, then (shard, split)
    placement and expert dispatch once it is loaded. off does nothing at all."""

    def __init__(self, mode: str, system: SystemInfo, requested: Iterable[int] | None = None):
        if mode not in NUMA_MODES:
            raise NumaError(f"--numa {mode!r}: expected one of {', '.join(NUMA_MODES)}")
        self.mode = mode
        self.nodes = choose_nodes(system, requested) if mode != "off" or requested is not None else ()
        self.cpus = node_cpus(system, self.nodes)
        self.pools: NodePools | None = None
        self.report: PlacementReport | None = None
        self.meter: ReadMeter | None = None
        if mode == "distribute":
            import numba

            spread_threads(system, self.nodes, numba.config.NUMBA_NUM_THREADS)
        elif mode in PLACING_MODES:
            self.pools = NodePools(self.cpus)

    def attach(self, gguf_file: GGUFFile, model=None, dispatch: bool | None = None) -> str | None:
        """Place the model's pages and route its experts to their nodes (shard, split); returns the warning
        line, if the kernel refused anything. `model` is a refengine.arch DecoderModel, or None to place only.

        dispatch: run the experts on the nodes' pools. By default only when more than one node computes:
        on one node the calling thread is already local to every page, and a pool would only add its
        hand-offs (measured on this 2-core machine, see docs/numa.md)."""
        if self.mode not in PLACING_MODES:
            return None
        placement = Placement.for_mode(self.mode, gguf_file, self.cpus)
        with ModelPages(gguf_file) as pages:
            self.report = place(pages, placement, self.pools)
        if dispatch is None:
            dispatch = len(self.pools.nodes) > 1
        blocks = model.moe_blocks() if dispatch and model is not None else []
        if blocks:
            self.meter = ReadMeter(placement.expert_nodes, len(blocks))
        kind = SplitDispatch if self.mode == "split" else ExpertDispatch
        for il, block in blocks:
            block.dispatch = kind(il, placement, self.pools, self.meter)
        return self.report.warning()

    def as_dict(self) -> dict:
        """What --json reports of this run's placement: bytes placed per node, and bytes each pool read."""
        return {
            "mode": self.mode,
            "nodes": list(self.nodes),
            "placement": None if self.report is None else self.report.as_dict(),
            "reads": None if self.meter is None else self.meter.as_dict(),
        }

    def close(self) -> None:
        if self.pools is not None:
            self.pools.close()


def warn(line: str | None) -> None:
    if line:
        print(f"refengine: warning: {line}", file=sys.stderr)
