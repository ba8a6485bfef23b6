"""Each architecture declared once: its tensors (GGUF names, shapes from the hyper-parameters, which are
optional, which a layer has) and the facts its code and its readers branch on (rope mode, QK-norm,
sliding-window pattern, MLA, where the experts' width is read).

Everything that needs to know an architecture reads its Architecture here: the loaders (refengine/arch/*.py:
`tensors` finds and shape-checks a layer's tensors), the tiny-model writer (refengine.testing.tiny writes
`expected_shapes`, in declaration order), the transformers mapping (refengine.testing.hf), the shape tests
and the memory plan (`sliding_window_pattern`, `mla`). Numba-free, so that the plan can read it.

The shapes are llama.cpp's (llama_model_{llama,qwen2,qwen3,qwen3moe,gemma3,deepseek2}::load_arch_tensors),
numpy order: GGUF's ne reversed, the last axis of a matrix its input.

Adding an architecture: declare it below (ARCHITECTURES), with a model class in refengine/arch/ when its
forward pass is not one of the existing ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace

from refengine.gguf import GGUFFile, Tensor
from refengine.hparams import ModelError


@dataclass(frozen=True)
class Sizes:
    """What tensor shapes are made of; a size an architecture has no use for stays 0."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int = 0
    n_head_kv: int = 0
    head_dim: int = 0  # key_length = value_length (GQA attention)
    n_ff: int = 0  # dense FFN width
    n_rot: int = 0  # rope.dimension_count
    n_expert: int = 0  # 0: no experts
    n_ff_exp: int = 0  # one expert's width
    n_expert_shared: int = 0
    n_leading_dense: int = 0  # layers before the first MoE one
    q_lora_rank: int = 0  # MLA (deepseek2); 0: one attn_q
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    mla_split: bool = True  # attn_k_b + attn_v_b; False: the older attn_kv_b
    optional: frozenset[str] = frozenset()  # the optional tensor groups a writer adds (TensorDecl.optional)

    def dense_layer(self, il: int) -> bool:
        """Layer il has a dense FFN (no experts, or one of the leading dense layers)."""
        return not self.n_expert or il < self.n_leading_dense


def always(s: Sizes, il: int | None) -> bool:
    return True


@dataclass(frozen=True)
class TensorDecl:
    """One tensor: `role`, the name the model's code uses (the GGUF name's stem unless `gguf` says
    otherwise), its shape from the sizes, whether a layer has it (`when`), and whether a file may lack it
    (`optional`: the group a writer adds it with). `kind` is how a tiny model draws it."""

    role: str
    shape: Callable[[Sizes], tuple[int, ...]]
    kind: str = "matrix"  # matrix, norm, bias, embd, output, router_bias, freqs, kv_b, k_b, v_b
    when: Callable[[Sizes, int | None], bool] = always
    optional: str = ""
    gguf: str = ""  # the GGUF name, "{il}" standing for the layer; default blk.{il}.ROLE.weight (or ROLE.weight)
    layer: bool = True

    def name(self, il: int | None = None) -> str:
        if self.gguf:
            return self.gguf.format(il=il)
        suffix = "" if "." in self.role else ".weight"  # "attn_q.bias" names itself
        return f"blk.{il}.{self.role}{suffix}" if self.layer else f"{self.role}{suffix}"


def top(role: str, shape, kind: str = "matrix", **kw) -> TensorDecl:
    """A tensor outside the layers (token_embd, output, ...)."""
    return TensorDecl(role, shape, kind, layer=False, **kw)


def dense(s: Sizes, il) -> bool:
    return s.dense_layer(il)


def moe(s: Sizes, il) -> bool:
    return not s.dense_layer(il)


def shared_experts(s: Sizes, il) -> bool:
    return moe(s, il) and s.n_expert_shared > 0


def n_ff_shexp(s: Sizes) -> int:
    return s.n_ff_exp * s.n_expert_shared


def q_head(s: Sizes) -> int:
    return s.qk_nope_dim + s.qk_rope_dim


GLOBAL = (
    top("token_embd", lambda s: (s.n_vocab, s.n_embd), "embd"),
    # without output.weight the head is token_embd (tied embeddings), as in llama.cpp
    top("output", lambda s: (s.n_vocab, s.n_embd), "output", optional="output"),
    top("output_norm", lambda s: (s.n_embd,), "norm"),
)
# llama3's rope scaling precomputed by the converter: one divisor per rotated pair
ROPE_FREQS = top("rope_freqs", lambda s: (s.n_rot // 2,), "freqs", optional="rope_freqs")

GQA_ATTENTION = (
    TensorDecl("attn_norm", lambda s: (s.n_embd,), "norm"),
    TensorDecl("attn_q", lambda s: (s.n_head * s.head_dim, s.n_embd)),
    TensorDecl("attn_k", lambda s: (s.n_head_kv * s.head_dim, s.n_embd)),
    TensorDecl("attn_v", lambda s: (s.n_head_kv * s.head_dim, s.n_embd)),
    TensorDecl("attn_output", lambda s: (s.n_embd, s.n_head * s.head_dim)),
    TensorDecl("attn_q_norm", lambda s: (s.head_dim,), "norm", optional="qk_norm"),
    TensorDecl("attn_k_norm", lambda s: (s.head_dim,), "norm", optional="qk_norm"),
    TensorDecl("attn_q.bias", lambda s: (s.n_head * s.head_dim,), "bias", optional="attn_bias"),
    TensorDecl("attn_k.bias", lambda s: (s.n_head_kv * s.head_dim,), "bias", optional="attn_bias"),
    TensorDecl("attn_v.bias", lambda s: (s.n_head_kv * s.head_dim,), "bias", optional="attn_bias"),
)

# Multi-head latent attention (deepseek2): the latent (kv_lora_rank) and one rope key for all heads.
MLA_ATTENTION = (
    TensorDecl("attn_norm", lambda s: (s.n_embd,), "norm"),
    TensorDecl("attn_q_a", lambda s: (s.q_lora_rank, s.n_embd), when=lambda s, il: s.q_lora_rank > 0),
    TensorDecl("attn_q_a_norm", lambda s: (s.q_lora_rank,), "norm", when=lambda s, il: s.q_lora_rank > 0),
    TensorDecl("attn_q_b", lambda s: (s.n_head * q_head(s), s.q_lora_rank), when=lambda s, il: s.q_lora_rank > 0),
    TensorDecl("attn_q", lambda s: (s.n_head * q_head(s), s.n_embd), when=lambda s, il: s.q_lora_rank == 0),
    TensorDecl("attn_kv_a_mqa", lambda s: (s.kv_lora_rank + s.qk_rope_dim, s.n_embd)),
    TensorDecl("attn_kv_a_norm", lambda s: (s.kv_lora_rank,), "norm"),
    # per head: q_nope -> latent space (transposed, so that q_nope is absorbed), and latent -> value
    TensorDecl("attn_k_b", lambda s: (s.n_head, s.kv_lora_rank, s.qk_nope_dim), "k_b", when=lambda s, il: s.mla_split),
    TensorDecl("attn_v_b", lambda s: (s.n_head, s.v_head_dim, s.kv_lora_rank), "v_b", when=lambda s, il: s.mla_split),
    # the older layout: per head the k rows, then the v rows, applied to the latent
    TensorDecl(
        "attn_kv_b",
        lambda s: (s.n_head * (s.qk_nope_dim + s.v_head_dim), s.kv_lora_rank),
        "kv_b",
        when=lambda s, il: not s.mla_split,
    ),
    TensorDecl("attn_output", lambda s: (s.n_embd, s.n_head * s.v_head_dim)),
)

FFN_NORM = TensorDecl("ffn_norm", lambda s: (s.n_embd,), "norm")
DENSE_FFN = (
    TensorDecl("ffn_gate", lambda s: (s.n_ff, s.n_embd), when=dense),
    TensorDecl("ffn_up", lambda s: (s.n_ff, s.n_embd), when=dense),
    TensorDecl("ffn_down", lambda s: (s.n_embd, s.n_ff), when=dense),
)
MOE_FFN = (
    TensorDecl("ffn_gate_inp", lambda s: (s.n_expert, s.n_embd), when=moe),  # the router
    # moves which experts are chosen, not their weights (DeepSeek-V3)
    TensorDecl("exp_probs_b.bias", lambda s: (s.n_expert,), "router_bias", when=moe, optional="exp_probs_b"),
    TensorDecl("ffn_gate_exps", lambda s: (s.n_expert, s.n_ff_exp, s.n_embd), when=moe),
    TensorDecl("ffn_up_exps", lambda s: (s.n_expert, s.n_ff_exp, s.n_embd), when=moe),
    TensorDecl("ffn_down_exps", lambda s: (s.n_expert, s.n_embd, s.n_ff_exp), when=moe),
    TensorDecl("ffn_gate_shexp", lambda s: (n_ff_shexp(s), s.n_embd), when=shared_experts),
    TensorDecl("ffn_up_shexp", lambda s: (n_ff_shexp(s), s.n_embd), when=shared_experts),
    TensorDecl("ffn_down_shexp", lambda s: (s.n_embd, n_ff_shexp(s)), when=shared_experts),
)


@dataclass(frozen=True)
class Architecture:
    """One `general.architecture`: its tensors in file order, and the facts its code branches on."""

    name: str
    model: str  # "module:Class" of its DecoderModel, imported when a file is loaded
    tensors: tuple[TensorDecl, ...]
    rope_neox: bool = True  # rotate halves (NEOX); False: adjacent pairs (llama.cpp's NORM mode)
    qk_norm: bool = False  # attn_q_norm / attn_k_norm
    attn_bias: bool = False  # biases on the Q, K and V projections (qwen2)
    moe: str = "never"  # "never", "expert_count" (experts when the key says so), "always"
    expert_ff_key: str = "expert_feed_forward_length"  # the key an expert's width is read from
    mla: bool = False  # multi-head latent attention: the cache holds the latent (kv_lora_rank)
    sliding_window_pattern: int = 0  # every PATTERN-th layer attends globally, the others in a window
    local_rope_base: float = 0.0  # the sliding-window layers' rope base
    scaled_embeddings: bool = False  # embeddings multiplied by sqrt(n_embd) (gemma3)
    norms_plus_one: bool = False  # the converter stored 1 + w for every norm (gemma3: HF scales by 1 + w)
    activation: str = "silu"  # of the gated FFN: silu (SwiGLU) or gelu (GEGLU, tanh approximation)

    def decl(self, role: str) -> TensorDecl:
        for t in self.tensors:
            if t.role == role:
                return t
        raise KeyError(f"{self.name} declares no tensor {role!r}")

    def tensor_name(self, role: str, il: int | None = None) -> str:
        return self.decl(role).name(il)

    def present(self, s: Sizes, il: int | None = None) -> list[TensorDecl]:
        """The tensors of layer il (None: those outside the layers) that this model's structure has."""
        return [t for t in self.tensors if t.layer == (il is not None) and t.when(s, il)]

    def tensors_of(self, gguf_file: GGUFFile, s: Sizes, il: int | None = None) -> dict[str, Tensor | None]:
        """Layer il's tensors (None: those outside the layers) by role, each checked against its shape;
        an optional one the file lacks is None. A missing or misshapen tensor is a ModelError naming it."""
        found: dict[str, Tensor | None] = {}
        for t in self.present(s, il):
            name = t.name(il)
            tensor = gguf_file.tensors.get(name)
            if tensor is None:
                if not t.optional:
                    raise ModelError(f"{gguf_file.path}: missing tensor {name!r}")
            elif tensor.shape != t.shape(s):
                raise ModelError(f"{tensor.path}: tensor {name!r} has shape {tensor.shape}, expected {t.shape(s)}")
            found[t.role] = tensor
        return found

    def expected_shapes(self, s: Sizes) -> dict[str, tuple[int, ...]]:
        """GGUF name -> shape of every tensor a file of these sizes holds (the optional ones of
        s.optional), in file order: what llama.cpp's load_arch_tensors creates."""
        layers: list[int | None] = [None, *range(s.n_layer)]
        return {
            t.name(il): t.shape(s)
            for il in layers
            for t in self.present(s, il)
            if not t.optional or t.optional in s.optional
        }

    def renamed(self, name: str, **gguf_names: str) -> Architecture:
        """This architecture under another `general.architecture`, with some tensors under other GGUF
        names ({"attn_norm": "blk.{il}.attn_in_norm.weight"}): a variant declared in one place."""
        unknown = set(gguf_names) - {t.role for t in self.tensors}
        if unknown:
            raise KeyError(f"{self.name} declares no tensor {sorted(unknown)}")
        tensors = tuple(replace(t, gguf=gguf_names.get(t.role, t.gguf)) for t in self.tensors)
        return replace(self, name=name, tensors=tensors)

    def model_class(self) -> type:
        module, cls = self.model.split(":")
        return getattr(importlib.import_module(module), cls)


_GQA_LAYER = (*GQA_ATTENTION, FFN_NORM, *DENSE_FFN, *MOE_FFN)
_LLAMA_TENSORS = (*GLOBAL, ROPE_FREQS, *_GQA_LAYER)

# llama.cpp rotates adjacent pairs for llama (the converter permutes Q/K to match) and halves for qwen.
LLAMA = Architecture(
    "llama",
    "refengine.arch.llama:Llama",
    _LLAMA_TENSORS,
    rope_neox=False,
    moe="expert_count",  # mixtral: llama with experts, each feed_forward_length wide
    expert_ff_key="feed_forward_length",
)
QWEN2 = Architecture("qwen2", "refengine.arch.llama:Llama", _LLAMA_TENSORS, attn_bias=True)
QWEN3 = Architecture("qwen3", "refengine.arch.llama:Llama", _LLAMA_TENSORS, qk_norm=True)
QWEN3MOE = Architecture("qwen3moe", "refengine.arch.llama:Llama", _LLAMA_TENSORS, qk_norm=True, moe="always")
GEMMA3 = Architecture(
    "gemma3",
    "refengine.arch.gemma3:Gemma3",
    (
        *GLOBAL,
        *GQA_ATTENTION,
        TensorDecl("post_attention_norm", lambda s: (s.n_embd,), "norm"),
        FFN_NORM,
        *DENSE_FFN,
        TensorDecl("post_ffw_norm", lambda s: (s.n_embd,), "norm"),
    ),
    qk_norm=True,
    sliding_window_pattern=6,  # llama.cpp: hparams.set_swa_pattern(6)
    local_rope_base=10000.0,  # rope_local_base_freq
    scaled_embeddings=True,
    norms_plus_one=True,
    activation="gelu",
)
DEEPSEEK2 = Architecture(
    "deepseek2",
    "refengine.arch.deepseek2:Deepseek2",
    (*GLOBAL, *MLA_ATTENTION, FFN_NORM, *DENSE_FFN, *MOE_FFN),
    rope_neox=False,
    moe="always",
    mla=True,
)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA, QWEN2, QWEN3, QWEN3MOE, GEMMA3, DEEPSEEK2)}


def architecture(gguf_file: GGUFFile | None = None, name: str | None = None) -> Architecture:
    """The declaration of a file's `general.architecture` (or of `name`); a ModelError if there is none."""
    name = gguf_file.architecture if name is None else name
    if name not in ARCHITECTURES:
        where = f"{gguf_file.path}: " if gguf_file is not None else ""
        raise ModelError(f"{where}architecture {name!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]
