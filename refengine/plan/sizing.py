"""What a model needs, from its header alone: weights by group, each routed expert's bytes, the KV cache
and the activations of one micro-batch at a context size (the figures of refengine.plan's docstring)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from refengine.arch.declarations import ARCHITECTURES
from refengine.buffers import ATTENTION_TILE_FLOATS, MIN_KEY_BLOCK, N_UBATCH, TILE_FLOATS, cache_slots
from refengine.errors import RefengineError
from refengine.gguf import GGUFFile
from refengine.hparams import HParams

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


class PlanError(RefengineError):
    """A model header the plan cannot size: a missing or malformed key. The message names it."""


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
    # a mixture of experts also keeps each routed entry's output before the weighted sum (arch/moe.py)
    ffn = 3 * n_batch * ffn_width + n_batch * shape.n_expert_used * shape.n_embd
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


def size(n: int) -> str:
    """Bytes as a person reads them in a message: 377 GiB, 5.2 GiB, 640 MiB."""
    if n >= 100 * GIB:
        return f"{n / GIB:.0f} GiB"
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    if n >= MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / 1024:.0f} KiB"
