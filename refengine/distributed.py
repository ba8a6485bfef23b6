"""Several hosts with MPI: the routed experts of every MoE layer spread over the ranks of an MPI world.

`mpirun -np N refengine generate|logits|perplexity|bench model ...` runs N copies of the command. Each
finds itself in an MPI world (World.join: the launcher's environment, then mpi4py's COMM_WORLD) and:

    - maps the whole model but holds and computes only its experts: each MoE layer's experts in one
      contiguous run per rank (partition.ExpertPartition.contiguous), so a rank's bytes of each expert
      tensor are one run of the file, and each host's page cache holds only its share (populated with
      posix_fadvise WILLNEED over exactly its ranges, so no readahead strays into another rank's);
    - keeps the dense part (embeddings, attention, dense FFN, shared experts, routers) and runs it, as
      one process would;
    - in every MoE layer, takes rank 0's input (one broadcast, so that every rank routes the same
      tokens to the same experts whatever its own rounding), computes its chosen experts' weighted
      outputs, and sums the ranks' partial outputs with one allreduce; then adds the shared experts.

Rank 0 tokenizes, samples and prints: its model is a LeaderModel, whose forward first tells the other
ranks what to evaluate (a command broadcast: the tokens, the cache and its position). The others run
follow(): they evaluate what they are told until rank 0 says stop, print nothing, and exit with rank
0's status. Each collective is non-blocking and polled (MPI_Test, then short sleeps), so that a rank
waiting for the others yields its CPU to them (several ranks on one host) and signals are seen.

Ctrl-C: the launcher (mpiexec) passes SIGINT to every rank. Rank 0 takes it at the end of the step it
is in (a step's collectives must complete on every rank), generation stops as in one process, and rank
0 tells the others to stop with its exit status (130, 143 for SIGTERM). The other ranks only note a
signal; one that comes to them alone is passed on to rank 0 at the end of the step, which stops all.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from refengine.errors import RefengineError
from refengine.partition import ExpertPartition

# What launchers set in each rank's environment: Open MPI's mpirun, MPICH's hydra (PMI), MVAPICH.
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SPIN_TESTS = 2000  # MPI_Test calls before a waiting rank starts to sleep between them
POLL_SECONDS = 50e-6  # the sleep between tests after that: a follower waits for commands for as long as rank 0 samples
TAG_SIGNAL = 77  # a follower's point-to-point note to rank 0: a stop signal came to it alone
FORWARD, STOP, REPORT = 1, 2, 3  # commands
CACHES_KEPT = 4  # a follower keeps the KV caches of the last few caches rank 0 used
EVICT_TRIES = 20  # rounds of DONTNEED over other ranks' expert pages, while readahead still brings some in


class DistributedError(RefengineError):
    """The MPI world cannot be used as asked (no mpi4py, an option that does not combine with it)."""


def world_size_from_env() -> int:
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


@dataclass
class World:
    """This process's place in the MPI world, and the collectives the engine uses, each polled."""

    comm: object  # mpi4py.MPI.Comm
    rank: int
    size: int

    @classmethod
    def join(cls) -> World | None:
        """The MPI world this process was started in by mpirun/mpiexec with more than one rank, else None."""
        n = world_size_from_env()
        if n <= 1:
            return None
        try:
            from mpi4py import MPI
        except ImportError:
            raise DistributedError(
                f"started by an MPI launcher as one of {n} ranks, but mpi4py is not installed: "
                "pip install 'refengine[mpi]'"
            ) from None
        comm = MPI.COMM_WORLD
        return cls(comm, comm.Get_rank(), comm.Get_size())

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def wait(self, request) -> None:
        """Until `request` completes: MPI_Test in a loop, sleeping between tests once it has taken a while."""
        tests = 0
        while not request.Test():
            tests += 1
            if tests > SPIN_TESTS:
                time.sleep(POLL_SECONDS)

    def bcast(self, array: np.ndarray) -> np.ndarray:
        """Rank 0's `array` into every rank's (same shape and dtype everywhere)."""
        self.wait(self.comm.Ibcast(array, root=0))
        return array

    def allreduce(self, array: np.ndarray) -> np.ndarray:
        """The sum over the ranks of `array`, in every rank."""
        from mpi4py import MPI

        total = np.empty_like(array)
        self.wait(self.comm.Iallreduce(array, total, op=MPI.SUM))
        return total

    def gather(self, obj) -> list | None:
        """Every rank's `obj` at rank 0 (None elsewhere): small reports at the end of a run."""
        return self.comm.gather(obj, root=0)


# -- the experts of one rank ------------------------------------------------------------------------


@dataclass
class RankDispatch:
    """One MoE layer's experts under MPI: this rank's own, computed here; the others' left to their ranks.

    MoE.__call__ calls layer_input before routing (every rank takes rank 0's input), run for the chosen
    experts, and combine on the weighted sum of their outputs (one allreduce: the ranks' partial sums)."""

    layer: int
    partition: ExpertPartition
    world: World

    def layer_input(self, x: np.ndarray) -> np.ndarray:
        return self.world.bcast(np.ascontiguousarray(x))  # (n_tok, n_embd)

    def run(self, moe, experts: list[int], inputs: list[np.ndarray]) -> list[np.ndarray]:
        outputs = []
        for e, xe in zip(experts, inputs, strict=True):
            if self.partition.owner(self.layer, e) == self.world.rank:
                outputs.append(moe.run_expert(e, xe))  # (n_routed, n_embd)
            else:  # another rank's: adds exactly nothing here, its rank adds it to the sum
                outputs.append(np.broadcast_to(np.zeros(moe.n_embd, dtype=xe.dtype), (len(xe), moe.n_embd)))
        return outputs

    def combine(self, routed: np.ndarray) -> np.ndarray:
        return self.world.allreduce(np.ascontiguousarray(routed))  # (n_tok, n_embd)


def place_share(gguf_file, world: World) -> ExpertPartition:
    """This rank's share of the experts, its pages brought in, before the model is loaded.

    Opening the model read its header through the mapping, and the kernel read ahead of it (read_ahead_kb,
    8 MiB on this machine's disk). On a host where no other rank maps the same file, the pages of other
    ranks' experts that came in so are dropped again, before loading the model faults anything near them
    into this process (a mapped page cannot be dropped), so that the host's page cache holds its share only."""
    partition = ExpertPartition.contiguous(gguf_file, tuple(range(world.size)))
    stat = os.stat(gguf_file.splits[0])
    here = (socket.gethostname(), stat.st_dev, stat.st_ino)
    if world.comm.allgather(here).count(here) == 1:
        evict_others(gguf_file, partition, world.rank)
    populate(gguf_file, partition, world.rank)
    return partition


def share_ranges(
    gguf_file, partition: ExpertPartition, rank: int, experts_only: bool = False
) -> list[tuple[int, int, int]]:
    """(split, first byte, end byte) of every tensor range this rank reads: whole dense tensors (unless
    experts_only), and its experts' run of each expert tensor."""
    splits = {str(p): i for i, p in enumerate(gguf_file.splits)}
    ranges = []
    for t in gguf_file.tensors.values():
        if t.nbytes == 0:
            continue
        split = splits[str(t.path)]
        parts = t.name.split(".")
        layer = int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else None
        if layer in partition.layers and parts[2] in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            owned = [e for e in range(t.shape[0]) if partition.owner(layer, e) == rank]
            if owned:
                step = t.nbytes // t.shape[0]
                ranges.append((split, t.offset + owned[0] * step, t.offset + (owned[-1] + 1) * step))
        elif not experts_only:
            ranges.append((split, t.offset, t.offset + t.nbytes))
    return ranges


def evict_others(gguf_file, partition: ExpertPartition, rank: int) -> None:
    """posix_fadvise(DONTNEED) over the whole pages of every other rank's experts: what readahead brought in
    of them is dropped (pages that a process maps, or that are dirty, the kernel keeps). Pages still being
    read (readahead is asynchronous) are locked and not dropped either, so this is repeated, a few
    milliseconds apart, until mincore finds none of them cached (or EVICT_TRIES have passed)."""
    from refengine.numa import Kernel

    page = os.sysconf("SC_PAGE_SIZE")
    ranges = [
        (split, -(-first // page) * page, end // page * page)  # whole pages only: ours stay
        for other in partition.workers
        if other != rank
        for split, first, end in share_ranges(gguf_file, partition, other, experts_only=True)
    ]
    ranges = [(split, start, stop) for split, start, stop in ranges if stop > start]
    views = [np.frombuffer(m, dtype=np.uint8) for m in gguf_file._maps]  # the model's mapping of each split
    fds = [os.open(path, os.O_RDONLY) for path in gguf_file.splits]
    try:
        for attempt in range(EVICT_TRIES):
            for split, start, stop in ranges:
                os.posix_fadvise(fds[split], start, stop - start, os.POSIX_FADV_DONTNEED)
            cached = any(
                Kernel.mincore(views[split].ctypes.data + start, stop - start).any() for split, start, stop in ranges
            )
            if not cached:
                return
            time.sleep(0.005 * (attempt + 1))
    finally:
        for fd in fds:
            os.close(fd)


def populate(gguf_file, partition: ExpertPartition, rank: int) -> None:
    """posix_fadvise(WILLNEED) over exactly the pages this rank reads: they are read in, in large requests,
    and later faults find them cached, so no fault's readahead reaches into another rank's experts."""
    page = os.sysconf("SC_PAGE_SIZE")
    fds = [os.open(path, os.O_RDONLY) for path in gguf_file.splits]
    try:
        for split, first, end in share_ranges(gguf_file, partition, rank):
            start = first // page * page
            try:
                os.posix_fadvise(fds[split], start, end - start, os.POSIX_FADV_WILLNEED)
            except OSError:
                return  # a file system without readahead: faults bring the pages in
    finally:
        for fd in fds:
            os.close(fd)


def residency_report(gguf_file, partition: ExpertPartition, rank: int) -> dict:
    """What this rank's host holds of the routed experts in its page cache (mincore, no I/O): its own
    experts' bytes, and other ranks' experts' bytes, which should be at most a page per tensor boundary."""
    from refengine.numa import Kernel, ModelPages

    page = os.sysconf("SC_PAGE_SIZE")
    report = {"rank": rank, "experts_share": 0, "experts_resident": 0, "other_experts_resident": 0, "boundaries": 0}
    with ModelPages(gguf_file) as pages:
        for split in range(len(pages.paths)):
            cached = Kernel.mincore(pages.address(split), len(pages.views[split]))
            previous_owner = None  # whether the unit before is one this rank reads (dense, or its experts)
            for unit in pages.units[split]:
                if unit.expert is None:
                    if previous_owner is False:
                        report["boundaries"] += 1
                    previous_owner = True
                    continue
                first, end = unit.start // page, -(-unit.end // page)
                edges = np.arange(first, end + 1, dtype=np.int64) * page
                edges[0], edges[-1] = unit.start, unit.end
                resident = int(np.diff(edges)[cached[first:end]].sum())  # this slice's bytes in cached pages
                mine = partition.owner(*unit.expert) == rank
                if mine:
                    report["experts_share"] += unit.end - unit.start
                    report["experts_resident"] += resident
                else:
                    report["other_experts_resident"] += resident
                if previous_owner is not None and mine != previous_owner:
                    report["boundaries"] += 1
                previous_owner = mine
    report["page"] = page
    return report


# -- rank 0 and the others --------------------------------------------------------------------------


class _Deferred:
    """SIGINT and SIGTERM noted rather than raised, for the length of a `with` block (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def note(self, signum, frame) -> None:
        self.received = self.received or signum

    def __enter__(self) -> _Deferred:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self.previous[signum] = signal.signal(signum, self.note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class LeaderModel:
    """Rank 0's model: every forward pass is first announced to the other ranks, which run the same one.

    A stop signal that arrives during a pass (or that another rank passes on) is raised when the pass
    has ended on every rank, through the handler the command installed (refengine.signals)."""

    def __init__(self, model, world: World):
        self.model = model
        self.world = world
        self.caches: dict[int, int] = {}  # id(cache) -> the key followers know it by
        self.signal: int | None = None  # the stop signal raised at the end of a pass, if any

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, tokens, cache, all_logits: bool = True, observer=None):
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        key = self.caches.setdefault(id(cache), len(self.caches) + 1)
        header = np.array([FORWARD, key, cache.n_ctx, cache.n_past, len(tokens), int(all_logits), 0, 0], np.int64)
        with _Deferred() as deferred:
            self.world.bcast(header)
            self.world.bcast(tokens)
            logits = self.model.forward(tokens, cache, all_logits, observer)
            signum = deferred.received or self._signal_from_another_rank()
        if signum is not None:
            self.signal = signum
            handler = signal.getsignal(signum)
            if callable(handler):
                handler(signum, None)  # refengine.signals: notes the signal and raises KeyboardInterrupt
            raise KeyboardInterrupt
        return logits

    def _signal_from_another_rank(self) -> int | None:
        from mpi4py import MPI

        status = MPI.Status()
        if not self.world.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_SIGNAL, status=status):
            return None
        note = np.empty(1, np.int64)
        self.world.comm.Recv(note, source=status.Get_source(), tag=TAG_SIGNAL)
        return int(note[0])

    def reports(self, gguf_file, partition: ExpertPartition) -> list[dict]:
        """Every rank's residency_report, gathered here (the others compute theirs when told)."""
        self.world.bcast(np.array([REPORT, 0, 0, 0, 0, 0, 0, 0], np.int64))
        return self.world.gather(residency_report(gguf_file, partition, self.world.rank))

    def stop(self, status: int) -> None:
        """Tell the other ranks to exit with `status`."""
        self.world.bcast(np.array([STOP, status, 0, 0, 0, 0, 0, 0], np.int64))


def follow(model, world: World, gguf_file, partition: ExpertPartition) -> int:
    """A rank other than 0: run every forward pass rank 0 announces, until it says stop; its exit status."""
    caches: OrderedDict[int, object] = OrderedDict()
    header = np.empty(8, np.int64)
    with _Deferred() as deferred:
        reported = False
        while True:
            world.bcast(header)
            if header[0] == STOP:
                return int(header[1])
            if header[0] == REPORT:
                world.gather(residency_report(gguf_file, partition, world.rank))
                continue
            key, n_ctx, n_past, n_tok, all_logits = (int(v) for v in header[1:6])
            tokens = world.bcast(np.empty(n_tok, np.int64))
            cache = caches.pop(key, None)
            if cache is None or cache.n_ctx != n_ctx:
                cache = model.new_cache(n_ctx)
            caches[key] = cache
            while len(caches) > CACHES_KEPT:
                caches.popitem(last=False)
            cache.n_past = n_past
            try:
                model.forward(tokens, cache, bool(all_logits))
            except RefengineError:
                pass  # rank 0 checks the same tokens the same way: it reports the error, and says stop
            if deferred.received and not reported:
                world.comm.Send(np.array([deferred.received], np.int64), dest=0, tag=TAG_SIGNAL)
                reported = True


def exit_status(leader: LeaderModel) -> int:
    """The status rank 0's command is ending with, from the exception in flight (if any): 0, 1 for an
    error, 128 + the signal's number for a stop signal (130 for Ctrl-C)."""
    error = sys.exc_info()[1]
    if error is None:
        return 0
    if isinstance(error, KeyboardInterrupt):
        return 128 + (leader.signal or signal.SIGINT)
    code = getattr(error, "exit_code", None)
    return code if isinstance(code, int) else 1


def start(session, world: World, partition: ExpertPartition, context) -> int | None:
    """Run `session` as this rank's part of the MPI world: each MoE block given this rank's experts; rank 0's
    model announcing each pass, the others following. Returns None on rank 0, which goes on with the
    command; on the others, once rank 0 has said stop, rank 0's exit status. `context` (a click.Context)
    runs rank 0's stop when the command ends, however it ends."""
    for il, block in session.model.moe_blocks():
        block.dispatch = RankDispatch(il, partition, world)
    if not world.leader:
        return follow(session.model, world, session.gguf, partition)
    leader = LeaderModel(session.model, world)
    session.model = leader
    context.meta["refengine.mpi"] = lambda: leader.reports(session.gguf, partition)  # for --json
    context.call_on_close(lambda: leader.stop(exit_status(leader)))
    return None
