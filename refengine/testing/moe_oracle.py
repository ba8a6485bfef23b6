"""What the MoE tests (tests/test_moe.py) and scripts/make_golden_moe.py share: the tiny MoE models
and their prompts, how a Q4_K_M file is made without llama.cpp, the routing margins of a forward
pass, the bar against llama.cpp, and the golden file.

Why routing margins. llama.cpp rounds the activations entering each quantized matmul to 8 bits,
which moves its hidden states by ~0.5%. Where two experts (or two expert groups) score within a
hair of each other, that is enough to choose another one, and the position's logits jump: on the
tiny deepseek2 model (8 experts in groups of 2, sigmoid gating) a few positions in every 20 have
KL 0.3-2.5 nats while all the others stay below 0.01. Rounding refengine's own activations the
same way does the same to refengine (mean KL 0.01-0.04 against itself, top-1 87-95%), so no exact
engine can meet the bar on those positions. Every jump seen came with a routing margin below
0.015, so for sigmoid-gated models the bar is checked where every routing decision of the
position is clearer than ROUTING_MARGIN, and those must be most of the positions.
A more decisive random router does not remove the near-ties: with router logits 2x and 4x wider
(N(0, 4), N(0, 16)) the sigmoid saturates, and over all positions deepseek2 measured KL 0.035 and
0.074 (0.041 at 1x), deepseek2-kvb 0.041 and 0.047 (0.064).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

import refengine.arch.moe as moe
from refengine.quantize import quantize_file
from refengine.testing import write_tiny_model
from refengine.testing.oracle_utils import GOLDEN_DIR, MAX_MEAN_KL, MIN_TOP1, Prompt

PROMPTS = [
    Prompt("words", "the number 1234 is hello world and the model of the expert layer"),
    Prompt("list", "one two three, then the first layer and the little water"),
]
N_CTX = 128  # a prompt and N_GENERATE tokens fit

# A routing decision closer than this (in the gating function's units: sigmoid or softmax
# probability, after exp_probs_b) may go the other way in llama.cpp: the largest margin seen
# at a jump was 0.0147.
ROUTING_MARGIN = 0.02
MIN_DECIDED = 0.5  # share of positions that must be clear of every near-tie (seen: 0.67 on deepseek2)
GOLDEN_PATH = GOLDEN_DIR / "logits_tiny_moe_q4_k_m.npz"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_q4_k_m(arch: str, folder: Path) -> Path:
    """The tiny model's Q4_K_M file, by refengine's quantizer (byte-identical to llama.cpp's, which
    the golden file's sha256 checks), so that no test needs llama.cpp to have one."""
    f32 = write_tiny_model(arch, folder / f"{arch}-f32.gguf")
    out = folder / f"{arch}-q4_k_m.gguf"
    quantize_file(f32, out, "Q4_K_M")
    return out


# -- routing margins --------------------------------------------------------------------------------


def routing_margin(logits: np.ndarray, c: moe.MoEConfig, exp_probs_b: np.ndarray | None) -> np.ndarray:
    """Per token (n_tok,), how far its routing is from choosing otherwise: the smallest gap between
    the last group kept and the first dropped, and between the last expert chosen and the first not
    (among the kept groups), in the scores selection sees. Written apart from refengine's `route`."""
    logits = np.asarray(logits, dtype=np.float64)
    if c.gating == "softmax":
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
    else:
        probs = 1 / (1 + np.exp(-logits))
    scores = probs if exp_probs_b is None else probs + exp_probs_b
    margins = []
    for s in scores:
        margin = np.inf
        if c.n_group > 1:
            groups = s.reshape(c.n_group, -1)
            group_scores = np.sort(np.sort(groups, axis=-1)[:, -2:].sum(axis=-1))[::-1]
            margin = group_scores[c.n_group_used - 1] - group_scores[c.n_group_used]
            kept = np.argsort(-np.sort(groups, axis=-1)[:, -2:].sum(axis=-1), kind="stable")[: c.n_group_used]
            s = groups[kept].ravel()
        ranked = np.sort(s)[::-1]
        if c.n_expert_used < len(ranked):  # else every candidate is chosen
            margin = min(margin, ranked[c.n_expert_used - 1] - ranked[c.n_expert_used])
        margins.append(margin)
    return np.array(margins)


@contextmanager
def recorded_routing_margins() -> Iterator[list[np.ndarray]]:
    """Within the block, every MoE layer's routing margins (n_tok,) are appended to the list yielded."""
    margins: list[np.ndarray] = []
    route = moe.route

    def recording(logits, c, exp_probs_b, *numerics):
        margins.append(routing_margin(logits, c, exp_probs_b))
        return route(logits, c, exp_probs_b, *numerics)

    moe.route = recording
    try:
        yield margins
    finally:
        moe.route = route


def forward_with_margins(model, tokens) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced logits (n_tok, n_vocab), and per position the smallest routing margin over the
    MoE layers (n_tok,)."""
    with recorded_routing_margins() as margins:
        logits = model.forward(np.asarray(tokens), model.new_cache(N_CTX))
    return logits, np.min(margins, axis=0)


def needs_decided_positions(model) -> bool:
    """Sigmoid gating is the case described above; the softmax-gated tiny models meet the bar everywhere."""
    return model.config.moe.gating == "sigmoid"


@dataclass
class Scores:
    """One model's comparison with llama.cpp over its prompts, position by position."""

    kl: np.ndarray  # (n_pos,) KL(llama.cpp || refengine), exact or a lower bound
    top1: np.ndarray  # (n_pos,) bool, the same most likely token
    margin: np.ndarray  # (n_pos,) routing margin

    def summary(self) -> str:
        decided = self.margin >= ROUTING_MARGIN
        return (
            f"{len(self.kl)} positions: mean KL {self.kl.mean():.4f}, top-1 {self.top1.mean():.1%}; "
            f"routing clear at {decided.mean():.0%}: mean KL {self.kl[decided].mean():.4f}, "
            f"top-1 {self.top1[decided].mean():.1%}"
        )

    def check(self, decided_only: bool) -> None:
        """The bar against llama.cpp: mean KL <= MAX_MEAN_KL and top-1 >= MIN_TOP1, over all
        positions, or with decided_only over those whose routing is clear (see the module doc)."""
        keep = np.ones(len(self.kl), dtype=bool)
        if decided_only:
            keep = self.margin >= ROUTING_MARGIN
            assert keep.mean() >= MIN_DECIDED, f"routing is clear at only {keep.mean():.0%} of the positions"
        assert self.kl[keep].mean() <= MAX_MEAN_KL, self.summary()
        assert self.top1[keep].mean() >= MIN_TOP1, self.summary()


# -- the golden file --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GoldenMoECase:
    tokens: np.ndarray  # (n_tokens,) prompt, then llama.cpp's greedy continuation
    n_prompt: int
    top_ids: np.ndarray  # (n_tokens, TOP_K) llama.cpp's most likely next tokens, best first
    top_logprobs: np.ndarray  # (n_tokens, TOP_K) their log-probs
    logsumexp: np.ndarray  # (n_tokens,) of llama.cpp's logits


@cache
def load_golden_moe() -> tuple[dict, dict[tuple[str, str], GoldenMoECase]]:
    """(metadata, cases by (model, prompt name)) from GOLDEN_PATH (scripts/make_golden_moe.py)."""
    with np.load(GOLDEN_PATH, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        cases = {}
        for model, entry in meta["models"].items():
            for case in entry["cases"]:
                key = f"{model}.{case['name']}"
                cases[model, case["name"]] = GoldenMoECase(
                    data[f"{key}.tokens"],
                    case["n_prompt"],
                    data[f"{key}.top_ids"],
                    data[f"{key}.top_logprobs"],
                    data[f"{key}.logsumexp"],
                )
    return meta, cases
