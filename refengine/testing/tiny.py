"""Tiny synthetic GGUF models: random weights laid out exactly as llama.cpp loads them, so that
architectures whose real models are far too big for this machine (DeepSeek-R1) can be tested.

    write_tiny_model("deepseek2", "ds.gguf")                          # F32, the few-MB preset
    make_tiny_model("qwen3moe", "q.gguf", preset="bigger", qtype="Q4_K_M")
    write_tiny_model("deepseek2", "ds256.gguf", spec=moe_spec(256))   # 256 experts, 8 used

The `arch` names, what llama.cpp sees, and what each one covers:

    name            general.architecture   covers
    llama           llama       GQA, SwiGLU
    qwen2           qwen2       biases on the Q, K and V projections, NEOX rope
    qwen3           qwen3       QK-norm, n_head * head_dim != n_embd
    gemma3          gemma3      sandwich norms, GELU, 5 local : 1 global layers (window 4)
    qwen3moe        qwen3moe    softmax top-k routing, renormalised weights, expert_feed_forward_length
    mixtral         llama       llama with experts, which use feed_forward_length
    deepseek2       deepseek2   MLA, current layout (attn_k_b, attn_v_b, key_length_mla), q_lora,
                                1 dense + 2 MoE layers, a shared expert, sigmoid gating with
                                exp_probs_b, 4 expert groups of which 2 are used, weights norm and
                                scale 2.5, YaRN rope scaling
    deepseek2-kvb   deepseek2   the same model in the older layout: attn_kv_b, no *_mla keys
    deepseek2-lite  deepseek2   q_lora_rank 0 (one attn_q), softmax gating, no groups, no bias, no YaRN

deepseek2 and deepseek2-kvb hold the same weights for the same seed and sizes: attn_k_b and attn_v_b
are cut from the attn_kv_b the other file stores, as convert_hf_to_gguf's DeepseekV2Model cuts
kv_b_proj, so the two files must give the same logits.

Rope in llama.cpp (llama_model_rope_type), and what a loader into transformers must do (which
refengine.testing.hf.to_hf_state_dict does):
- llama, mixtral: NORM mode, rotating adjacent pairs (2i, 2i+1). HF's Llama and Mixtral rotate
  halves (i, i + head_dim/2), which is why convert_hf_to_gguf permutes the rows of attn_q and attn_k
  head by head; loading these files into LlamaForCausalLM / MixtralForCausalLM takes the inverse.
- qwen2, qwen3, qwen3moe, gemma3: NEOX mode (halves), as in HF: the rows are copied as they are.
- deepseek2: NORM mode on the last qk_rope_dim dims of each q head and of attn_kv_a_mqa's output.
  HF DeepseekV3 (rope_interleave=True, its default) reorders q and k alike before rotating halves,
  and DeepseekV2 rotates adjacent pairs itself, so both compute llama.cpp's q.k: no permutation.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, fields, replace
from itertools import chain, count
from pathlib import Path

import gguf
import numpy as np

from refengine.arch.declarations import ARCHITECTURES, Architecture, Sizes
from refengine.errors import RefengineError
from refengine.tokenizer import BYTE_CHARS


class TinyModelError(RefengineError):
    """A spec llama.cpp would refuse, an unknown name, or a failed quantization."""


@dataclass(frozen=True)
class TinySpec:
    """The sizes and switches of one tiny model, each written as GGUF keys or tensor shapes.
    Fields an architecture has no use for are ignored when writing it."""

    n_vocab: int = 512
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64  # key_length = value_length (not deepseek2)
    n_ff: int = 512  # feed_forward_length: dense FFNs, and mixtral's experts
    n_ctx_train: int = 256
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_linear_factor: float = 0.0  # rope.scaling.type linear with this factor (0: none); not deepseek2
    rope_freq_factors: bool = False  # a rope_freqs.weight tensor, as llama3's converter writes (llama only)
    # Experts (n_expert 0: a dense model).
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0  # expert_feed_forward_length (qwen3moe, deepseek2)
    # deepseek2 routing.
    n_expert_shared: int = 0
    n_leading_dense: int = 0  # leading_dense_block_count: dense FFN in the first layers
    gating: str = "softmax"  # expert_gating_func: "softmax" (1) or "sigmoid" (2)
    n_expert_groups: int = 0  # group-limited routing: pick n_group_used groups, then experts in them
    n_group_used: int = 0
    weights_norm: bool = False  # expert_weights_norm: renormalise the chosen experts' weights
    weights_scale: float = 1.0  # expert_weights_scale (routed_scaling_factor)
    exp_probs_b: bool = False  # a per-expert bias added to the scores for selection only
    # deepseek2 multi-head latent attention.
    q_lora_rank: int = 0  # 0: one attn_q instead of attn_q_a -> attn_q_a_norm -> attn_q_b
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0  # rope.dimension_count
    v_head_dim: int = 0
    mla_split: bool = True  # attn_k_b + attn_v_b + *_mla keys (current converter); False: attn_kv_b
    # deepseek2 YaRN rope scaling (factor 0: none).
    yarn_factor: float = 0.0
    yarn_orig_ctx: int = 0
    yarn_mscale_all_dim: float = 0.0
    # gemma3: the local layers' attention window.
    sliding_window: int = 0


GATING_FUNC = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # DeepSeek-V3's values, written as its converter does
# Spread of the logits over the vocabulary, in nats: wide enough that top-1s stand well apart,
# narrow enough that softmax does not saturate.
LOGIT_SPREAD = 3.0


# -- presets --------------------------------------------------------------------------------------

_LLAMA = TinySpec()
_QWEN3 = replace(_LLAMA, n_head=8, rope_base=1e6)
_DEEPSEEK2 = TinySpec(
    n_layer=3,
    n_leading_dense=1,
    n_expert=8,
    n_expert_used=2,
    n_ff_exp=256,
    n_expert_shared=1,
    gating="sigmoid",
    n_expert_groups=4,
    n_group_used=2,
    weights_norm=True,
    weights_scale=2.5,
    exp_probs_b=True,
    q_lora_rank=256,
    kv_lora_rank=256,
    qk_nope_dim=64,
    qk_rope_dim=32,
    v_head_dim=64,
    yarn_factor=4.0,
    yarn_orig_ctx=64,
    yarn_mscale_all_dim=1.0,
)
_DEEPSEEK2_BIG = replace(
    _DEEPSEEK2,
    n_vocab=4096,
    n_embd=1024,
    n_layer=4,
    n_head=8,
    n_ff=2048,
    n_expert=16,
    n_expert_used=4,
    q_lora_rank=512,
)
_LITE = dict(
    q_lora_rank=0,
    gating="softmax",
    n_expert_groups=0,
    n_group_used=0,
    weights_norm=False,
    weights_scale=1.0,
    exp_probs_b=False,
    yarn_factor=0.0,
    yarn_orig_ctx=0,
    yarn_mscale_all_dim=0.0,
)
_BIG = dict(n_vocab=4096, n_embd=1024, n_layer=4, n_head=16, n_head_kv=4, n_ff=2816)

# tiny: 6-22 MB at F32, 1-3.5 MB as Q4_K_M; bigger: 214-277 MB at F32, 33-44 MB as Q4_K_M.
PRESETS: dict[str, dict[str, TinySpec]] = {
    "llama": {"tiny": _LLAMA, "bigger": replace(_LLAMA, **_BIG)},
    "qwen2": {"tiny": _LLAMA, "bigger": replace(_LLAMA, **_BIG)},
    "qwen3": {"tiny": _QWEN3, "bigger": replace(_QWEN3, **_BIG, head_dim=128)},
    "gemma3": {
        "tiny": replace(_LLAMA, n_layer=6, n_head_kv=1, rope_base=1e6, sliding_window=4),
        "bigger": replace(
            _LLAMA,
            **(_BIG | dict(n_layer=6, n_head=8, n_head_kv=1, head_dim=128, n_ff=2048)),
            rope_base=1e6,
            sliding_window=128,
        ),
    },
    "qwen3moe": {
        "tiny": replace(_QWEN3, n_expert=8, n_expert_used=2, n_ff_exp=256),
        "bigger": replace(_QWEN3, **_BIG, n_expert=16, n_expert_used=4, n_ff_exp=256),
    },
    "mixtral": {
        "tiny": replace(_LLAMA, n_expert=4, n_expert_used=2),
        "bigger": replace(_LLAMA, **(_BIG | dict(n_ff=512)), n_expert=8, n_expert_used=2),
    },
    "deepseek2": {"tiny": _DEEPSEEK2, "bigger": _DEEPSEEK2_BIG},
    "deepseek2-kvb": {"tiny": replace(_DEEPSEEK2, mla_split=False), "bigger": replace(_DEEPSEEK2_BIG, mla_split=False)},
    "deepseek2-lite": {"tiny": replace(_DEEPSEEK2, **_LITE), "bigger": replace(_DEEPSEEK2_BIG, **_LITE)},
}
# Each tiny model's declaration (refengine.arch.declarations): what it writes, and what llama.cpp sees.
ARCHITECTURE: dict[str, Architecture] = {
    name: ARCHITECTURES["llama" if name == "mixtral" else name.split("-")[0]] for name in PRESETS
}
GGUF_ARCH = {name: a.name for name, a in ARCHITECTURE.items()}
MODELS = list(PRESETS)
MOE_MODELS = [name for name in MODELS if PRESETS[name]["tiny"].n_expert]


def sizes_of(arch: Architecture, s: TinySpec) -> Sizes:
    """The sizes the declaration's shapes are made of, and the optional tensors this spec writes."""
    optional = {"output"}  # every file has its own head (see write_tensors)
    optional |= {"qk_norm"} if arch.qk_norm else set()
    optional |= {"attn_bias"} if arch.attn_bias else set()
    optional |= {"rope_freqs"} if s.rope_freq_factors else set()
    optional |= {"exp_probs_b"} if s.exp_probs_b else set()
    same = {f.name: getattr(s, f.name) for f in fields(Sizes) if hasattr(s, f.name)}
    n_ff_exp = s.n_ff if arch.expert_ff_key == "feed_forward_length" else s.n_ff_exp
    n_rot = s.qk_rope_dim if arch.mla else s.head_dim
    return Sizes(**same | dict(n_rot=n_rot, n_ff_exp=n_ff_exp, optional=frozenset(optional)))


def expected_shapes(arch: str, spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """Tensor name -> numpy shape of tiny model `arch` with `spec`, in file order."""
    a = ARCHITECTURE[arch]
    return a.expected_shapes(sizes_of(a, spec))


def moe_spec(n_expert: int, n_expert_used: int = 8) -> TinySpec:
    """A deepseek2 model whose one MoE layer has `n_expert` experts, `n_expert_used` of them active:
    the same active parameters whatever n_expert, for "decode cost follows active parameters".
    From 64 experts on it routes as DeepSeek-R1 does, through 8 groups of which 4 are used.
    File sizes, F32 / Q4_K_M: 37 / 6 MB at 8 experts, 125 / 20 MB at 64, 427 / 70 MB at 256."""
    groups = 8 if n_expert >= 64 else 0
    return replace(
        _DEEPSEEK2,
        n_vocab=2048,
        n_embd=512,
        n_layer=2,
        n_head=8,
        n_ff=1024,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_expert_groups=groups,
        n_group_used=groups // 2,
    )


def check_spec(arch: str, spec: TinySpec) -> None:
    """Refuse what llama.cpp's loader would refuse (llama-model.cpp load_hparams asserts, the
    per-architecture loaders), with the field that is wrong."""
    spec_for(arch)  # a known name
    s, a = spec, ARCHITECTURE[arch]
    problems = []
    if s.n_vocab < 258 or s.n_embd < 1 or s.n_layer < 1 or s.n_head < 1:
        problems.append("n_vocab must hold the 256 byte tokens and BOS/EOS; sizes must be positive")
    if a.mla:
        if min(s.kv_lora_rank, s.qk_nope_dim, s.qk_rope_dim, s.v_head_dim) < 1 or s.qk_rope_dim % 2:
            problems.append("MLA needs kv_lora_rank, qk_nope_dim, v_head_dim > 0 and an even qk_rope_dim > 0")
        if s.n_expert_shared < 1:
            problems.append("deepseek2 loads its shared expert unconditionally: n_expert_shared >= 1")
        if not 0 <= s.n_leading_dense < s.n_layer:
            problems.append("n_leading_dense must leave at least one MoE layer")
    elif s.n_head % max(s.n_head_kv, 1) or s.head_dim % 2 or s.n_head_kv < 1:
        problems.append("n_head must be a multiple of n_head_kv, head_dim even")
    if a.sliding_window_pattern and s.sliding_window < 1:
        problems.append(f"{arch} needs a sliding_window")
    if arch in MOE_MODELS:
        if not 0 < s.n_expert_used <= s.n_expert:
            problems.append("need 0 < n_expert_used <= n_expert")
        if a.expert_ff_key != "feed_forward_length" and s.n_ff_exp < 1:
            problems.append("n_ff_exp (expert_feed_forward_length) must be positive")
    elif s.n_expert:
        problems.append(f"{arch} is dense: n_expert must be 0")
    if s.n_expert_groups:
        per_group = s.n_expert // s.n_expert_groups
        if s.n_expert % s.n_expert_groups or per_group < 2 or not 0 < s.n_group_used < s.n_expert_groups:
            problems.append("expert groups: n_expert divisible into groups of >= 2, 0 < n_group_used < groups")
        elif s.n_group_used * per_group < s.n_expert_used:
            problems.append("the groups used must hold at least n_expert_used experts")
    if s.gating not in GATING_FUNC:
        problems.append(f"gating must be one of {', '.join(GATING_FUNC)}")
    if problems:
        raise TinyModelError(f"{arch} spec: " + "; ".join(problems))


# -- tokenizer --------------------------------------------------------------------------------------

# Words whose byte-level pieces become merged tokens, with and without a leading space.
WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know number hello world model token layer expert"
).split()


def tiny_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer reads it: (tokens, token types,
    merges). Ids 0-255 are the bytes in GPT-2's printable form (every byte must have a token, since
    llama.cpp falls back to them); then words and numbers are built up one character at a time, each
    step one merge; the last two ids are BOS and EOS."""
    tokens = list(BYTE_CHARS)
    known = set(tokens)
    merges = []
    # After the words, the numbers 10, 11, ... add one token each (their prefix is already one),
    # so any vocabulary size can be filled.
    words = chain((prefix + word for word in WORDS for prefix in ("", " ")), map(str, count(10)))
    while len(tokens) < n_vocab - 2:
        piece = "".join(BYTE_CHARS[b] for b in next(words).encode())
        for end in range(2, len(piece) + 1):
            if piece[:end] not in known and len(tokens) < n_vocab - 2:
                merges.append(f"{piece[: end - 1]} {piece[end - 1]}")
                tokens.append(piece[:end])
                known.add(piece[:end])
    tokens += ["<|bos|>", "<|eos|>"]
    types = [gguf.TokenType.NORMAL] * (n_vocab - 2) + [gguf.TokenType.CONTROL] * 2
    return tokens, [int(t) for t in types], merges


def write_tokenizer(w: gguf.GGUFWriter, n_vocab: int) -> None:
    tokens, types, merges = tiny_vocab(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(n_vocab - 2)
    w.add_eos_token_id(n_vocab - 1)
    w.add_add_bos_token(True)


# -- metadata ---------------------------------------------------------------------------------------


def write_hparams(w: gguf.GGUFWriter, a: Architecture, s: TinySpec) -> None:
    """The {arch}.* keys that llama.cpp's load_hparams and the architecture's loader read."""
    w.add_vocab_size(s.n_vocab)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_layer_norm_rms_eps(s.norm_eps)
    w.add_rope_freq_base(s.rope_base)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        if a.expert_ff_key == "expert_feed_forward_length":  # mixtral's experts are feed_forward_length wide
            w.add_expert_feed_forward_length(s.n_ff_exp)
    if a.mla:
        write_deepseek2_hparams(w, s)
        return
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)  # llama.cpp insists on the full head for the llama arch
    if s.rope_linear_factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s.rope_linear_factor)
    if a.sliding_window_pattern:
        w.add_sliding_window(s.sliding_window)


def write_deepseek2_hparams(w: gguf.GGUFWriter, s: TinySpec) -> None:
    """As convert_hf_to_gguf's DeepseekV2Model writes them; llama_model_deepseek2::load_arch_hparams."""
    w.add_leading_dense_block_count(s.n_leading_dense)
    # Written even as 0: llama.cpp makes the key optional only for layer counts it knows as "lite"
    # models (26, 27); 0 selects the single attn_q matrix.
    w.add_q_lora_rank(s.q_lora_rank)
    w.add_kv_lora_rank(s.kv_lora_rank)
    w.add_rope_dimension_count(s.qk_rope_dim)
    if s.mla_split:
        # MLA as MQA over the latent: one KV head whose key is the latent plus the rope part and
        # whose value is the latent; the *_mla keys give the per-head sizes after decompression.
        w.add_head_count_kv(1)
        w.add_key_length(s.kv_lora_rank + s.qk_rope_dim)
        w.add_value_length(s.kv_lora_rank)
        w.add_key_length_mla(s.qk_nope_dim + s.qk_rope_dim)
        w.add_value_length_mla(s.v_head_dim)
    else:
        # The older converter: plain multi-head attention after attn_kv_b decompresses the latent.
        w.add_head_count_kv(s.n_head)
        w.add_key_length(s.qk_nope_dim + s.qk_rope_dim)
        w.add_value_length(s.v_head_dim)
    w.add_expert_shared_count(s.n_expert_shared)
    w.add_expert_weights_scale(s.weights_scale)
    w.add_expert_weights_norm(s.weights_norm)
    w.add_expert_gating_func(GATING_FUNC[s.gating])
    if s.n_expert_groups:
        w.add_expert_group_count(s.n_expert_groups)
        w.add_expert_group_used_count(s.n_group_used)
    if s.yarn_factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.yarn_factor)
        w.add_rope_scaling_orig_ctx_len(s.yarn_orig_ctx)
        w.add_rope_scaling_yarn_beta_fast(YARN_BETA_FAST)
        w.add_rope_scaling_yarn_beta_slow(YARN_BETA_SLOW)
        w.add_rope_scaling_yarn_log_mul(0.1 * s.yarn_mscale_all_dim)


# -- weights ----------------------------------------------------------------------------------------


class Weights:
    """Draws each tensor from one seeded generator, in the order they are written, into a GGUFWriter.
    Shapes are numpy order (GGUF ne reversed); the last axis of a matrix is its input."""

    def __init__(self, writer: gguf.GGUFWriter, seed: int):
        self.writer = writer
        self.rng = np.random.default_rng(seed)

    def add(self, name: str, array: np.ndarray) -> None:
        self.writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    def draw(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def matrix(self, name: str, *shape: int, gain: float = 1.0) -> None:
        # std 1/sqrt(fan_in) keeps each projection's output as large as its input, layer after layer
        self.add(name, self.draw(shape, gain / math.sqrt(shape[-1])))

    def norm(self, name: str, n: int) -> None:
        self.add(name, 1.0 + self.draw((n,), 0.1))  # near 1: RMS-normed activations stay ~1


def write_tensors(t: Weights, a: Architecture, s: TinySpec) -> None:
    """Every tensor of the declaration, in its order, drawn by its kind."""
    sizes = sizes_of(a, s)
    # Every file has its own output.weight, gemma3's too: with random weights a tied head scores
    # each position's own input token some 20 nats above the rest, which would hide any bug in the
    # layers. gemma3 multiplies embeddings by sqrt(n_embd), so its are drawn that much smaller.
    embd_std = 1 / math.sqrt(s.n_embd) if a.scaled_embeddings else 1.0
    for il in [None, *range(s.n_layer)]:
        kv_b = None  # MLA: latent -> per head [k_nope; v], drawn once, so that both layouts hold the same numbers
        for d in a.present(sizes, il):
            if d.optional and d.optional not in sizes.optional:
                continue
            name, shape = d.name(il), d.shape(sizes)
            if d.kind == "matrix":
                t.matrix(name, *shape)
            elif d.kind == "norm":
                t.norm(name, *shape)
            elif d.kind == "embd":
                t.add(name, t.draw(shape, embd_std))
            elif d.kind == "output":
                t.matrix(name, *shape, gain=LOGIT_SPREAD)
            elif d.kind == "bias":  # qwen2's Q, K, V biases
                t.add(name, t.draw(shape, 0.5))
            elif d.kind == "router_bias":  # moves selection, not the weights
                t.add(name, t.draw(shape, 0.1))
            elif d.kind == "freqs":  # llama3-style: each rotated pair's frequency divided by 1 to 8
                t.add(name, np.geomspace(1.0, 8.0, shape[0]))
            elif d.kind in ("k_b", "kv_b"):
                kv_b = t.draw((s.n_head, s.qk_nope_dim + s.v_head_dim, s.kv_lora_rank), 1 / math.sqrt(s.kv_lora_rank))
                # cut as convert_hf_to_gguf does, with k_b transposed so that q_nope can be absorbed into it
                t.add(name, kv_b[:, : s.qk_nope_dim].transpose(0, 2, 1) if d.kind == "k_b" else kv_b.reshape(shape))
            elif d.kind == "v_b":
                t.add(name, kv_b[:, s.qk_nope_dim :])  # (n_head, v_head_dim, kv_lora)
            else:
                raise TinyModelError(f"{a.name}: no way to draw {name!r} of kind {d.kind!r}")


# -- files ------------------------------------------------------------------------------------------


def spec_for(arch: str, preset: str = "tiny") -> TinySpec:
    if arch not in PRESETS:
        raise TinyModelError(f"unknown tiny model {arch!r} (known: {', '.join(MODELS)})")
    if preset not in PRESETS[arch]:
        raise TinyModelError(f"unknown preset {preset!r} (known: {', '.join(PRESETS[arch])})")
    return PRESETS[arch][preset]


def write_tiny_model(
    arch: str,
    path: str | os.PathLike,
    spec: TinySpec | None = None,
    seed: int = 0,
    declaration: Architecture | None = None,
) -> Path:
    """Write the F32 GGUF of tiny model `arch` (a name of MODELS) with `spec` (default: its tiny
    preset) and weights drawn from `seed`. The same arguments always give the same bytes.
    declaration: another architecture to write it as (a variant of arch's, Architecture.renamed)."""
    spec = spec or spec_for(arch)
    check_spec(arch, spec)
    a = declaration or ARCHITECTURE[arch]
    path = Path(path)
    writer = gguf.GGUFWriter(path, a.name)
    writer.add_name(f"tiny-{arch}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(writer, a, spec)
    write_tokenizer(writer, spec.n_vocab)
    write_tensors(Weights(writer, seed), a, spec)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize_q4_k_m(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Q4_K_M of `src` by refengine's quantizer, whose output is byte-identical to llama.cpp's
    llama_model_quantize (tests/test_quantize_file.py checks that on every tiny model)."""
    from refengine.quantize import quantize_file

    quantize_file(src, dst, "Q4_K_M")
    return Path(dst)


QTYPES = ("F32", "Q4_K_M")


def make_tiny_model(
    arch: str,
    path: str | os.PathLike,
    preset: str = "tiny",
    qtype: str = "F32",
    seed: int = 0,
    spec: TinySpec | None = None,
) -> Path:
    """write_tiny_model, then for Q4_K_M quantize the F32 file (kept only in a temporary file)."""
    spec = spec or spec_for(arch, preset)
    if qtype not in QTYPES:
        raise TinyModelError(f"unknown type {qtype!r} (known: {', '.join(QTYPES)})")
    path = Path(path)
    if not path.parent.is_dir():
        raise TinyModelError(f"{path}: folder {path.parent} does not exist")
    if qtype == "F32":
        return write_tiny_model(arch, path, spec, seed)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        f32 = write_tiny_model(arch, Path(tmp) / "f32.gguf", spec, seed)
        return quantize_q4_k_m(f32, path)
