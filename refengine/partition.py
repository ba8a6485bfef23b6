"""Expert partitions: which rows of each routed expert each worker computes.

A worker is a NUMA node's pool (refengine.numa: --numa shard and split) or an MPI rank
(refengine.distributed). One object says, for any layer and expert, the rows of its
ffn_gate_exps / ffn_up_exps slices (the intermediate features, n_ff of them) and of its
ffn_down_exps slice (the output features, n_embd of them) that a worker holds and computes:

    by_expert   each expert whole on one worker, balanced by bytes (plan.assign_experts: largest first
                onto the least loaded). --numa shard.
    contiguous  each layer's experts in one contiguous run per worker: experts [k n / W, (k + 1) n / W)
                to worker k. MPI ranks: a rank's bytes of a tensor are one run of the file, and a rank's
                partial output is one allreduce per layer.
    by_rows     every expert on every worker: rows [c_k, c_k+1) of its gate and up slices and rows
                [d_k, d_k+1) of its down slice to worker k, the cuts c, d even over the rows (as
                ktransformers' moe-tp splits the intermediate size over NUMA nodes, and ik_llama.cpp's
                row slices of every expert per node). --numa split: whatever the routing, every token
                gives each worker the same work.

Everything here comes from the GGUF header (no numba): the memory plan sizes each worker's share with
it, before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from refengine.gguf import GGUFFile
from refengine.plan import PlanError, assign_experts, expert_units, weight_group

KINDS = ("experts", "contiguous", "rows")
# The 3-D tensors an expert is made of, and which of its two sizes their rows run over.
EXPERT_TENSORS = {"ffn_gate_exps": "ff", "ffn_up_exps": "ff", "ffn_down_exps": "embd"}


@dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer's routed experts, as the header describes them."""

    layer: int
    n_expert: int
    n_ff: int  # rows of one expert's ffn_gate_exps and ffn_up_exps slices
    n_embd: int  # rows of one expert's ffn_down_exps slice
    row_bytes: dict[str, int]  # tensor kind (EXPERT_TENSORS) -> bytes of one row

    def rows(self, kind: str) -> int:
        return self.n_ff if EXPERT_TENSORS[kind] == "ff" else self.n_embd

    @property
    def expert_bytes(self) -> int:
        return sum(self.rows(kind) * b for kind, b in self.row_bytes.items())

    def bytes_of(self, ff: range, out: range) -> int:
        """Bytes of ff rows of every ff-tensor and out rows of every embd-tensor of one expert."""
        return sum((len(ff) if EXPERT_TENSORS[kind] == "ff" else len(out)) * b for kind, b in self.row_bytes.items())


def expert_layers(gguf_file: GGUFFile) -> dict[int, ExpertLayer]:
    """Every MoE layer's experts, from the ffn_{gate,up,down}_exps tensors of the header."""
    expert_units(gguf_file)  # the same checks as the plan's: expert outermost, one count per layer
    found: dict[int, dict] = {}
    for t in gguf_file.tensors.values():
        parts = t.name.split(".")
        if weight_group(t.name) != "routed_experts" or t.nbytes == 0 or len(parts) < 3:
            continue
        if parts[2] not in EXPERT_TENSORS or len(t.shape) != 3:
            raise PlanError(f"{t.path}: expert tensor {t.name!r} cannot be split by rows (shape {t.shape})")
        layer = int(parts[1])
        entry = found.setdefault(layer, {"n_expert": t.shape[0], "row_bytes": {}})
        axis = "n_ff" if EXPERT_TENSORS[parts[2]] == "ff" else "n_embd"
        if entry.setdefault(axis, t.shape[1]) != t.shape[1]:
            raise PlanError(f"{t.path}: {t.name!r} has {t.shape[1]} rows per expert, its layer's others {entry[axis]}")
        entry["row_bytes"][parts[2]] = t.row_bytes
    layers = {}
    for layer, entry in sorted(found.items()):
        if "n_ff" not in entry or "n_embd" not in entry:
            raise PlanError(
                f"{gguf_file.path}: layer {layer} has expert tensors {sorted(entry['row_bytes'])}, not all three"
            )
        layers[layer] = ExpertLayer(layer, entry["n_expert"], entry["n_ff"], entry["n_embd"], entry["row_bytes"])
    return layers


def even_cuts(n: int, parts: int) -> tuple[int, ...]:
    """parts + 1 boundaries that cut n rows into parts runs whose lengths differ by at most one."""
    return tuple(k * n // parts for k in range(parts + 1))


@dataclass(frozen=True)
class ExpertPartition:
    """Which rows of every routed expert each worker holds and computes (see the module doc)."""

    kind: str  # one of KINDS
    workers: tuple[int, ...]  # node ids or ranks, in the order cuts refer to them
    layers: dict[int, ExpertLayer]
    owners: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, expert) -> worker; not by_rows
    ff_cuts: dict[int, tuple[int, ...]] = field(default_factory=dict)  # by_rows: layer -> len(workers) + 1 cuts
    out_cuts: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def by_expert(cls, gguf_file: GGUFFile, workers: tuple[int, ...]) -> ExpertPartition:
        owners = assign_experts(expert_units(gguf_file), list(workers))
        return cls("experts", tuple(workers), expert_layers(gguf_file), owners=owners)

    @classmethod
    def contiguous(cls, gguf_file: GGUFFile, workers: tuple[int, ...]) -> ExpertPartition:
        layers = expert_layers(gguf_file)
        owners = {}
        for layer, el in layers.items():
            cuts = even_cuts(el.n_expert, len(workers))
            for k, worker in enumerate(workers):
                owners.update({(layer, e): worker for e in range(cuts[k], cuts[k + 1])})
        return cls("contiguous", tuple(workers), layers, owners=owners)

    @classmethod
    def by_rows(cls, gguf_file: GGUFFile, workers: tuple[int, ...]) -> ExpertPartition:
        return cls.rows_of(expert_layers(gguf_file), workers)

    @classmethod
    def rows_of(cls, layers: dict[int, ExpertLayer], workers: tuple[int, ...]) -> ExpertPartition:
        ff = {layer: even_cuts(el.n_ff, len(workers)) for layer, el in layers.items()}
        out = {layer: even_cuts(el.n_embd, len(workers)) for layer, el in layers.items()}
        return cls("rows", tuple(workers), layers, ff_cuts=ff, out_cuts=out)

    def share(self, layer: int, expert: int, worker: int) -> tuple[range, range]:
        """The rows of expert `expert` of `layer` that `worker` computes: (its gate/up rows, its down rows),
        counted within the expert's slices. Empty ranges when it computes none of it."""
        el = self.layers[layer]
        if self.kind == "rows":
            k = self.workers.index(worker)
            ff, out = self.ff_cuts[layer], self.out_cuts[layer]
            return range(ff[k], ff[k + 1]), range(out[k], out[k + 1])
        if self.owners[layer, expert] == worker:
            return range(el.n_ff), range(el.n_embd)
        return range(0), range(0)

    def computes(self, layer: int, expert: int, worker: int) -> bool:
        ff, out = self.share(layer, expert, worker)
        return bool(len(ff) or len(out))

    def owner(self, layer: int, expert: int) -> int:
        """The one worker of a whole expert (by_expert, contiguous)."""
        if self.kind == "rows":
            raise ValueError("a row partition gives every expert to every worker")
        return self.owners[layer, expert]

    def worker_bytes(self) -> dict[int, int]:
        """Bytes of routed experts each worker holds (and is the only one to read)."""
        held = dict.fromkeys(self.workers, 0)
        for layer, el in self.layers.items():
            if self.kind == "rows":
                for worker in self.workers:
                    held[worker] += el.n_expert * el.bytes_of(*self.share(layer, 0, worker))
            else:
                for e in range(el.n_expert):
                    held[self.owners[layer, e]] += el.expert_bytes
        return held

    def token_bytes(self, layer: int, experts) -> dict[int, int]:
        """Bytes of weights each worker reads to run `experts` of `layer` for one token."""
        el = self.layers[layer]
        read = dict.fromkeys(self.workers, 0)
        for e in experts:
            for worker in self.workers:
                read[worker] += el.bytes_of(*self.share(layer, int(e), worker))
        return read

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "workers": list(self.workers),
            "bytes": {str(w): b for w, b in self.worker_bytes().items()},
        }
