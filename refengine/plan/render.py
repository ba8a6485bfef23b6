"""A plan as text: what the model needs, what the system has, the placement, the verdict."""

from __future__ import annotations

from refengine.plan.sizing import size
from refengine.plan.verdict import Plan
from refengine.system import format_ids


def render(p: Plan) -> str:
    """The text form of a plan: what the model needs, what the system has, the placement, the verdict."""
    s, n = p.system, p.needs
    splits = f" ({p.n_splits} splits)" if p.n_splits > 1 else ""
    lines = [
        f"{'model':<14}{p.model}{splits}",
        f"{'architecture':<14}{p.architecture}",
        f"{'context':<14}{p.n_ctx} tokens, batch {p.n_batch}, float{8 * p.itemsize}, --numa {p.numa}",
        "",
        "needs",
        f"  {'weights':<18}{size(n.weights_total):>10}   file-backed, in the page cache",
    ]
    lines += [f"    {group.replace('_', ' '):<16}{size(b):>10}" for group, b in n.weights.items() if b]
    lines += [
        f"  {'KV cache':<18}{size(n.kv_cache):>10}",
        f"  {'activations':<18}{size(n.activations):>10}",
        f"  {'runtime':<18}{size(n.runtime):>10}   interpreter, numba, tokenizer",
        f"  {'address space':<18}{size(n.address_space):>10}   the mapping ({size(n.mapping)}), buffers, threads",
        "",
        "system",
    ]
    if s.mem_total is not None:
        available = "unknown" if s.mem_available is None else size(s.mem_available)
        lines.append(f"  {'memory':<18}{size(s.mem_total)} total, {available} available")
    allowed_nodes = s.allowed_nodes()
    lines.append(f"  {'nodes':<18}{'node':>4}{'total':>10}{'free':>10}{'available':>11}  cpus")
    for node in s.nodes:
        mark = "" if node in allowed_nodes else "  (not allowed)"
        cpus = format_ids(s.cpus_on(node)) or "-"
        avail = size(node.available)
        lines.append(f"  {'':<18}{node.id:>4}{size(node.total):>10}{size(node.free):>10}{avail:>11}  {cpus}{mark}")
    cgroup = "none" if s.cgroup is None else f"{size(s.cgroup.limit)} (v{s.cgroup.version}, {s.cgroup.file})"
    if s.cgroup is not None and s.cgroup.usage is not None:
        reclaimable = size(s.cgroup.file_pages) if s.cgroup.file_pages is not None else "unknown"
        cgroup += f", {size(s.cgroup.usage)} used: {reclaimable} file pages, {size(s.cgroup.taken)} taken"
    lines += [
        f"  {'Mems_allowed':<18}{_or_unknown(s.mems_allowed)}, memory policy {s.policy}",
        f"  {'Cpus_allowed':<18}{_or_unknown(s.cpus_allowed)}",
        f"  {'cgroup limit':<18}{cgroup}",
        f"  {'RLIMIT_AS':<18}{'unlimited' if s.rlimit_as is None else size(s.rlimit_as)}",
        f"  {'huge pages':<18}{s.hugepages_total or 0} x {size(s.hugepage_size or 0)}",
        f"  {'numa_balancing':<18}{'unknown' if s.numa_balancing is None else s.numa_balancing}",
        "",
        f"placement (--numa {p.numa})",
        f"  {'node':>4}{'weights':>12}{'buffers':>12}{'total':>12}{'available':>12}"
        + ("  experts" if p.numa in ("shard", "split") else ""),
    ]
    for share in p.nodes:
        row = [share.weights, share.buffers, share.total, share.available]
        experts = f"{share.experts:>9}" if p.numa in ("shard", "split") else ""
        lines.append(f"  {share.node:>4}" + "".join(f"{size(b):>12}" for b in row) + experts)
    if p.hosts:
        lines += ["", f"hosts ({len(p.hosts)}, one MPI rank each, alike)"]
        lines += [f"  {'host':>4}{'weights':>12}{'experts':>12}{'buffers':>12}  verdict"]
        for h in p.hosts:
            lines.append(
                f"  {h.host:>4}{size(h.weights):>12}{size(h.routed_experts):>12}{size(h.anon):>12}  {h.verdict}"
            )
    lines += ["", f"verdict: {p.verdict}", f"  {p.message()}"]
    lines += [f"  note: {note}" for note in p.notes]
    return "\n".join(lines)


def _or_unknown(ids) -> str:
    return "unknown" if ids is None else format_ids(ids)
