"""The memory plan: what a model needs at a context size, what this process may use, and a verdict.

`refengine plan MODEL --ctx N --numa MODE` reads the GGUF header (tensor names, types, shapes and
the `{arch}.*` keys) and the readings of refengine.system, nothing else, so it answers in well under
a second even for a 400 GB split model. `refengine generate` runs it first and stops on does_not_fit.

What the model needs
    weights       the tensors' bytes, by group: embeddings (token_embd, output), attention (attn_*),
                  dense FFN (other ffn_*, the router ffn_gate_inp included), routed experts (ffn_*_exps),
                  shared experts (ffn_*_shexp), other (norms, exp_probs_b, rope_freqs). They stay
                  file-backed: a read-only shared mapping, so they live in the page cache, never in
                  the process's anonymous memory.
    KV cache      what our KVCache allocates: every layer x n_head_kv x (key_length + value_length) per
                  position it keeps, in the compute dtype (4 bytes; 8 with --precision f64). A full-
                  attention layer keeps n_ctx positions; a sliding-window layer (gemma3's five local
                  layers in six) a ring of window + n_ubatch, as llama.cpp's iSWA cache does. With MLA
                  (a `{arch}.attention.kv_lora_rank` key, e.g. deepseek2) the compressed cache llama.cpp
                  keeps: n_layer x n_ctx x (kv_lora_rank + rope.dimension_count).
    activations   the largest transient of one forward step of n_batch tokens: n_batch is the
                  micro-batch (nn.N_UBATCH, 512, as llama.cpp's n_ubatch) or the prompt if shorter,
                  whatever the context. What is alive at the peak of a layer: the residual stream and its
                  norm (3 x n_batch x n_embd), q/k/v and their rotated copies, then the larger of the
                  attention's working set (its grouped queries, running output and the product of one key
                  block, and one block of scores: at most nn.ATTENTION_TILE_FLOATS, or the smallest key
                  block for every query row) and three FFN-width arrays (gate, its activation, the gated
                  product); plus one dequantized weight tile (nn.TILE_FLOATS) and one row of logits. The
                  tests check this against tracemalloc's peak over a real forward pass.
    runtime       the interpreter, numpy, numba and the tokenizer's vocabulary: measured 96 MiB + about
                  256 bytes per token (RssAnon of `refengine generate` on both bundled models), rounded up.
    address space what RLIMIT_AS counts: the whole mapping of every split, the anonymous memory, and
                  per thread a 64 MiB malloc arena and an 8 MiB stack that glibc reserves (virtual).

What this process may use ("room")
    The nodes it may allocate on: the cpuset's (Mems_allowed_list), narrowed by a bind memory policy
    (numactl -m). On each, what is free plus what the kernel can reclaim (file page cache, reclaimable
    slab), never more than MemAvailable, and never more than the cgroup's room: cgroup v1 and v2 both
    charge page cache to the cgroup, so the weights count against memory.max, memory.high (v2) and
    limit_in_bytes (v1). Of what the cgroup already holds (memory.current, usage_in_bytes), its file pages
    (memory.stat's active_file + inactive_file) are reclaimed within the limit, ours and those of whatever
    ran before alike; only the rest, anonymous memory above all, is taken from the limit. Swap is
    not counted (anonymous memory in swap would make every token wait on the disk). Pages of the file
    that are already cached on another node stay there and are used there; the plan assumes a cold cache.

Verdict
    fits             weights + anonymous memory fit in what is free now: after the first pass, nothing
                     is read twice.
    pages_from_disk  they fit only by evicting other files' page cache: until the kernel has made room,
                     the mapping is read from disk and speed is bound by the disk.
    does_not_fit     the anonymous memory (KV cache, activations, runtime) does not fit, so the OOM killer
                     ends the run, on the bound nodes or in the cgroup; or the weights and buffers do not
                     fit even with every reclaimable page dropped. Nothing is killed then, since the
                     kernel drops and re-reads clean file pages (ours included), but every token reads
                     the missing part of the model from disk again, hundreds of times slower than memory.
                     (Engines that copy weights into anonymous memory get killed here.) Also when
                     RLIMIT_AS is below the address space, so the mapping itself fails, or strict
                     overcommit (vm.overcommit_memory=2) leaves less commit than the buffers need.

Placement per node (--numa), for the verdict and for refengine.numa, which places the pages so
    off          no placement: the memory policy decides. interleave spreads pages evenly over its nodes;
                 prefer puts them on its node first; otherwise (default, bind) a page lands on the node
                 of the worker thread that first touches it, so the weights split over the allowed
                 nodes in proportion to the CPUs we may run on there. The buffers sit on the first of
                 those nodes (the main thread allocates and first writes them).
    distribute   threads pinned evenly over the nodes' allowed CPUs, pages where the kernel puts them:
                 on paper the same split as off; distribute makes it hold.
    shard        each routed expert (its slices of every ffn_*_exps tensor of its layer) lives on exactly
                 one node, balanced by bytes (largest first onto the least loaded node); everything else,
                 the KV cache and activations included, is interleaved over the allowed nodes. Its
                 placement is strict, so each node's share must fit on that node.
    split        every routed expert is cut by rows over the nodes with CPUs (refengine.partition), so each
                 node holds an even share of every expert; the rest as under shard, and as strict.
    Only shard's and split's per-node shares are checked node by node; the kernel moves the others'
    overflow to another allowed node.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from refengine.arch.declarations import ARCHITECTURES
from refengine.buffers import ATTENTION_TILE_FLOATS, MIN_KEY_BLOCK, N_UBATCH, TILE_FLOATS, cache_slots
from refengine.errors import RefengineError
from refengine.gguf import SPLIT_PATTERN, GGUFError, GGUFFile, open_gguf
from refengine.hparams import HParams
from refengine.system import Node, SystemInfo, format_ids

NUMA_MODES = ("off", "distribute", "shard", "split")
VERDICTS = ("fits", "pages_from_disk", "does_not_fit")
GROUPS = ("embeddings", "attention", "dense_ffn", "routed_experts", "shared_experts", "other")

MIB, GIB = 1 << 20, 1 << 30
RUNTIME_BASE = 128 * MIB  # interpreter, numpy, numba: measured 96 MiB
RUNTIME_PER_TOKEN = 256  # the tokenizer's vocabulary as Python strings and tables, per token
ADDRESS_SPACE_BASE = 512 * MIB  # libraries and interpreter reservations: measured ~360 MiB
ADDRESS_SPACE_PER_THREAD = 72 * MIB  # a glibc malloc arena (64 MiB) and a stack (8 MiB) per thread
# Bounds on the shard table a corrupt header could ask for: llama.cpp allows 512 experts a layer,
# DeepSeek-R1 has 14,848 in all.
MAX_EXPERTS = 1 << 16
MAX_EXPERT_UNITS = 1 << 22
PAGING = "will be read from disk again as they are used, and speed will be bound by the disk"


class PlanError(RefengineError):
    """A model header the plan cannot size: a missing or malformed key. The message names it."""


class DoesNotFit(RefengineError):
    """The plan's verdict is does_not_fit: the run would be killed or fail to map. `refengine generate` exits 3."""


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters the memory figures depend on, from `{arch}.*` keys."""

    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int  # the most of any layer
    kv_heads: tuple[int, ...]  # n_head_kv of each layer (layers may differ)
    n_head_kv: int  # the most of any layer
    windows: tuple[int, ...]  # each layer's sliding window (0: full attention)
    key_length: int  # per head, as attention computes it (MLA: the decompressed head, key_length_mla)
    value_length: int
    kv_lora_rank: int  # MLA's compressed width; 0 without MLA
    n_rot: int  # rope.dimension_count
    n_ff: int  # the widest dense FFN
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_expert_shared: int
    n_ff_shexp: int

    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile) -> ModelShape:
        hp = HParams(gguf_file, PlanError)
        n_layer = hp.int("block_count")
        n_embd = hp.int("embedding_length")
        n_head = hp.int("attention.head_count", per_layer="max")
        if n_head < 1:  # activation_bytes divides by it
            raise PlanError(f"{gguf_file.path}: {hp.arch}.attention.head_count is {n_head}, must be at least 1")
        kv_heads = hp.per_layer_ints("attention.head_count_kv", n_layer, default=hp.raw("attention.head_count"))
        n_head_kv = max(kv_heads, default=0)
        # every PATTERN-th layer attends globally, the others in a window (the architecture's declaration)
        declared = ARCHITECTURES.get(hp.arch)
        pattern = declared.sliding_window_pattern if declared is not None else 0
        window = hp.int("attention.sliding_window", 0, per_layer="max") if pattern else 0
        windows = tuple(window if (il + 1) % pattern else 0 for il in range(n_layer)) if pattern else (0,) * n_layer
        head_dim = n_embd // max(n_head, 1)
        key_length = hp.int("attention.key_length", head_dim, per_layer="max")
        value_length = hp.int("attention.value_length", key_length, per_layer="max")
        kv_lora_rank = hp.int("attention.kv_lora_rank", 0, per_layer="max")
        if kv_lora_rank:
            key_length = hp.int("attention.key_length_mla", key_length, per_layer="max")
            value_length = hp.int("attention.value_length_mla", value_length, per_layer="max")
        n_ff = hp.int("feed_forward_length", 0, per_layer="max")
        n_ff_exp = hp.int("expert_feed_forward_length", n_ff, per_layer="max")
        embd = gguf_file.tensors.get("token_embd.weight")
        n_vocab = (
            embd.shape[0] if embd is not None and embd.shape else len(gguf_file.get("tokenizer.ggml.tokens") or ())
        )
        return cls(
            arch=hp.arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_vocab=n_vocab,
            n_head=n_head,
            kv_heads=kv_heads,
            n_head_kv=n_head_kv,
            windows=windows,
            key_length=key_length,
            value_length=value_length,
            kv_lora_rank=kv_lora_rank,
            n_rot=hp.int("rope.dimension_count", key_length, per_layer="max"),
            n_ff=n_ff,
            n_expert=hp.int("expert_count", 0, per_layer="max"),
            n_expert_used=hp.int("expert_used_count", 0, per_layer="max"),
            n_ff_exp=n_ff_exp,
            n_expert_shared=hp.int("expert_shared_count", 0, per_layer="max"),
            n_ff_shexp=hp.int("expert_shared_feed_forward_length", n_ff_exp, per_layer="max"),
        )


def weight_group(name: str) -> str:
    """The group a tensor's bytes count in, from its GGUF name ("blk.3.ffn_up_exps.weight" -> routed_experts)."""
    parts = name.split(".")
    kind = parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]
    if "norm" in kind:
        return "other"
    if kind.startswith("token_") or kind in ("output", "per_layer_token_embd"):
        return "embeddings"
    if kind.startswith("attn_"):
        return "attention"
    if kind.startswith("ffn_") and kind.endswith("_exps"):
        return "routed_experts"
    if kind.startswith("ffn_") and kind.endswith("_shexp"):
        return "shared_experts"
    if kind.startswith("ffn_"):
        return "dense_ffn"
    return "other"


def weight_bytes(gguf_file: GGUFFile) -> dict[str, int]:
    groups = dict.fromkeys(GROUPS, 0)
    for t in gguf_file.tensors.values():
        groups[weight_group(t.name)] += t.nbytes
    return groups


def expert_units(gguf_file: GGUFFile) -> dict[tuple[int, int], int]:
    """Bytes of each routed expert, (layer, expert) -> its slices of every ffn_*_exps tensor of the layer.

    An expert tensor is (n_expert, rows, cols) with the expert outermost, so each expert's slice is a
    contiguous nbytes / n_expert: the unit that --numa shard places on one node.
    """
    per_layer: dict[int, tuple[int, int]] = {}  # layer -> (n_expert, bytes per expert)
    for t in gguf_file.tensors.values():
        if weight_group(t.name) != "routed_experts" or t.nbytes == 0:
            continue
        layer = _layer_of(t.name)
        n_expert = t.shape[0] if len(t.shape) >= 2 else 0
        if layer is None or not 0 < n_expert <= MAX_EXPERTS:
            raise PlanError(
                f"{t.path}: expert tensor {t.name!r} has shape {t.shape}, not (n_expert <= {MAX_EXPERTS}, ...)"
            )
        seen, unit = per_layer.get(layer, (n_expert, 0))
        if seen != n_expert:
            raise PlanError(f"{t.path}: expert tensor {t.name!r} has {n_expert} experts, its layer has {seen}")
        per_layer[layer] = (n_expert, unit + t.nbytes // n_expert)
    n_units = sum(n for n, _ in per_layer.values())
    if n_units > MAX_EXPERT_UNITS:
        raise PlanError(f"{gguf_file.path}: {n_units} routed experts in all, more than the {MAX_EXPERT_UNITS} we place")
    return {(layer, e): unit for layer, (n, unit) in sorted(per_layer.items()) for e in range(n)}


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else None


def assign_experts(units: dict[tuple[int, int], int], node_ids: list[int]) -> dict[tuple[int, int], int]:
    """Each expert onto one node, balanced by bytes: largest first onto the least loaded node (LPT)."""
    loads = [(0, i, node) for i, node in enumerate(node_ids)]  # (bytes so far, tie-break, node)
    heapq.heapify(loads)
    placed = {}
    for key, nbytes in sorted(units.items(), key=lambda kv: (-kv[1], kv[0])):
        load, i, node = heapq.heappop(loads)
        placed[key] = node
        heapq.heappush(loads, (load + nbytes, i, node))
    return placed


def kv_cache_bytes(shape: ModelShape, n_ctx: int, itemsize: int) -> int:
    if shape.kv_lora_rank:  # MLA: one compressed latent and the shared rope key per position and layer
        return shape.n_layer * n_ctx * (shape.kv_lora_rank + shape.n_rot) * itemsize
    per_position = (shape.key_length + shape.value_length) * itemsize
    slots = [cache_slots(n_ctx, window) for window in shape.windows]  # a sliding-window layer keeps a ring
    return sum(n_kv * n * per_position for n_kv, n in zip(shape.kv_heads, slots, strict=True))


def activation_bytes(shape: ModelShape, n_batch: int, n_kv: int, itemsize: int) -> int:
    """The peak transient of one forward step of n_batch tokens over n_kv positions (see the module doc)."""
    residual = 3 * n_batch * shape.n_embd
    if shape.kv_lora_rank:  # MLA attends in latent space: per head a query and an output of kv_lora_rank
        k_width, v_width = shape.kv_lora_rank + shape.n_rot, shape.kv_lora_rank
        projections = 2 * n_batch * shape.n_head * (shape.key_length + 2 * k_width + shape.value_length)
    else:
        k_width, v_width = shape.key_length, shape.value_length
        projections = 2 * n_batch * (shape.n_head + shape.n_head_kv) * (shape.key_length + shape.value_length)
    rows = shape.n_head * n_batch  # query rows of the tiled attention (nn.attention_tiled)
    block = min(n_kv, max(ATTENTION_TILE_FLOATS // rows, MIN_KEY_BLOCK))  # keys per block
    mask = 2 * n_batch * block  # the block's visibility and its additive bias
    # grouped queries; the running output, one block's product and the result; one block's scores
    attention = rows * k_width + 3 * rows * v_width + rows * block + mask
    ffn_width = max(shape.n_ff, shape.n_expert_used * shape.n_ff_exp + shape.n_expert_shared * shape.n_ff_shexp)
    ffn = 3 * n_batch * ffn_width
    tile = TILE_FLOATS * 4 + (TILE_FLOATS * itemsize if itemsize != 4 else 0)  # float32, and its cast
    logits = shape.n_vocab * itemsize
    return (residual + projections + max(attention, ffn)) * itemsize + tile + logits


@dataclass(frozen=True)
class Sizer:
    """The anonymous memory of one model as a function of the context size."""

    shape: ModelShape
    itemsize: int
    n_batch: int | None  # the longest prompt, when known (None: any)

    def batch(self, n_ctx: int) -> int:
        """The tokens of one forward step: a micro-batch, or the whole prompt if it is shorter."""
        return min(N_UBATCH, n_ctx, self.n_batch or n_ctx)

    def kv_cache(self, n_ctx: int) -> int:
        return kv_cache_bytes(self.shape, n_ctx, self.itemsize)

    def activations(self, n_ctx: int) -> int:
        return activation_bytes(self.shape, self.batch(n_ctx), n_ctx, self.itemsize)

    @property
    def runtime(self) -> int:
        return RUNTIME_BASE + RUNTIME_PER_TOKEN * self.shape.n_vocab

    def anon(self, n_ctx: int) -> int:
        return self.kv_cache(n_ctx) + self.activations(n_ctx) + self.runtime

    def largest_ctx(self, below: int, room: int) -> int:
        """The largest context under `below` whose anonymous memory fits in `room`; 0 if none does."""
        lo, hi = 0, below - 1  # anon() grows with n_ctx, so bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.anon(mid) <= room:
                lo = mid
            else:
                hi = mid - 1
        return lo if lo >= 1 and self.anon(lo) <= room else 0


@dataclass(frozen=True)
class Needs:
    """What the model needs at one context size, in bytes."""

    weights: dict[str, int]  # by group (GROUPS): file-backed, in the page cache
    mapping: int  # every split, whole: what the mapping adds to the address space
    kv_cache: int
    activations: int
    runtime: int
    address_space: int

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def anon(self) -> int:
        return self.kv_cache + self.activations + self.runtime


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
    return Plan(
        model=str(gguf_file.path),
        architecture=sizer.shape.arch,
        n_splits=len(gguf_file.splits),
        n_ctx=n_ctx,
        n_batch=sizer.batch(n_ctx),
        numa=numa,
        itemsize=itemsize,
        needs=needs,
        room=room,
        nodes=shares,
        system=system,
        verdict=verdict,
        reasons=tuple(reasons),
        actions=tuple(actions),
        notes=tuple(_notes(system, numa, sizer.batch(n_ctx), itemsize)),
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


def size(n: int) -> str:
    """Bytes as a person reads them in a message: 377 GiB, 5.2 GiB, 640 MiB."""
    if n >= 100 * GIB:
        return f"{n / GIB:.0f} GiB"
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    if n >= MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / 1024:.0f} KiB"


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
