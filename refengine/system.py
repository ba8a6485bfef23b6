"""What the machine lets this process use: memory, NUMA nodes and every limit on them, read live.

Every reading is a text file under one root, so tests and `refengine plan --sysroot DIR` can point
the root at a folder that mirrors the real paths:

    proc/meminfo                         MemTotal, MemAvailable, Cached, huge pages, CommitLimit
    proc/self/status                     Mems_allowed_list (the cpuset's nodes), Cpus_allowed_list
    proc/self/numa_maps                  the memory policy; its first line shows the task's own
                                         (`numactl -m 1` -> "bind:1", `--interleave=all` -> "interleave:0-1")
    proc/self/cgroup                     this process's cgroup: "0::/path" (v2), "N:memory:/path" (v1)
    proc/self/limits                     "Max address space": RLIMIT_AS, what `ulimit -v` sets
    proc/sys/kernel/numa_balancing       automatic NUMA page migration (0 off)
    proc/sys/vm/overcommit_memory        2 is strict: anonymous memory must fit under CommitLimit
    sys/devices/system/node/nodeN/       meminfo (MemTotal, MemFree, file LRU, slab) and cpulist
    sys/devices/system/cpu/online        the CPUs, when the kernel has no NUMA folders
    sys/fs/cgroup[/unified]/PATH/        cgroup v2, at PATH and each ancestor: the limits memory.max and
      memory.{max,high,current,stat}     memory.high, the usage memory.current, and memory.stat's file pages
                                         (active_file, inactive_file), which the kernel reclaims within them
    sys/fs/cgroup/memory/PATH/           cgroup v1, likewise: memory.limit_in_bytes, memory.usage_in_bytes and
      memory.{limit_in_bytes,...}        memory.stat (total_active_file, total_inactive_file)

`numactl -m` sets the memory policy; it does not change Mems_allowed_list, which is the cpuset's
(docker --cpuset-mems, systemd AllowedMemoryNodes=). Both bound where pages may go, so both are read.
RLIMIT_AS is read from proc/self/limits rather than with resource.getrlimit, so that a fixture can
set it and the live machine takes the same path.

A file that is missing or unreadable means "unknown" or "no limit" (None). A file that is there but
cannot be parsed is a SystemReadError naming it: guessing would give a wrong verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from refengine.errors import RefengineError

KIB = 1024
MAX_ID = 1 << 16  # beyond any CPU or node number the kernel allows (NR_CPUS is at most 8192)
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value; anything this large is none.
CGROUP_V1_UNLIMITED = 1 << 62
CGROUP_V2_MOUNTS = ("sys/fs/cgroup", "sys/fs/cgroup/unified")  # unified mode, then hybrid mode
CGROUP_V1_MOUNT = "sys/fs/cgroup/memory"
# The file pages on a cgroup's LRU lists, which reclaim drops (shmem, though counted in v2's "file", is not
# among them: it lives on the anonymous lists). v1's total_ fields include the descendants, as its usage does.
CGROUP_V2_FILE_PAGES = (("active_file", "inactive_file"),)
CGROUP_V1_FILE_PAGES = (("total_active_file", "total_inactive_file"), ("active_file", "inactive_file"))

_FIELD = re.compile(r"^(?:Node \d+ )?([^:]+):\s*(.*?)\s*$")  # "Node 0 MemFree:  123 kB" or "MemFree: 123 kB"
_AMOUNT = re.compile(r"^(\d+)( kB)?$")
_ID_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
# The policy as mpol_to_str prints it, after the mapping's address: mode[=flags][:nodes].
_POLICY = re.compile(
    r"^[0-9a-f]+ (default|local|prefer \(many\)|weighted interleave|prefer|bind|interleave)"
    r"(?:=[a-z|]+)?(?::(\S*))?(?: |$)"
)


class SystemReadError(RefengineError):
    """A system file that exists but does not read as the kernel writes it. The message names the file."""


@dataclass(frozen=True)
class Node:
    """One NUMA node: its memory in bytes and its CPUs."""

    id: int
    total: int  # MemTotal, including any huge page pool
    free: int  # MemFree
    # Free memory plus what the kernel drops under pressure (file page cache, reclaimable slab): the
    # node's share of MemAvailable, which the kernel does not report per node.
    available: int
    cpus: frozenset[int]


@dataclass(frozen=True)
class MemoryPolicy:
    """The task's memory policy, as /proc/self/numa_maps shows it."""

    mode: str  # default, local, prefer, bind, interleave, weighted interleave, prefer (many)
    nodes: frozenset[int]

    def __str__(self) -> str:
        return f"{self.mode}:{format_ids(self.nodes)}" if self.nodes else self.mode


@dataclass(frozen=True)
class CgroupLimit:
    """The tightest cgroup memory limit over this process's cgroup and its ancestors: the one that leaves the
    least room once what is taken in it is counted.

    Both versions charge the page cache to the cgroup that brought a page in, so the usage (memory.current,
    memory.usage_in_bytes) counts the file pages of whatever ran in the cgroup before, and ours. The kernel
    reclaims clean file pages when the cgroup reaches its limit instead of killing anything, so only the rest
    of the usage, mostly anonymous memory, is taken (tools that read the usage as taken refuse models that
    would run: ollama issues #15704, #15961)."""

    version: int  # 1 or 2
    file: str  # the file that sets it, as the user would look for it
    limit: int  # bytes
    usage: int | None = None  # bytes charged to the cgroup now (None: unknown)
    file_pages: int | None = None  # of the usage, file pages on the LRU lists: reclaimable (None: unknown)

    @property
    def taken(self) -> int:
        """Bytes of the usage the kernel cannot reclaim: anonymous memory, shmem, kernel memory."""
        if self.usage is None:
            return 0
        return max(0, self.usage - (self.file_pages or 0))

    @property
    def room(self) -> int:
        return max(0, self.limit - self.taken)


@dataclass(frozen=True)
class SystemInfo:
    sysroot: Path
    mem_total: int | None
    mem_free: int | None
    mem_available: int | None
    cached: int | None
    hugepages_total: int | None  # pages in the hugetlbfs pool: memory neither page cache nor malloc can use
    hugepages_free: int | None
    hugepage_size: int | None  # bytes
    commit_limit: int | None
    committed_as: int | None
    overcommit_memory: int | None
    nodes: tuple[Node, ...]  # every node, with memory or not
    numa_dirs: bool  # False: no sys/devices/system/node, so `nodes` is one node made from proc/meminfo
    mems_allowed: frozenset[int] | None
    cpus_allowed: frozenset[int] | None
    policy: MemoryPolicy
    cgroup: CgroupLimit | None
    rlimit_as: int | None  # bytes; None is unlimited or unknown
    numa_balancing: int | None

    @property
    def memory_nodes(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.total > 0)

    def allowed_nodes(self) -> tuple[Node, ...]:
        """The nodes with memory this process may allocate on: the cpuset's, narrowed by a bind policy."""
        nodes = self.memory_nodes
        if self.mems_allowed is not None and self.numa_dirs:
            nodes = tuple(n for n in nodes if n.id in self.mems_allowed)
        if self.policy.mode == "bind" and self.policy.nodes and self.numa_dirs:
            nodes = tuple(n for n in nodes if n.id in self.policy.nodes)
        return nodes

    def cpus_on(self, node: Node) -> frozenset[int]:
        """The CPUs of `node` this process may run on (taskset, numactl -N, the cpuset)."""
        return node.cpus if self.cpus_allowed is None else node.cpus & self.cpus_allowed

    @property
    def hugepages_bytes(self) -> int:
        return (self.hugepages_total or 0) * (self.hugepage_size or 0)

    def as_dict(self) -> dict:
        return {
            "sysroot": str(self.sysroot),
            "mem_total": self.mem_total,
            "mem_free": self.mem_free,
            "mem_available": self.mem_available,
            "cached": self.cached,
            "hugepages": {
                "total": self.hugepages_total,
                "free": self.hugepages_free,
                "page_size": self.hugepage_size,
                "total_bytes": self.hugepages_bytes,
            },
            "overcommit_memory": self.overcommit_memory,
            "commit_limit": self.commit_limit,
            "committed_as": self.committed_as,
            "numa_dirs": self.numa_dirs,
            "nodes": [
                {
                    "node": n.id,
                    "total": n.total,
                    "free": n.free,
                    "available": n.available,
                    "cpus": format_ids(n.cpus),
                    "allowed": n in self.allowed_nodes(),
                }
                for n in self.nodes
            ],
            "mems_allowed": None if self.mems_allowed is None else format_ids(self.mems_allowed),
            "cpus_allowed": None if self.cpus_allowed is None else format_ids(self.cpus_allowed),
            "memory_policy": str(self.policy),
            "cgroup": None
            if self.cgroup is None
            else {
                "version": self.cgroup.version,
                "file": self.cgroup.file,
                "limit": self.cgroup.limit,
                "usage": self.cgroup.usage,
                "file_pages": self.cgroup.file_pages,
                "taken": self.cgroup.taken,
            },
            "rlimit_as": self.rlimit_as,
            "numa_balancing": self.numa_balancing,
        }


def read_system(sysroot: Path = Path("/")) -> SystemInfo:
    """Every reading the memory plan needs, from the files under `sysroot`."""
    root = Path(sysroot)
    meminfo_path = root / "proc/meminfo"
    meminfo = _fields(meminfo_path, _read(meminfo_path))
    status_path = root / "proc/self/status"
    status = _fields(status_path, _read(status_path))
    cpus_allowed = _ids_field(status_path, status, "Cpus_allowed_list")
    nodes = _read_nodes(root)
    numa_dirs = bool(nodes)
    if not numa_dirs:
        nodes = _single_node(root, meminfo_path, meminfo, cpus_allowed)
    return SystemInfo(
        sysroot=root,
        mem_total=_amount(meminfo_path, meminfo, "MemTotal"),
        mem_free=_amount(meminfo_path, meminfo, "MemFree"),
        mem_available=_amount(meminfo_path, meminfo, "MemAvailable"),
        cached=_amount(meminfo_path, meminfo, "Cached"),
        hugepages_total=_amount(meminfo_path, meminfo, "HugePages_Total"),
        hugepages_free=_amount(meminfo_path, meminfo, "HugePages_Free"),
        hugepage_size=_amount(meminfo_path, meminfo, "Hugepagesize"),
        commit_limit=_amount(meminfo_path, meminfo, "CommitLimit"),
        committed_as=_amount(meminfo_path, meminfo, "Committed_AS"),
        overcommit_memory=_int_file(root / "proc/sys/vm/overcommit_memory"),
        nodes=nodes,
        numa_dirs=numa_dirs,
        mems_allowed=_ids_field(status_path, status, "Mems_allowed_list"),
        cpus_allowed=cpus_allowed,
        policy=_read_policy(root / "proc/self/numa_maps"),
        cgroup=_read_cgroup_limit(root),
        rlimit_as=_read_rlimit_as(root / "proc/self/limits"),
        numa_balancing=_int_file(root / "proc/sys/kernel/numa_balancing"),
    )


def format_ids(ids) -> str:
    """{0, 1, 2, 5} -> "0-2,5", the kernel's list format."""
    ordered = sorted(ids)
    parts = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def parse_ids(path: Path, text: str) -> frozenset[int]:
    """The kernel's list format, "0-3,8,10-11" (empty for none), as a set."""
    ids: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        match = _ID_RANGE.match(part)
        if match is None:
            raise SystemReadError(f"{path}: {text.strip()!r} is not a list like 0-3,8")
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        if not first <= last < MAX_ID:
            raise SystemReadError(f"{path}: range {part!r} in {text.strip()!r} is not a valid CPU or node range")
        ids.update(range(first, last + 1))
    return frozenset(ids)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise SystemReadError(f"{path}: not a text file") from None
    except OSError:  # missing, unreadable, or not a file: unknown
        return None


def _first_line(path: Path) -> str | None:
    # numa_maps walks the page tables of every mapping it prints: read no more than we need.
    try:
        with open(path) as fh:
            return fh.readline()
    except UnicodeDecodeError:
        raise SystemReadError(f"{path}: not a text file") from None
    except OSError:
        return None


def _fields(path: Path, text: str | None) -> dict[str, str]:
    """The "Name: value" lines of a meminfo or status file (node meminfo lines start "Node N ")."""
    fields: dict[str, str] = {}
    for number, line in enumerate((text or "").splitlines(), 1):
        if not line.strip():
            continue
        match = _FIELD.match(line)
        if match is None:
            raise SystemReadError(f"{path}: line {number}: {line.strip()[:80]!r} is not 'Name: value'")
        fields[match[1]] = match[2]
    return fields


def _amount(path: Path, fields: dict[str, str], key: str) -> int | None:
    """A meminfo figure: bytes for "N kB" values, a plain count otherwise."""
    raw = fields.get(key)
    if raw is None:
        return None
    match = _AMOUNT.match(raw)
    if match is None:
        raise SystemReadError(f"{path}: {key} is {raw[:80]!r}, not a number of kB")
    return int(match[1]) * (KIB if match[2] else 1)


def _ids_field(path: Path, fields: dict[str, str], key: str) -> frozenset[int] | None:
    raw = fields.get(key)
    return None if raw is None else parse_ids(path, raw)


def _int_file(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise SystemReadError(f"{path}: {text.strip()[:80]!r} is not an integer") from None


def _read_nodes(root: Path) -> tuple[Node, ...]:
    folder = root / "sys/devices/system/node"
    try:
        entries = list(folder.iterdir())
    except OSError:
        return ()
    nodes = []
    for entry in entries:
        match = re.fullmatch(r"node(\d+)", entry.name)
        if match is None:
            continue
        meminfo_path = entry / "meminfo"
        text = _read(meminfo_path)
        if text is None:
            continue
        fields = _fields(meminfo_path, text)
        total = _required(meminfo_path, fields, "MemTotal")
        free = _required(meminfo_path, fields, "MemFree")
        reclaimable = sum(
            _amount(meminfo_path, fields, key) or 0 for key in ("Active(file)", "Inactive(file)", "SReclaimable")
        )
        cpulist_path = entry / "cpulist"
        cpulist = _read(cpulist_path)
        cpus = frozenset() if cpulist is None else parse_ids(cpulist_path, cpulist)
        nodes.append(Node(int(match[1]), total, free, min(total, free + reclaimable), cpus))
    return tuple(sorted(nodes, key=lambda n: n.id))


def _required(path: Path, fields: dict[str, str], key: str) -> int:
    value = _amount(path, fields, key)
    if value is None:
        raise SystemReadError(f"{path}: no {key} line")
    return value


def _single_node(root: Path, meminfo_path: Path, meminfo: dict[str, str], cpus_allowed) -> tuple[Node, ...]:
    """A kernel without NUMA folders is one node: the whole machine, as proc/meminfo describes it."""
    total = _amount(meminfo_path, meminfo, "MemTotal")
    if total is None:
        return ()
    free = _amount(meminfo_path, meminfo, "MemFree") or 0
    available = _amount(meminfo_path, meminfo, "MemAvailable")
    online_path = root / "sys/devices/system/cpu/online"
    online = _read(online_path)
    cpus = parse_ids(online_path, online) if online is not None else (cpus_allowed or frozenset())
    return (Node(0, total, free, free if available is None else available, cpus),)


def _read_policy(path: Path) -> MemoryPolicy:
    line = _first_line(path)
    if not line:  # no CONFIG_NUMA, or no file in a fixture: the kernel's default
        return MemoryPolicy("default", frozenset())
    match = _POLICY.match(line)
    if match is None:
        raise SystemReadError(f"{path}: line 1: no memory policy in {line.strip()[:80]!r}")
    nodes = parse_ids(path, match[2]) if match[2] else frozenset()
    return MemoryPolicy(match[1], nodes)


def _read_cgroup_limit(root: Path) -> CgroupLimit | None:
    """The tightest memory limit of this process's cgroup and its ancestors, v1 or v2."""
    v2_path = v1_path = "/"  # without proc/self/cgroup, the mount's own root is all we can read
    cgroup_file = root / "proc/self/cgroup"
    for number, line in enumerate((_read(cgroup_file) or "").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            raise SystemReadError(f"{cgroup_file}: line {number}: {line.strip()[:80]!r} is not 'id:controllers:/path'")
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    limits = []
    for mount in CGROUP_V2_MOUNTS:
        for folder in _self_and_ancestors(root / mount, v2_path):
            for name in ("memory.max", "memory.high"):  # high throttles the cgroup: as binding as max for us
                limit = _cgroup_value(folder / name, unlimited="max")
                if limit is not None:
                    usage = _cgroup_value(folder / "memory.current", unlimited=None)
                    file_pages = _file_pages(folder / "memory.stat", CGROUP_V2_FILE_PAGES)
                    limits.append(CgroupLimit(2, _shown_path(root, folder / name), limit, usage, file_pages))
    for folder in _self_and_ancestors(root / CGROUP_V1_MOUNT, v1_path):
        limit = _cgroup_value(folder / "memory.limit_in_bytes", unlimited=None)
        if limit is not None and limit < CGROUP_V1_UNLIMITED:
            usage = _cgroup_value(folder / "memory.usage_in_bytes", unlimited=None)
            file_pages = _file_pages(folder / "memory.stat", CGROUP_V1_FILE_PAGES)
            limits.append(CgroupLimit(1, _shown_path(root, folder / "memory.limit_in_bytes"), limit, usage, file_pages))
    return min(limits, key=lambda c: (c.room, c.limit), default=None)


def _file_pages(path: Path, keys: tuple[tuple[str, ...], ...]) -> int | None:
    """The reclaimable file pages of a cgroup's memory.stat: the first of `keys` whose fields are all there."""
    text = _read(path)
    if text is None:
        return None
    stat = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise SystemReadError(f"{path}: line {number}: {line.strip()[:80]!r} is not 'name bytes'")
        stat[fields[0]] = int(fields[1])
    for names in keys:
        if all(name in stat for name in names):
            return sum(stat[name] for name in names)
    return None


def _self_and_ancestors(mount: Path, cgroup_path: str) -> list[Path]:
    parts = PurePosixPath(cgroup_path).parts[1:]
    if ".." in parts:  # a cgroup outside our namespace's root: only the mount's root is ours to read
        parts = ()
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _cgroup_value(path: Path, unlimited: str | None) -> int | None:
    text = _read(path)
    if text is None or text.strip() == unlimited:
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise SystemReadError(f"{path}: {text.strip()[:80]!r} is not a number of bytes") from None


def _shown_path(root: Path, path: Path) -> str:
    """The path as it is on the machine the readings describe (without a fixture's prefix)."""
    return "/" + path.relative_to(root).as_posix()


def _read_rlimit_as(path: Path) -> int | None:
    for line in (_read(path) or "").splitlines():
        if line.startswith("Max address space"):
            fields = line[len("Max address space") :].split()
            soft = fields[0] if fields else ""
            if soft == "unlimited":
                return None
            if not soft.isdigit():
                raise SystemReadError(f"{path}: 'Max address space' soft limit is {soft[:80]!r}, not a number")
            return int(soft)
    return None
