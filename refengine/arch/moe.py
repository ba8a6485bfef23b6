"""The mixture of experts, written once for every MoE architecture (qwen3moe, mixtral, deepseek2), as
llama.cpp's build_moe_ffn; each expert, and the shared experts, a SwiGLU (refengine.arch.ffn.GLU).

    probs    = softmax or sigmoid of ffn_gate_inp @ x               (expert_gating_func)
    choice   = top-k of probs + exp_probs_b, within the best groups  (selection only)
    weights  = probs[choice], renormalised and scaled               (expert_weights_norm, _scale)
    out      = sum over the chosen e of weights[e] * expert_e(x)  +  shared experts(x)

Expert e is rows [e * n_ff_exp, (e + 1) * n_ff_exp) of the 3-D ffn_{gate,up,down}_exps tensors,
read straight from the mapping: only the chosen experts are ever touched. A batch is grouped by
expert, so each chosen expert runs once, as one matrix product, over all the tokens routed to it:
in numerics ggml all of them in two kernel calls, as ggml's mul_mat_id (grouped_experts,
kernels/moe_ggml.py); in numerics exact one expert after another, a few tokens through the matvec
kernels one by one and more through BLAS on the expert's weights decoded to float32 tiles.

Where transformers differs, the GGUF semantics are llama.cpp's, followed here: groups are always
scored by their two best experts (DeepseekV2's group_limited_greedy takes the best one), qwen3moe
and mixtral always renormalise (whatever norm_topk_prob), the renormalising sum is clamped to
MIN_WEIGHTS_SUM (transformers adds 1e-20), and the router runs in the compute dtype (transformers:
always float32). Renormalising comes before scaling in both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from refengine.arch.ffn import GLU, glu
from refengine.gguf import Tensor
from refengine.hparams import HParams, ModelError
from refengine.kernels import bound_expert_matmul, bound_matvec_slices, moe_ggml, ops_ggml
from refengine.nn import FEW_ROWS, Linear, sigmoid, silu, softmax, swiglu
from refengine.threads import integer_kernels

# A DecoderModel's emit(name, x, il): shows an intermediate tensor to the forward pass's observer.
Emit = Callable[[str, np.ndarray, int | None], np.ndarray]

# expert_gating_func, as llama.cpp's llama_expert_gating_func_type (gguf.ExpertGatingFuncType).
GATING_FUNCS = {1: "softmax", 2: "sigmoid"}
# llama.cpp clamps the sum of the chosen weights to the smallest normal f16 before dividing by it.
MIN_WEIGHTS_SUM = 6.103515625e-5
# Numerics exact: an expert's batch of fewer tokens runs them one by one through the matvec kernels. Measured on
# one thread, a 512 x 1024 Q4_K expert tensor: 2 tokens 68 us against 151 decoding it for BLAS, 3: 102 against 205,
# 4: 135 against 133.
EXACT_MATVEC_TOKENS = 4


@dataclass(frozen=True)
class MoEConfig:
    n_expert: int  # expert_count
    n_expert_used: int  # expert_used_count: experts per token
    n_ff_exp: int  # width of one expert
    gating: str  # "softmax" or "sigmoid"
    weights_norm: bool  # renormalise the chosen experts' weights to sum to 1
    weights_scale: float  # then multiply them by this (routed_scaling_factor)
    n_group: int  # expert_group_count: experts are chosen only in the best n_group_used groups (0: no groups)
    n_group_used: int
    n_expert_shared: int  # expert_shared_count: one always-on FFN n_expert_shared * n_ff_exp wide (0: none)

    @classmethod
    def from_gguf(cls, hp: HParams, n_ff_exp: int, routing_keys: bool) -> MoEConfig:
        """The expert keys of hp's file. routing_keys=False is llama.cpp's llama (mixtral) and qwen3moe
        graphs, which pass build_moe_ffn softmax gating and renormalised, unscaled weights whatever the
        file says; True reads expert_gating_func, expert_weights_norm/_scale and expert_shared_count as
        llama_model_deepseek2::load_arch_hparams does (old DeepSeek-V2 files lack the gating key: softmax)."""
        path, arch = hp.gguf.path, hp.arch
        n_expert, n_used = hp.int("expert_count"), hp.int("expert_used_count")
        gating, weights_norm, weights_scale, n_shared = "softmax", True, 1.0, 0
        if routing_keys:
            func = hp.int("expert_gating_func", 0) or 1
            if func not in GATING_FUNCS:
                raise ModelError(f"{path}: {arch}.expert_gating_func is {func}, not one of {GATING_FUNCS}")
            gating = GATING_FUNCS[func]
            weights_norm = hp.bool("expert_weights_norm", False)
            # Absent or 0 means no scaling: llama.cpp passes scale_w = (expert_weights_scale != 0).
            weights_scale = hp.float("expert_weights_scale", 0.0, minimum=0.0) or 1.0
            n_shared = hp.int("expert_shared_count")
        config = cls(
            n_expert=n_expert,
            n_expert_used=n_used,
            n_ff_exp=n_ff_exp,
            gating=gating,
            weights_norm=weights_norm,
            weights_scale=weights_scale,
            n_group=hp.int("expert_group_count", 0),
            n_group_used=hp.int("expert_group_used_count", 0),
            n_expert_shared=n_shared,
        )
        config.check(path, arch)
        return config

    @property
    def grouped(self) -> bool:
        return self.n_group > 1  # one group is no limit (llama.cpp: n_expert_groups > 1)

    def check(self, path, arch: str) -> None:
        """What llama.cpp's load_hparams asserts, and what group-limited routing needs, as errors naming the keys."""

        def key(name: str) -> str:
            return f"{arch}.{name}"

        if not 0 < self.n_expert_used <= self.n_expert:
            raise ModelError(
                f"{path}: {key('expert_used_count')} is {self.n_expert_used}, "
                f"not between 1 and {key('expert_count')} ({self.n_expert})"
            )
        if self.n_ff_exp < 1:
            raise ModelError(f"{path}: the experts' feed-forward length is {self.n_ff_exp}")
        if not self.grouped:
            return
        per_group = self.n_expert // self.n_group
        if self.n_expert % self.n_group:
            raise ModelError(
                f"{path}: {key('expert_group_count')} ({self.n_group}) does not divide "
                f"{key('expert_count')} ({self.n_expert})"
            )
        if not 0 < self.n_group_used < self.n_group:
            raise ModelError(
                f"{path}: {key('expert_group_used_count')} is {self.n_group_used}, "
                f"not between 1 and {key('expert_group_count')} - 1 ({self.n_group - 1})"
            )
        if per_group < 2:  # a group is scored by its two best experts
            raise ModelError(f"{path}: {key('expert_group_count')} ({self.n_group}) leaves groups of one expert")
        if self.n_group_used * per_group < self.n_expert_used:
            raise ModelError(
                f"{path}: {key('expert_group_used_count')} ({self.n_group_used}) groups of {per_group} experts "
                f"hold fewer than {key('expert_used_count')} ({self.n_expert_used})"
            )


@dataclass(frozen=True)
class ExpertGroups:
    """A batch's (token, slot) entries sorted by expert, tokens in order within one: ggml's mul_mat_id groups
    them so (its matrix_rows), and each expert then runs once over its group."""

    experts: np.ndarray  # (n_groups,) int64: the experts chosen at least once, ascending
    starts: np.ndarray  # (n_groups + 1,) int64: expert experts[g] takes the entries starts[g] .. starts[g + 1] - 1
    tokens: np.ndarray  # (n_entries,) int64: each entry's token
    position: np.ndarray  # (n_tok, n_expert_used) int64: the entry of each token's slot

    @classmethod
    def of(cls, chosen: np.ndarray, n_expert: int) -> ExpertGroups:
        """chosen (n_tok, n_expert_used): each token's experts, as route gives them."""
        flat = chosen.ravel()  # (n_entries,): entry t * n_expert_used + slot
        order = np.argsort(flat, kind="stable")  # (n_entries,) the entries, by expert
        counts = np.bincount(flat, minlength=n_expert)  # (n_expert,)
        experts = np.flatnonzero(counts)
        starts = np.zeros(len(experts) + 1, dtype=np.int64)
        np.cumsum(counts[experts], out=starts[1:])
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        return cls(experts, starts, order // chosen.shape[1], position.reshape(chosen.shape))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, largest first (ties: the lower index): (n, k)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def route(
    logits: np.ndarray, c: MoEConfig, exp_probs_b: np.ndarray | None, numerics: str = "exact"
) -> tuple[np.ndarray, np.ndarray]:
    """Choose each token's experts from its router logits (n_tok, n_expert), as build_moe_ffn does.
    Returns the chosen experts (n_tok, n_expert_used), best first, and their weights (same shape).
    numerics "ggml": the probabilities as ggml_soft_max / ggml_sigmoid compute them, and the weights'
    sum in double, as ggml_sum_rows."""
    n_tok = logits.shape[0]
    if numerics == "ggml":
        probs = np.empty_like(logits)  # (n_tok, n_expert)
        if c.gating == "softmax":
            kernel = ops_ggml.softmax_rows if n_tok >= FEW_ROWS else ops_ggml.softmax_rows_few
            kernel(np.ascontiguousarray(logits), np.float32(1), probs)
        else:
            ops_ggml.sigmoid_rows(np.ascontiguousarray(logits), probs)
    else:
        probs = softmax(logits) if c.gating == "softmax" else sigmoid(logits)  # (n_tok, n_expert)
    # DeepSeek-V3's bias moves which experts are chosen, not how much they weigh.
    scores = probs if exp_probs_b is None else probs + exp_probs_b  # (n_tok, n_expert)
    if c.grouped:
        # A group scores the sum of its two best experts; the others' experts cannot be chosen.
        grouped = scores.reshape(n_tok, c.n_group, -1)  # (n_tok, n_group, experts per group)
        group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)  # (n_tok, n_group)
        kept = np.zeros((n_tok, c.n_group), dtype=bool)
        np.put_along_axis(kept, top_k(group_scores, c.n_group_used), True, axis=-1)
        scores = np.where(kept[..., None], grouped, -np.inf).reshape(n_tok, c.n_expert)
    chosen = top_k(scores, c.n_expert_used)  # (n_tok, n_expert_used)
    weights = np.take_along_axis(probs, chosen, axis=-1)  # (n_tok, n_expert_used)
    if c.weights_norm:
        if numerics == "ggml":
            total = np.zeros(n_tok)  # float64, the slots added in order, then rounded to float32
            for k in range(weights.shape[1]):
                total += weights[:, k]
            total = total.astype(weights.dtype)[:, None]
        else:
            total = weights.sum(axis=-1, keepdims=True)
        weights = weights / np.maximum(total, weights.dtype.type(MIN_WEIGHTS_SUM))
    if c.weights_scale != 1.0:
        weights = weights * weights.dtype.type(c.weights_scale)
    return chosen, weights


class MoE:
    """One layer's mixture of experts: router, routed experts and shared experts."""

    def __init__(self, t: dict[str, Tensor | None], c: MoEConfig, n_embd: int, dtype, numerics: str = "exact"):
        """t: the layer's tensors by role, shapes checked (Architecture.tensors_of)."""
        self.config, self.n_embd, self.numerics = c, n_embd, numerics
        self.ffn_gate_inp = Linear(t["ffn_gate_inp"], numerics=numerics)  # (n_expert, n_embd)
        # ggml numerics: an F32 router's weights (n_expert, n_embd) for a batch's logits in tinyBLAS's order, the
        # Linear's numbers faster (moe_ggml.router_logits), where llamafile's sgemm takes the shape; else None
        router = self.ffn_gate_inp
        tinyblas = router.ggml_type == GGMLQuantizationType.F32 and router.n_in % 16 == 0 and router.n_out % 4 == 0
        self.router_f32 = router.rows.view(np.float32) if numerics == "ggml" and tinyblas else None
        bias = t.get("exp_probs_b.bias")
        self.exp_probs_b = None if bias is None else bias.to_numpy().astype(dtype)  # (n_expert,) compute dtype
        # The 3-D expert tensors, kept as tensors: an expert's Linear is made when it is first chosen.
        self.ffn_gate_exps: Tensor = t["ffn_gate_exps"]  # (n_expert, n_ff_exp, n_embd)
        self.ffn_up_exps: Tensor = t["ffn_up_exps"]  # (n_expert, n_ff_exp, n_embd)
        self.ffn_down_exps: Tensor = t["ffn_down_exps"]  # (n_expert, n_embd, n_ff_exp)
        self.experts: dict[int, tuple[Linear, Linear, Linear]] = {}
        self.expert_slices: dict[tuple, Linear | tuple[Linear, Linear]] = {}  # a worker's rows of an expert
        # Who runs the routed experts: None, every expert here, in turn; or an object with
        # run(moe, experts, inputs) -> outputs, layer_input(x) -> x and combine(routed sum) -> routed sum:
        # refengine.numa's ExpertDispatch (--numa shard, each expert on the pool of the node that holds it)
        # or SplitDispatch (--numa split, each node its rows of each), refengine.distributed's RankDispatch
        # (MPI: each rank its own experts, rank 0's input, the partial sums added over the ranks).
        self.dispatch = None
        # ggml numerics: a decoded token's experts in one call per tensor (decode_experts), or None
        self.slices = None
        if numerics == "ggml":
            bound = [bound_matvec_slices(t.ggml_type, t.data, t.shape[1]) for t in
                     (self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps)]  # fmt: skip
            self.slices = tuple(bound) if all(b is not None for b in bound) else None
        # ggml numerics: a batch's experts in two kernel calls, gate, up and swiglu, then down (grouped_experts);
        # None when a type has no such kernel, or gate and up differ in type
        self.grouped = None
        gate, up, down = self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps
        if numerics == "ggml" and gate.ggml_type == up.ggml_type:
            bound = (
                bound_expert_matmul(gate.ggml_type, gate.data, c.n_ff_exp, up_rows=up.data),
                bound_expert_matmul(down.ggml_type, down.data, n_embd),
            )
            self.grouped = bound if all(b is not None for b in bound) else None
        self.ffn_shexp = None  # ffn_{gate,up,down}_shexp: the shared experts, one FFN every token goes through
        if c.n_expert_shared:
            self.ffn_shexp = GLU.from_tensors(t, numerics, suffix="_shexp")

    def expert(self, e: int) -> tuple[Linear, Linear, Linear]:
        """Expert e's (ffn_gate, ffn_up, ffn_down), views of its rows of the mapping, made when first
        chosen: a run holds only the experts its tokens were routed to (building all of DeepSeek-R1's
        58 x 256 up front would take ~60 ms, 1.3 us a Linear, so this is about memory, not speed)."""
        if e not in self.experts:
            ff, embd = self.config.n_ff_exp, self.n_embd
            self.experts[e] = (
                Linear(
                    self.ffn_gate_exps, slice(e * ff, (e + 1) * ff), self.numerics, expert=True
                ),  # (n_ff_exp, n_embd)
                Linear(self.ffn_up_exps, slice(e * ff, (e + 1) * ff), self.numerics, expert=True),  # (n_ff_exp, n_embd)
                Linear(
                    self.ffn_down_exps, slice(e * embd, (e + 1) * embd), self.numerics, expert=True
                ),  # (n_embd, n_ff_exp)
            )
        return self.experts[e]

    def __call__(self, x: np.ndarray, emit: Emit | None = None, il: int | None = None) -> np.ndarray:
        """(n_tok, n_embd) -> (n_tok, n_embd). emit(name, x, il), if given, sees what build_moe_ffn names: the
        router's logits, the chosen experts, their weights (named after the last step applied to them), and
        with shared experts the routed sum (ffn_moe_out) and the shared experts' output (ffn_shexp)."""
        if self.dispatch is not None:
            x = self.dispatch.layer_input(x)  # MPI: every rank takes rank 0's input, and so routes as it does
        logits = self.router_logits(x)  # (n_tok, n_expert)
        chosen, weights = route(logits, self.config, self.exp_probs_b, self.numerics)  # (n_tok, n_expert_used) each
        if emit is not None:
            emit("ffn_moe_logits", logits, il)
            emit("ffn_moe_topk", chosen, il)
            emit(self.weights_name, weights, il)
        out = np.zeros_like(x)  # (n_tok, n_embd)
        if len(x) == 1 and self.dispatch is None and self.slices is not None:  # decoding, ggml numerics
            self.decode_experts(chosen[0], weights[0], x, out[0])
        elif len(x) == 1:  # decoding: the token's experts in turn, each a fused matvec
            experts = chosen[0].tolist()
            for weight, y in zip(weights[0], self.run_experts(experts, [x] * len(experts)), strict=True):
                out += weight * y
        elif self.dispatch is None and self.grouped is not None:  # a batch, ggml numerics: every expert at once
            self.grouped_experts(chosen, weights, x, out)
        else:  # a batch: each chosen expert once, as one matrix product over the tokens routed to it
            experts = np.unique(chosen).tolist()
            routed = [np.nonzero(chosen == e) for e in experts]  # (tokens, rank); a token picks an expert once
            ys = self.run_experts(experts, [x[tokens] for tokens, _ in routed])  # (n_routed, n_embd) each
            weighted = np.empty((*chosen.shape, x.shape[1]), dtype=x.dtype)  # (n_tok, n_expert_used, n_embd)
            for (tokens, rank), y in zip(routed, ys, strict=True):
                weighted[tokens, rank] = y * weights[tokens, rank, None]
            # each token's experts added in the order it chose them, as build_moe_ffn's chain of ggml_add
            out[:] = weighted[:, 0]
            for rank in range(1, chosen.shape[1]):
                out += weighted[:, rank]
        if self.dispatch is not None:
            out = self.dispatch.combine(out)  # MPI: the sum of the ranks' partial outputs (one allreduce)
        if self.ffn_shexp is not None:
            if emit is not None:
                emit("ffn_moe_out", out, il)
            shared = self.ffn_shexp(x)
            out += shared if emit is None else emit("ffn_shexp", shared, il)
        return out

    def router_logits(self, x: np.ndarray) -> np.ndarray:
        """ffn_gate_inp(x): (n_tok, n_embd) -> (n_tok, n_expert)."""
        if self.router_f32 is None or len(x) < 2 or x.dtype != np.float32:  # tinyBLAS takes batches of 2 or more
            return self.ffn_gate_inp(x)
        logits = np.empty((len(x), self.config.n_expert), dtype=np.float32)
        with integer_kernels():
            moe_ggml.router_logits(self.router_f32, np.ascontiguousarray(x), logits)
        return logits

    @property
    def weights_name(self) -> str:
        """llama.cpp's name of the experts' final weights: after the last step build_moe_ffn applied."""
        if self.config.weights_scale != 1.0:
            return "ffn_moe_weights_scaled"
        return "ffn_moe_weights_norm" if self.config.weights_norm else "ffn_moe_weights"

    def decode_experts(self, experts: np.ndarray, weights: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """One token's chosen experts (n_used,) in four kernel calls, whatever their number: every gate, every up,
        the activations, every down (kernels.bound_matvec_slices); out (n_embd,) = the weighted outputs added in
        the order chosen. The same numbers as the experts' Linears one by one, to the bit."""
        gate_exps, up_exps, down_exps = self.slices
        k, ff = len(experts), self.config.n_ff_exp
        gate, up = np.empty((k, ff), dtype=np.float32), np.empty((k, ff), dtype=np.float32)
        gate_exps(experts, x, gate)
        up_exps(experts, x, up)
        h = swiglu(gate, up, self.numerics)  # (n_used, n_ff_exp)
        y = np.empty((k, self.n_embd), dtype=np.float32)
        down_exps(experts, h, y)
        out[:] = y[0] * weights[0]
        for j in range(1, k):
            out += y[j] * weights[j]

    def grouped_experts(self, chosen: np.ndarray, weights: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """A batch's routed experts as ggml's mul_mat_id runs them: the entries grouped by expert (ExpertGroups),
        every chosen expert's gate, up and swiglu in one kernel call (the activations quantized once), every down in
        another, then out (n_tok, n_embd) = each token's weighted outputs added in the order chosen. The same
        numbers as the experts' Linears one by one (bound_matmul with expert=True), to the bit."""
        gate_up, down = self.grouped
        groups = ExpertGroups.of(chosen, self.config.n_expert)
        n_entries = len(groups.tokens)
        h = np.empty((n_entries, self.config.n_ff_exp), dtype=np.float32)  # (n_entries, n_ff_exp) each entry's swiglu
        y = np.empty((n_entries, self.n_embd), dtype=np.float32)  # (n_entries, n_embd) each entry's expert output
        with integer_kernels():  # inside a batch's step BLAS holds the cores; no BLAS runs here
            gate_up(groups.experts, groups.starts, groups.tokens, np.ascontiguousarray(x), h)  # silu(gate) * up
            down(groups.experts, groups.starts, np.arange(n_entries), h, y)  # entry i reads row i of h
            moe_ggml.weighted_sum(y, groups.position, weights, out)

    def run_experts(self, experts: list[int], inputs: list[np.ndarray]) -> Iterator[np.ndarray]:
        """swiglu of each expert on its input (n_routed, n_embd) -> (n_routed, n_embd), in order. With
        `dispatch` the workers compute them; every element is computed as run_expert computes it, and the
        caller sums the outputs in the same order either way, so the result is the same to the bit."""
        if self.dispatch is None:
            return (self.run_expert(e, xe) for e, xe in zip(experts, inputs, strict=True))
        return iter(self.dispatch.run(self, experts, inputs))

    def run_expert(self, e: int, x: np.ndarray) -> np.ndarray:
        """Expert e's swiglu on its tokens x (n_routed, n_embd). Numerics exact, float32, fewer than
        EXACT_MATVEC_TOKENS tokens: each through the fused matvec kernels (Linear's one-token path), which read
        the expert's blocks once a token instead of decoding its whole weight to float32 tiles for BLAS."""
        if self.numerics == "exact" and x.dtype == np.float32 and 1 < len(x) < EXACT_MATVEC_TOKENS:
            return np.concatenate([glu(*self.expert(e), x[i : i + 1]) for i in range(len(x))])
        return glu(*self.expert(e), x)

    def gate_up_rows(self, e: int, ff: range, x: np.ndarray, h: np.ndarray) -> None:
        """h[:, ff] = silu(ffn_gate[ff] x) * ffn_up[ff] x for expert e: rows ff of its intermediate features,
        x (n_tok, n_embd), h (n_tok, n_ff_exp). One worker's first phase under a row split (refengine.partition)."""
        key = ("ff", e, ff.start, ff.stop)
        if key not in self.expert_slices:
            first = e * self.config.n_ff_exp
            rows = slice(first + ff.start, first + ff.stop)
            self.expert_slices[key] = (
                self.rows_linear(self.ffn_gate_exps, rows),  # (len(ff), n_embd)
                self.rows_linear(self.ffn_up_exps, rows),  # (len(ff), n_embd)
            )
        gate, up = self.expert_slices[key]
        h[:, ff.start : ff.stop] = silu(gate(x)) * up(x)

    def down_rows(self, e: int, out: range, h: np.ndarray, y: np.ndarray) -> None:
        """y[:, out] = ffn_down[out] h for expert e: rows out of its output from its whole intermediate
        features h (n_tok, n_ff_exp), y (n_tok, n_embd). One worker's second phase under a row split."""
        key = ("out", e, out.start, out.stop)
        if key not in self.expert_slices:
            rows = slice(e * self.n_embd + out.start, e * self.n_embd + out.stop)
            self.expert_slices[key] = self.rows_linear(self.ffn_down_exps, rows)  # (len(out), n_ff_exp)
        y[:, out.start : out.stop] = self.expert_slices[key](h)

    def rows_linear(self, tensor: Tensor, rows: slice) -> Linear:
        """Rows of a 3-D expert tensor as a Linear of their own, in the numerics the block's experts use."""
        return Linear(tensor, rows, self.numerics)
