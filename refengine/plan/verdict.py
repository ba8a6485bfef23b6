"""What this process may use (room), where each node's share lands (--numa, --hosts), and the verdict with
the fixes in the user's terms (refengine.plan's docstring)."""

from __future__ import annotations

import errno
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from refengine.buffers import N_UBATCH
from refengine.errors import RefengineError
from refengine.gguf import SPLIT_PATTERN, GGUFError, GGUFFile, open_gguf
from refengine.plan.sizing import (
    ADDRESS_SPACE_BASE,
    ADDRESS_SPACE_PER_THREAD,
    ModelShape,
    Needs,
    PlanError,
    Sizer,
    assign_experts,
    expert_units,
    size,
    weight_bytes,
)
from refengine.system import Node, SystemInfo, format_ids

NUMA_MODES = ("off", "distribute", "shard", "split")
VERDICTS = ("fits", "pages_from_disk", "does_not_fit")
PAGING = "will be read from disk again as they are used, and speed will be bound by the disk"


class DoesNotFit(RefengineError):
    """The plan's verdict is does_not_fit: the run would be killed or fail to map. `refengine generate` exits 3."""


@dataclass(frozen=True)
class Room:
    """What this process may fill, and what sets that bound, as the user would say it."""

    bytes: int
    limiter: str  # "nodes" (the allowed nodes), "machine" (MemAvailable) or "cgroup"
    where: str  # "node 1", "nodes 0-3", "this machine", "the cgroup"
    clause: str  # "numactl -m 1 confines this process to node 1 (251 GiB available)"
    lift: tuple[str, ...] = ()  # what removes a node confinement ("drop -m 1", ...)
    lifted: int = 0  # the room once it is removed
    free: int | None = None  # of `bytes`, what is free now, without evicting page cache (None: unknown)


@dataclass(frozen=True)
class NodeShare:
    """What one node holds under the chosen placement, and what it has."""

    node: int
    weights: int
    buffers: int  # anonymous: KV cache, activations, runtime
    available: int
    experts: int  # routed experts placed here (shard)

    @property
    def total(self) -> int:
        return self.weights + self.buffers


@dataclass(frozen=True)
class HostShare:
    """One host's part when the model runs on several (plan --hosts N): what it holds, and its verdict."""

    host: int
    weights: int  # the dense part and its experts, file-backed
    routed_experts: int  # of which its experts
    anon: int  # KV cache, activations, runtime: every host runs the dense part for every token
    verdict: str
    message: str


@dataclass(frozen=True)
class Plan:
    model: str
    architecture: str
    n_splits: int
    n_ctx: int
    n_batch: int
    numa: str
    itemsize: int
    needs: Needs
    room: Room | None  # None when the system's memory is unknown
    nodes: tuple[NodeShare, ...]
    system: SystemInfo
    verdict: str  # one of VERDICTS
    reasons: tuple[str, ...]
    actions: tuple[str, ...]
    notes: tuple[str, ...]
    hosts: tuple[HostShare, ...] = ()  # plan --hosts N: every host's share and verdict (this plan is the worst's)

    def message(self) -> str:
        """The verdict in one line: why, then what fixes it."""
        text = "; ".join(self.reasons)
        return f"{text}: {_either(self.actions)}" if self.actions else text

    def as_dict(self) -> dict:
        n = self.needs
        return {
            "model": self.model,
            "architecture": self.architecture,
            "splits": self.n_splits,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "numa": self.numa,
            "dtype": f"float{8 * self.itemsize}",
            "needs": {
                "weights": {**n.weights, "total": n.weights_total},
                "mapping": n.mapping,
                "kv_cache": n.kv_cache,
                "activations": n.activations,
                "runtime": n.runtime,
                "anon": n.anon,
                "address_space": n.address_space,
            },
            "room": None
            if self.room is None
            else {"bytes": self.room.bytes, "limited_by": self.room.limiter, "where": self.room.where},
            "nodes": [
                {
                    "node": s.node,
                    "weights": s.weights,
                    "buffers": s.buffers,
                    "total": s.total,
                    "available": s.available,
                    "experts": s.experts,
                }
                for s in self.nodes
            ],
            "system": self.system.as_dict(),
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "actions": list(self.actions),
            "notes": list(self.notes),
            "message": self.message(),
            "hosts": [asdict(h) for h in self.hosts],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def plan(
    gguf_file: GGUFFile,
    system: SystemInfo,
    n_ctx: int,
    numa: str = "off",
    itemsize: int = 4,
    n_batch: int | None = None,
    hosts: int = 1,
) -> Plan:
    """Size the model at n_ctx, place it on the nodes for `numa`, and judge it against `system`.

    hosts > 1: the model run by that many MPI ranks, one a host, each holding the dense part and a
    contiguous run of every layer's experts (refengine.distributed): each host is judged with its share
    against `system` (the hosts are alike), and the plan is the worst host's, with every host's verdict."""
    if hosts > 1:
        return _plan_hosts(gguf_file, system, n_ctx, numa, itemsize, n_batch, hosts)
    return _plan_one(gguf_file, system, n_ctx, numa, itemsize, n_batch)


def _plan_hosts(gguf_file, system, n_ctx, numa, itemsize, n_batch, hosts: int) -> Plan:
    from refengine.partition import ExpertPartition  # imports this module

    held = ExpertPartition.contiguous(gguf_file, tuple(range(hosts))).worker_bytes()
    plans = [_plan_one(gguf_file, system, n_ctx, numa, itemsize, n_batch, routed=held[h]) for h in range(hosts)]
    worst = max(range(hosts), key=lambda h: (VERDICTS.index(plans[h].verdict), plans[h].needs.weights_total))
    shares = tuple(
        HostShare(h, p.needs.weights_total, p.needs.weights["routed_experts"], p.needs.anon, p.verdict, p.message())
        for h, p in enumerate(plans)
    )
    return replace(plans[worst], hosts=shares)


def _plan_one(
    gguf_file: GGUFFile,
    system: SystemInfo,
    n_ctx: int,
    numa: str,
    itemsize: int,
    n_batch: int | None,
    routed: int | None = None,
) -> Plan:
    """One process's plan; `routed`, if given, the bytes of routed experts it holds (its share of them)."""
    if numa not in NUMA_MODES:
        raise PlanError(f"--numa {numa!r}: expected one of {', '.join(NUMA_MODES)}")
    if n_ctx < 1:
        raise PlanError(f"--ctx must be at least 1, got {n_ctx}")
    sizer = Sizer(ModelShape.from_gguf(gguf_file), itemsize, n_batch)
    n_threads = len(system.cpus_allowed or ()) or sum(len(n.cpus) for n in system.nodes) or 1
    threads_reserve = ADDRESS_SPACE_BASE + ADDRESS_SPACE_PER_THREAD * n_threads
    weights = weight_bytes(gguf_file)
    if routed is not None:
        weights["routed_experts"] = routed
    needs = Needs(
        weights=weights,
        mapping=gguf_file.file_size,
        kv_cache=sizer.kv_cache(n_ctx),
        activations=sizer.activations(n_ctx),
        runtime=sizer.runtime,
        address_space=gguf_file.file_size + sizer.anon(n_ctx) + threads_reserve,
    )
    units = expert_units(gguf_file) if numa in ("shard", "split") else {}
    shares = place(system, numa, needs, units, gguf_file)
    room = measure_room(system)
    verdict, reasons, actions = judge(needs, sizer, n_ctx, system, numa, shares, room)
    n_batch = sizer.batch(n_ctx)
    return Plan(
        model=str(gguf_file.path),
        architecture=sizer.shape.arch,
        n_splits=len(gguf_file.splits),
        n_ctx=n_ctx,
        n_batch=n_batch,
        numa=numa,
        itemsize=itemsize,
        needs=needs,
        room=room,
        nodes=shares,
        system=system,
        verdict=verdict,
        reasons=tuple(reasons),
        actions=tuple(actions),
        notes=tuple(_notes(system, numa, n_batch, itemsize)),
    )


def open_model(path: Path, system: SystemInfo) -> GGUFFile:
    """open_gguf, except that a mapping RLIMIT_AS refuses is the does_not_fit it means, not a bad file."""
    try:
        return open_gguf(path)
    except GGUFError as e:
        if system.rlimit_as is None or os.strerror(errno.ENOMEM) not in str(e):
            raise
        raise DoesNotFit(
            f"{path.name}: ulimit -v limits this process to {size(system.rlimit_as)} of address space, "
            f"too little to map the model's {size(_files_size(path))}: raise it: ulimit -v unlimited"
        ) from None


def _files_size(path: Path) -> int:
    """The bytes of a model's file, or of every split of it."""
    match = SPLIT_PATTERN.match(path.name)
    if match is None:
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.parent.glob(f"{match['prefix']}-*-of-{match['count']}.gguf"))


def place(
    system: SystemInfo, numa: str, needs: Needs, units: dict[tuple[int, int], int], gguf_file: GGUFFile | None = None
) -> tuple[NodeShare, ...]:
    """Each allowed node's share of the weights and buffers under `numa` (see the module doc). units: the
    routed experts' bytes (expert_units) for shard and split; split also reads the experts' rows from gguf_file."""
    nodes = system.allowed_nodes()
    if not nodes:
        return ()
    threads = {n.id: len(system.cpus_on(n)) for n in nodes}
    workers = [n for n in nodes if threads[n.id]] or list(nodes)
    home = workers[0].id  # the main thread's node: it allocates and first writes the buffers
    weights, buffers = needs.weights_total, needs.kv_cache + needs.activations
    w: dict[int, int] = defaultdict(int)
    b: dict[int, int] = defaultdict(int)
    experts: dict[int, int] = defaultdict(int)
    b[home] += needs.runtime
    every = {n.id: 1 for n in nodes}
    policy = system.policy
    if numa == "split" and gguf_file is not None:
        from refengine.partition import ExpertPartition  # imports this module

        held = ExpertPartition.by_rows(gguf_file, tuple(n.id for n in workers)).worker_bytes()
        for node, nbytes in held.items():
            w[node] += nbytes
            experts[node] = len(units)  # its rows of every expert
        _spread(w, weights - sum(held.values()), every)
        _spread(b, buffers, every)
    elif numa == "shard":
        for key, node in assign_experts(units, [n.id for n in workers]).items():
            w[node] += units[key]
            experts[node] += 1
        _spread(w, weights - sum(units.values()), every)
        _spread(b, buffers, every)
    elif policy.mode in ("interleave", "weighted interleave"):
        spread = {n.id: 1 for n in nodes if n.id in policy.nodes} or every
        _spread(w, weights, spread)
        _spread(b, buffers, spread)
    elif policy.mode == "prefer" and policy.nodes & every.keys():
        preferred = min(policy.nodes & every.keys())
        w[preferred] += weights
        b[preferred] += buffers
    else:  # first touch by the worker threads, which are spread as the CPUs we may use
        _spread(w, weights, {n.id: threads[n.id] or 1 for n in workers})
        b[home] += buffers
    return tuple(NodeShare(n.id, w[n.id], b[n.id], n.available, experts[n.id]) for n in nodes)


def _spread(into: dict[int, int], total: int, weights: dict[int, int]) -> None:
    """Add `total` bytes over the nodes in proportion to `weights`, exactly (remainders to the first)."""
    whole = sum(weights.values())
    given = 0
    for node, weight in weights.items():
        part = total * weight // whole
        into[node] += part
        given += part
    into[next(iter(weights))] += total - given


def measure_room(system: SystemInfo) -> Room | None:
    """The tightest of: the allowed nodes' available memory, MemAvailable, the cgroup limit."""
    candidates = []
    allowed = system.allowed_nodes()
    if system.numa_dirs or allowed:
        available = sum(n.available for n in allowed)
        where = _where(system, allowed)
        confined = _confinement(system)
        if confined is None:
            free = sum(n.free for n in allowed)
            candidates.append(Room(available, "nodes", where, f"{where} has {size(available)} available", free=free))
        else:
            cause, lift, freed = confined
            lifted = min(sum(n.available for n in freed), system.mem_available or sum(n.available for n in freed))
            clause = f"{cause} confines this process to {where} ({size(available)} available)"
            candidates.append(Room(available, "nodes", where, clause, lift, lifted, sum(n.free for n in allowed)))
    if system.mem_available is not None:
        clause = f"this machine has {size(system.mem_available)} available (MemAvailable)"
        candidates.append(Room(system.mem_available, "machine", "this machine", clause, free=system.mem_free))
    if system.cgroup is not None:
        # The cgroup's file pages (ours and whatever ran before) are reclaimed within its limit; what else
        # it holds is taken (system.CgroupLimit).
        c = system.cgroup
        clause = f"the cgroup memory limit is {size(c.limit)} ({c.file}), page cache included"
        if c.taken:
            clause += f", of which {size(c.taken)} is taken by memory other than reclaimable file pages"
        candidates.append(Room(c.room, "cgroup", "the cgroup", clause))
    return min(candidates, key=lambda r: r.bytes, default=None)


def _where(system: SystemInfo, nodes: tuple[Node, ...]) -> str:
    if not system.numa_dirs or len(system.memory_nodes) == 1:
        return "this machine"
    if not nodes:
        return "no node with memory"
    ids = [n.id for n in nodes]
    return f"node {ids[0]}" if len(ids) == 1 else f"nodes {format_ids(ids)}"


def _confinement(system: SystemInfo) -> tuple[str, tuple[str, ...], tuple[Node, ...]] | None:
    """What narrows the allowed nodes (numactl -m, a cpuset), what removes it, and the nodes then allowed."""
    every = system.memory_nodes
    allowed = {n.id for n in system.allowed_nodes()}
    if not system.numa_dirs or allowed == {n.id for n in every}:
        return None
    in_cpuset = tuple(n for n in every if system.mems_allowed is None or n.id in system.mems_allowed)
    if system.policy.mode == "bind" and allowed != {n.id for n in in_cpuset}:
        ids = format_ids(system.policy.nodes)
        lift = (f"drop -m {ids}", "use numactl --interleave=all instead", "run without numactl, with --numa shard")
        return f"numactl -m {ids}", lift, in_cpuset
    cause = f"the cpuset (Mems_allowed_list {format_ids(system.mems_allowed or ())})"
    return cause, ("allow every node in the cpuset (docker run --cpuset-mems, systemd AllowedMemoryNodes=)",), every


def judge(
    needs: Needs,
    sizer: Sizer,
    n_ctx: int,
    system: SystemInfo,
    numa: str,
    shares: tuple[NodeShare, ...],
    room: Room | None,
) -> tuple[str, list[str], list[str]]:
    """The verdict, its reasons and the actions that fix it, checked in the order the failures would bite."""
    if system.rlimit_as is not None and needs.address_space > system.rlimit_as:
        reason = (
            f"ulimit -v limits this process to {size(system.rlimit_as)} of address space; mapping the model "
            f"({size(needs.mapping)}) with its buffers and threads needs {size(needs.address_space)}"
        )
        return (
            "does_not_fit",
            [reason],
            [f"raise it: ulimit -v unlimited (or ulimit -v {-(-needs.address_space // 1024)}, in KiB)"],
        )
    if room is None:
        return "fits", ["the memory size is unknown (no proc/meminfo): nothing was checked"], []
    anon = needs.anon
    buffers = f"the buffers need {size(anon)} ({_buffers(needs, n_ctx)})"
    if anon > room.bytes:
        return "does_not_fit", [f"{room.clause}; {buffers}"], _anon_fixes(sizer, n_ctx, anon, room.bytes, room)
    if system.overcommit_memory == 2 and system.commit_limit is not None and system.committed_as is not None:
        headroom = max(system.commit_limit - system.committed_as, 0)
        if anon > headroom:
            reason = f"vm.overcommit_memory is 2 (strict) and leaves {size(headroom)} under CommitLimit; {buffers}"
            fixes = _anon_fixes(sizer, n_ctx, anon, headroom, None) + ["set vm.overcommit_memory=0"]
            return "does_not_fit", [reason], fixes
    weights = needs.weights_total
    need = weights + anon
    if need > room.bytes:
        # File pages are dropped under pressure rather than killed, but a model that cannot be
        # resident is read from disk on every token: hundreds of times slower, so it does not fit.
        fixes = _weight_fixes(system, room, need)
        if weights > room.bytes:
            what = f"the weights need {size(weights)}"
        else:
            what = f"the weights ({size(weights)}) and buffers ({_buffers(needs, n_ctx)}) need {size(need)}"
            largest = sizer.largest_ctx(n_ctx, room.bytes - weights)  # the context whose buffers fit beside them
            fixes = ([f"lower --ctx to {largest} or less"] if largest else []) + fixes
        reason = f"{room.clause}; {what}"
        return "does_not_fit", [reason], fixes
    if numa in ("shard", "split"):
        for share in shares:
            if share.total > share.available:
                held = f"{share.experts} experts" if numa == "shard" else "its rows of every expert"
                reason = (
                    f"with --numa {numa} node {share.node} holds {size(share.total)} ({held} and "
                    f"its share of the rest) but has {size(share.available)} available, so its experts {PAGING}"
                )
                return "pages_from_disk", [reason], ["use --numa distribute, which lets the kernel put pages elsewhere"]
    if room.free is not None and need > room.free:
        reason = (
            f"it fits in the {size(room.bytes)} available on {room.where} only by evicting "
            f"{size(need - room.free)} of page cache; until then the weights {PAGING}"
        )
        return "pages_from_disk", [reason], ["free page cache first (sync; echo 1 > /proc/sys/vm/drop_caches)"]
    reason = (
        f"the weights ({size(needs.weights_total)}) and buffers ({_buffers(needs, n_ctx)}) "
        f"fit in the {size(room.bytes)} available to this process on {room.where}"
    )
    return "fits", [reason], []


def _buffers(needs: Needs, n_ctx: int) -> str:
    """The anonymous buffers by what they hold: the KV cache is what grows with the context."""
    return (
        f"KV cache at --ctx {n_ctx} {size(needs.kv_cache)}, activations {size(needs.activations)}, "
        f"runtime {size(needs.runtime)}"
    )


def _anon_fixes(sizer: Sizer, n_ctx: int, anon: int, room_bytes: int, room: Room | None) -> list[str]:
    fixes = []
    largest = sizer.largest_ctx(n_ctx, room_bytes)
    if largest:
        fixes.append(f"lower --ctx to {largest} or less")
    if room is not None and room.lift and room.lifted >= anon:
        fixes.append(room.lift[0])
    if room is not None and room.limiter == "cgroup":
        fixes.append(f"raise the cgroup memory limit above {size(anon)} (docker run --memory, systemd MemoryMax=)")
    return fixes or [f"free {size(anon - room_bytes)} of memory"]


def _weight_fixes(system: SystemInfo, room: Room, need: int) -> list[str]:
    if room.lift and room.lifted >= need:
        return list(room.lift)
    if room.limiter == "cgroup":
        return [f"raise the cgroup memory limit to at least {size(need)} (docker run --memory, systemd MemoryMax=)"]
    fixes = []
    held = sum(n.total - n.available for n in system.allowed_nodes()) - system.hugepages_bytes
    if held > 0 and room.bytes + held >= need:
        fixes.append(f"stop what holds the other {size(held)} of memory")
    if system.hugepages_bytes and room.bytes + system.hugepages_bytes >= need:
        fixes.append(f"release the {size(system.hugepages_bytes)} huge page pool (sysctl vm.nr_hugepages=0)")
    return fixes + ["use a smaller quantization of the model"]


def _notes(system: SystemInfo, numa: str, n_batch: int, itemsize: int) -> list[str]:
    notes = [
        f"activations are sized for one step of {n_batch} tokens (prompts are evaluated in micro-batches "
        f"of {N_UBATCH}), in float{8 * itemsize}"
    ]
    if system.hugepages_bytes:
        notes.append(
            f"{size(system.hugepages_bytes)} is reserved as huge pages (vm.nr_hugepages): "
            "neither the page cache nor refengine's buffers can use it"
        )
    if system.numa_balancing:
        effect = (
            f"which undoes --numa {numa}'s placement: sysctl kernel.numa_balancing=0 turns it off"
            if numa in ("shard", "split")
            else "so pages may move between nodes during the run"
        )
        notes.append(
            f"kernel.numa_balancing is {system.numa_balancing}: the kernel migrates pages toward the threads "
            f"that touch them, {effect}"
        )
    return notes


def _either(actions) -> str:
    """["a", "b", "c"] -> "a, b, or c"."""
    actions = list(actions)
    if len(actions) <= 2:
        return " or ".join(actions)
    return ", ".join(actions[:-1]) + ", or " + actions[-1]
