"""What the forward-pass oracle tests share: the prompts, how llama.cpp turns a prompt into a
scored sequence, refengine's logits for a sequence, the golden files, and the metrics.

Used by tests/test_oracle_llamacpp.py, tests/test_forward_golden.py,
tests/test_oracle_transformers.py and scripts/make_golden_logits.py; the goldens it reads stay in
tests/golden of the source tree. llama_cpp is imported only inside the functions that need it, so
the golden and transformers tests run without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from refengine.session import Session

TESTS_DIR = Path(__file__).resolve().parents[2] / "tests"  # goldens and data live beside the tests
GOLDEN_DIR = TESTS_DIR / "golden"
MODELS = ["gemma3-270m", "smollm2-135m"]
PATH_FIXTURES = {"gemma3-270m": "gemma_path", "smollm2-135m": "smollm_path"}  # from conftest.py

N_GENERATE = 32  # greedy tokens llama.cpp appends to each prompt
TOP_K = 16  # golden log-probs kept per position

# The bar against llama.cpp. Its quantized matmuls round activations to 8 bits, which moves
# its logits by ~0.1 nats from exact ones (transformers agrees with refengine to 1e-4), so
# the comparison is statistical:
MAX_MEAN_KL = 0.02  # nats, mean over a sequence's positions of KL(llama.cpp || refengine)
MIN_TOP1 = 0.93  # share of positions where both pick the same most likely token, per model.
# Per model, over all its prompts (~300 positions), not per prompt: where a model is unsure
# (a favourite at p ~ 0.1-0.2, the runner-up 0.01-0.35 nats behind) llama.cpp's noise alone
# flips the argmax, and some natural prompts have five or six such positions among their ~50
# (gemma: French 88.5%, German 88.9%, Chinese 88.1%), which makes a per-prompt 93% a coin
# toss. Per prompt we ask instead that where llama.cpp is clearly decided, we agree:
DECISIVE_MARGIN = 1.0  # nats between llama.cpp's top two; flips were seen up to 0.35


# -- prompts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    parse_special: bool = False  # chat templates are written with special-token text
    # Positions before this are run but not scored: a long prompt's logits would be
    # hundreds of MB on a 262k vocabulary, and what it is for is the positions past the window.
    score_from_end: int | None = None


PLAIN = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, "
    "a goldsmith from Mainz,"
)
CODE = '''def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list."""
    result = []
    i = j = 0
'''
FRENCH = "La Révolution française a commencé en 1789, lorsque les représentants du tiers état"
QUESTION = "What are three simple ways to save energy at home?"
GEMMA_CHAT = f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
)


def long_prompt() -> str:
    """~700 tokens of a numbered list, ending where the model can copy it again from line 2.

    Longer than gemma3's 512-token sliding window, so the positions scored are ones
    where the local layers must drop the start of the text and the global ones keep it.
    """
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange"]
    animals = ["cat", "dog", "horse", "owl", "fox", "goat", "whale", "crow"]
    things = ["table", "roof", "boat", "bench", "wall", "hill", "bridge"]
    lines = [f"Line {i}: the {colours[i % 7]} {animals[i % 8]} sits on the {things[i % 7]}." for i in range(1, 51)]
    return "\n".join(lines) + "\nLine 2 again: the"


PROMPTS: dict[str, list[Prompt]] = {
    "gemma3-270m": [
        Prompt("plain", PLAIN),
        Prompt("code", CODE),
        Prompt("chat", GEMMA_CHAT, parse_special=True),
        Prompt("french", FRENCH),
        Prompt("long", long_prompt(), score_from_end=64),
    ],
    "smollm2-135m": [
        Prompt("plain", PLAIN),
        Prompt("code", CODE),
        Prompt("chat", CHATML, parse_special=True),
        Prompt("french", FRENCH),
    ],
}
CASES = [(model, p.name) for model in MODELS for p in PROMPTS[model]]  # for pytest.mark.parametrize


def model_path(request, model: str) -> Path:
    """The model's file, through conftest's fixtures, which skip the test when it is not installed."""
    return request.getfixturevalue(PATH_FIXTURES[model])


def prompt(model: str, name: str) -> Prompt:
    return next(p for p in PROMPTS[model] if p.name == name)


# -- metrics --------------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis, in float64 whatever the input's dtype."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logsumexp(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1)
    return top + np.log(np.exp(x - top[..., None]).sum(axis=-1))


def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats for each row of two log-prob arrays (n_pos, n_vocab)."""
    return np.sum(np.exp(logp) * (logp - logq), axis=-1)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Per row, how far the largest entry leads the second: (n_pos,)."""
    best2 = np.partition(logits, -2, axis=-1)[..., -2:]
    return best2[..., 1] - best2[..., 0]


def decisive_disagreements(their_top1, their_margin, our_top1) -> np.ndarray:
    """Positions where the oracle's favourite leads by DECISIVE_MARGIN or more and ours differs.
    Each argument is (n_pos,): token ids, margins in nats (see top2_margin), token ids."""
    return np.flatnonzero((their_margin >= DECISIVE_MARGIN) & (their_top1 != our_top1))


def binned_kl(p_ids: np.ndarray, p_logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p || q) after merging every token outside p's top-k into one "rest" bin, per row.

    Merging outcomes can only lower a KL divergence, so this is a lower bound on the full
    KL: a golden file that keeps only p's top-k still bounds refengine's full KL from below.
    p_ids, p_logp: (n_pos, k); logq: (n_pos, n_vocab) refengine's log-probs.
    """
    q_logp = np.take_along_axis(logq, p_ids, axis=-1)  # (n_pos, k)
    p, q = np.exp(p_logp), np.exp(q_logp)
    head = np.sum(p * (p_logp - q_logp), axis=-1)
    p_rest = np.clip(1 - p.sum(axis=-1), 1e-300, None)
    q_rest = np.clip(1 - q.sum(axis=-1), 1e-300, None)
    return head + p_rest * np.log(p_rest / q_rest)


# -- refengine ------------------------------------------------------------------------------------


@cache
def session(model: str, precision: str) -> Session:
    return Session.load(model, precision)


_F32_LOGITS: dict[tuple, np.ndarray] = {}


def refengine_logits(model: str, precision: str, tokens, first: int = 0) -> np.ndarray:
    """refengine's logits for positions first.. of `tokens`, teacher-forced: (n - first, n_vocab).

    f32 results are kept for the session: the golden test and the live llama.cpp test score
    the same sequences, and a forward on gemma's 262k vocabulary is the slow part of both.
    """
    tokens = tuple(int(t) for t in tokens)
    key = (model, precision, tokens, first)
    if key in _F32_LOGITS:
        return _F32_LOGITS[key]
    s = session(model, precision)
    kv = s.new_cache(len(tokens))
    if first:  # the unscored prefix only fills the cache (and makes one row of logits)
        s.model.forward(np.array(tokens[:first]), kv, all_logits=False)
    logits = s.model.forward(np.array(tokens[first:]), kv, all_logits=True)  # (n - first, n_vocab)
    if precision == "f32":
        logits.flags.writeable = False  # shared between tests
        _F32_LOGITS[key] = logits
    return logits


def first_scored(p: Prompt, n_tokens: int) -> int:
    return 0 if p.score_from_end is None else max(0, n_tokens - p.score_from_end)


# -- llama.cpp ------------------------------------------------------------------------------------


def open_llama(model_path: Path):
    from llama_cpp import Llama

    # 1024 positions hold the longest prompt plus its continuation; logits_all keeps every row.
    return Llama(str(model_path), n_ctx=1024, logits_all=True, n_threads=2, verbose=False)


def llama_cpp_prompt_ids(llm, p: Prompt) -> list[int]:
    # add_bos=True is llama_tokenize's add_special: BOS only if the vocabulary asks for it.
    return llm.tokenize(p.text.encode("utf-8"), add_bos=True, special=p.parse_special)


def llama_cpp_generate_and_score(llm, p: Prompt, n_generate: int = N_GENERATE):
    """llama.cpp continues the prompt greedily, then scores the whole sequence in one eval.

    Returns (n_prompt, tokens, first, logits): the prompt's length, the prompt plus
    n_generate argmax tokens, the first scored position, and llama.cpp's logits for
    positions first.. of the sequence, (n_tokens - first, n_vocab) float32.
    """
    prompt_ids = llama_cpp_prompt_ids(llm, p)
    llm.reset()
    llm.eval(prompt_ids)
    tokens = list(prompt_ids)
    for _ in range(n_generate):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))  # greedy: llama.cpp's own argmax
        llm.eval(tokens[-1:])
    # Score again from scratch as one batch, as refengine will: the logits of incremental
    # decoding differ slightly (other matmul shapes), and they are not what we compare.
    llm.reset()
    llm.eval(tokens)
    first = first_scored(p, len(tokens))
    return len(prompt_ids), tokens, first, np.array(llm.scores[first : len(tokens)], dtype=np.float32)


# -- golden files ---------------------------------------------------------------------------------


def golden_path(model: str) -> Path:
    return GOLDEN_DIR / f"logits_{model}.npz"


@dataclass(frozen=True)
class GoldenCase:
    name: str
    tokens: np.ndarray  # (n_tokens,) prompt then llama.cpp's greedy continuation
    n_prompt: int
    first: int  # first scored position; the arrays below cover positions first..n_tokens-1
    top_ids: np.ndarray  # (n_pos, TOP_K) llama.cpp's most likely next tokens, best first
    top_logprobs: np.ndarray  # (n_pos, TOP_K) their log-probs
    logsumexp: np.ndarray  # (n_pos,) of llama.cpp's raw logits: logit = log-prob + logsumexp


@cache
def load_golden(model: str) -> tuple[dict, dict[str, GoldenCase]]:
    """(metadata, cases by name) from tests/golden/logits_<model>.npz."""
    with np.load(golden_path(model), allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        cases = {}
        for c in meta["cases"]:
            name = c["name"]
            cases[name] = GoldenCase(
                name,
                data[f"{name}.tokens"],
                c["n_prompt"],
                c["first"],
                data[f"{name}.top_ids"],
                data[f"{name}.top_logprobs"],
                data[f"{name}.logsumexp"],
            )
    return meta, cases
