"""What every decoder-only architecture shares: the sizes read from `{arch}.*` keys, grouped-query
attention, and the embed -> layers -> norm -> head loop. Tensors are found and shape-checked through
the architecture's declaration (refengine.arch.declarations)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from refengine.arch.declarations import Architecture, Sizes, architecture
from refengine.arch.ffn import GLU
from refengine.arch.moe import MoE
from refengine.gguf import GGUFFile, Tensor
from refengine.hparams import HParams, ModelError
from refengine.nn import (
    CACHE_TYPES,
    N_UBATCH,
    NUMERICS,
    KVCache,
    Linear,
    attention,
    attention_ggml,
    decode_attention_ggml,
    embed,
    rms_norm,
)
from refengine.threads import step_threads

__all__ = ["HParams", "ModelError"]  # re-exported: the architectures' errors and key reader


def check_numerics(numerics: str, dtype: np.dtype) -> str:
    """numerics "exact" or "ggml"; ggml is llama.cpp's float32 arithmetic, so float64 is always exact."""
    if numerics not in NUMERICS:
        raise ModelError(f"numerics {numerics!r}: use one of {', '.join(NUMERICS)}")
    if numerics == "ggml" and dtype != np.float32:
        raise ModelError("numerics ggml is llama.cpp's float32 arithmetic: it needs precision f32 (f64 is exact)")
    return numerics


@dataclass(frozen=True)
class DecoderConfig:
    """The sizes every decoder has, from the standard `{arch}.*` keys; each family's config extends it."""

    arch: str
    n_vocab: int  # rows of token_embd
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int  # feed_forward_length (for MoE models: their dense layers')
    n_ctx_train: int
    norm_eps: float

    @staticmethod
    def read_keys(hp: HParams) -> dict[str, Any]:
        """The fields above, as keyword arguments for a subclass's constructor."""
        token_embd = hp.gguf.tensor(architecture(hp.gguf).tensor_name("token_embd"))
        keys = dict(
            arch=hp.arch,
            n_vocab=token_embd.shape[0],
            n_embd=hp.int("embedding_length", minimum=1),
            n_layer=hp.int("block_count", minimum=1),
            n_head=hp.int("attention.head_count", minimum=1),
            n_ff=hp.int("feed_forward_length"),
            n_ctx_train=hp.int("context_length"),
            norm_eps=hp.float("attention.layer_norm_rms_epsilon", minimum=0.0),
        )
        if token_embd.shape[-1] != keys["n_embd"]:
            raise hp.fail("embedding_length", f"is {keys['n_embd']}, but token_embd.weight is {token_embd.shape}")
        check_layer_count(hp, keys["n_layer"])
        return keys

    def sizes(self) -> Sizes:
        """The sizes the architecture's tensor shapes are made of (refengine.arch.declarations): the fields
        of the same name, the rotated dimensions (n_rot) and the experts' (moe)."""
        sizes = {f.name: getattr(self, f.name) for f in fields(Sizes) if hasattr(self, f.name)}
        moe = getattr(self, "moe", None)
        if moe is not None:
            sizes |= dict(n_expert=moe.n_expert, n_ff_exp=moe.n_ff_exp, n_expert_shared=moe.n_expert_shared)
        return Sizes(**sizes)


@dataclass(frozen=True)
class GQAConfig(DecoderConfig):
    """Grouped-query attention: n_head query heads share n_head_kv key/value heads of head_dim."""

    n_head_kv: int
    head_dim: int  # key_length = value_length

    @staticmethod
    def read_keys(hp: HParams) -> dict[str, Any]:
        keys = DecoderConfig.read_keys(hp)
        n_head = keys["n_head"]
        keys["n_head_kv"] = n_head_kv = hp.int("attention.head_count_kv", n_head, minimum=1)
        if n_head % n_head_kv:
            raise hp.fail("attention.head_count_kv", f"({n_head_kv}) does not divide attention.head_count ({n_head})")
        keys["head_dim"] = hp.int("attention.key_length", keys["n_embd"] // n_head, minimum=1)
        value_length = hp.int("attention.value_length", keys["head_dim"])
        if value_length != keys["head_dim"]:
            raise hp.fail("attention.value_length", f"({value_length}) differs from key_length, which is not supported")
        return keys


def check_layer_count(hp: HParams, n_layer: int) -> None:
    """block_count must match the layers the tensors are for: blk.0 ... blk.{n_layer - 1}, no more."""
    layers = {int(name.split(".")[1]) for name in hp.gguf.tensors if re.match(r"blk\.\d+\.", name)}
    extra = sorted(il for il in layers if il >= n_layer)
    if extra:
        raise hp.fail("block_count", f"is {n_layer}, but the file has tensors for layer {extra[0]} (blk.{extra[0]}.*)")


def read_rope_dims(hp: HParams, head_dim: int) -> int:
    """rope.dimension_count: an even number of a head's dimensions, from the first."""
    n_rot = hp.int("rope.dimension_count", head_dim, minimum=2)
    if n_rot > head_dim or n_rot % 2:
        raise hp.fail("rope.dimension_count", f"is {n_rot}, must be even and at most the head size {head_dim}")
    return n_rot


def check_shape(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    if t.shape != shape:
        raise ModelError(f"{t.path}: tensor {t.name!r} has shape {t.shape}, expected {shape}")
    return t


def norm_weight(t: Tensor, n: int, dtype) -> np.ndarray:
    """A small norm vector, read once into memory in the compute dtype: (n,)."""
    return check_shape(t, (n,)).to_numpy().astype(dtype)


# observer(name, x): called with each intermediate tensor of a forward pass, named as llama.cpp's graph
# names it ("attn_norm-3", "result_output"); x is (n_tok, ...) for the micro-batch being evaluated.
Observer = Callable[[str, np.ndarray], None]


class DecoderModel:
    """Token ids in, logits out, through a KV cache. Subclasses supply `layer` and `layers`, each layer
    with an `ffn` (GLU or MoE)."""

    config: Any
    dtype: np.dtype
    layers: list

    def __init__(self, gguf_file: GGUFFile, config, dtype=np.float32, numerics: str = "exact"):
        self.gguf = gguf_file
        self.config = config
        self.arch: Architecture = architecture(gguf_file)
        self.sizes: Sizes = config.sizes()
        self.dtype = np.dtype(dtype)
        self.numerics = check_numerics(numerics, self.dtype)
        self.n_ubatch = N_UBATCH  # prompts are evaluated this many tokens at a time
        # The KV cache type as llama.cpp's -ctk/-ctv name it: in ggml numerics its default, f16 (use_cache_type)
        self.cache_type = "f16" if self.numerics == "ggml" else f"f{8 * self.dtype.itemsize}"
        self.observer: Observer | None = None  # set for the length of one forward(..., observer=)
        self.one_token_layers = None  # an architecture's decoding path with fewer calls (arch/decode.py), if any
        t = self.tensors()
        self.token_embd = t["token_embd"]  # (n_vocab, n_embd)
        self.output_norm = t["output_norm"].to_numpy().astype(self.dtype)  # (n_embd,)
        # Tied embeddings: without output.weight the head reuses token_embd, as llama.cpp does.
        head = t["output"] if t.get("output") is not None else self.token_embd
        self.output = Linear(head, numerics=self.numerics)  # (n_vocab, n_embd)

    def tensors(self, il: int | None = None) -> dict[str, Tensor | None]:
        """Layer il's tensors by role (None: those outside the layers), shapes checked."""
        return self.arch.tensors_of(self.gguf, self.sizes, il)

    def norm(self, t: Tensor) -> np.ndarray:
        """A small norm vector, read once into memory in the compute dtype."""
        return t.to_numpy().astype(self.dtype)

    def feed_forward(self, il: int) -> GLU | MoE:
        """Layer il's FFN from its tensors: the dense GLU, or the mixture of experts (config.moe)."""
        t, n = self.tensors(il), self.numerics
        if self.sizes.dense_layer(il):
            return GLU.from_tensors(t, n, self.arch.activation)
        return MoE(t, self.config.moe, self.config.n_embd, self.dtype, n)

    def load_layers(self, attention: Callable[[dict[str, Tensor | None]], Any]) -> list[Layer]:
        """Every pre-norm Layer: its norms, its attention (attention(the layer's tensors by role)), its FFN."""
        layers = []
        for il in range(self.config.n_layer):
            t = self.tensors(il)
            norms = self.norm(t["attn_norm"]), self.norm(t["ffn_norm"])
            layers.append(Layer(norms[0], attention(t), norms[1], self.feed_forward(il)))
        return layers

    def moe_blocks(self) -> list[tuple[int, MoE]]:
        """(layer, block) of every mixture of experts: where --numa and MPI place and dispatch experts."""
        return [(il, layer.ffn) for il, layer in enumerate(self.layers) if isinstance(layer.ffn, MoE)]

    def ffn(self, ffn: GLU | MoE, x: np.ndarray, il: int) -> np.ndarray:
        """The layer's FFN on its normed input: (n_tok, n_embd), shown as llama.cpp names it: ffn_out, or
        for experts ffn_moe_out (with shared experts, ffn_out is the sum of ffn_moe_out and ffn_shexp)."""
        if isinstance(ffn, MoE):
            return self.emit("ffn_moe_out" if ffn.ffn_shexp is None else "ffn_out", ffn(x, self.emit, il), il)
        return self.emit("ffn_out", ffn(x), il)

    def sliding_window(self, il: int) -> int:
        """Layer il's sliding attention window (0: it attends to the whole context)."""
        return 0

    @property
    def cache_dtype(self) -> np.dtype:
        """The KV cache's: the compute dtype, or in ggml numerics the cache type (F16 unless use_cache_type)."""
        return np.dtype(CACHE_TYPES[self.cache_type]) if self.numerics == "ggml" else self.dtype

    def use_cache_type(self, cache_type: str) -> None:
        """Cache keys and values as `cache_type` (CACHE_TYPES) in the caches made from now on: ggml numerics only,
        since exact numerics caches in the compute dtype."""
        if cache_type not in CACHE_TYPES:
            raise ModelError(f"cache type {cache_type!r}: use one of {', '.join(CACHE_TYPES)}")
        if cache_type != self.cache_type and self.numerics != "ggml":
            raise ModelError(f"cache type {cache_type}: exact numerics caches in the compute dtype; use numerics ggml")
        self.cache_type = cache_type

    def new_cache(self, n_ctx: int) -> KVCache:
        c = self.config
        windows = [self.sliding_window(il) for il in range(c.n_layer)]
        return KVCache.for_heads(n_ctx, c.n_head_kv, c.head_dim, c.head_dim, self.cache_dtype, windows, self.n_ubatch)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return embed(self.token_embd, tokens, self.dtype)  # (n_tok, n_embd)

    def emit(self, name: str, x: np.ndarray, il: int | None = None) -> np.ndarray:
        """Show x to the observer as llama.cpp's `name-il` (or `name`), and return it."""
        if self.observer is not None:
            self.observer(name if il is None else f"{name}-{il}", x)
        return x

    def forward(
        self, tokens: np.ndarray, cache: KVCache, all_logits: bool = True, observer: Observer | None = None
    ) -> np.ndarray:
        """Run `tokens` at positions cache.n_past.. and return logits (n_tok or 1, n_vocab).

        A prompt is evaluated n_ubatch tokens at a time, each micro-batch appended to the cache before
        the next attends to it, so activations are bounded by the micro-batch, not the prompt.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        n_tok = len(tokens)
        if n_tok == 0:
            raise ModelError("no tokens to evaluate")
        if cache.n_past + n_tok > cache.n_ctx:
            raise ModelError(f"{cache.n_past + n_tok} positions exceed the context of {cache.n_ctx}")
        bad = (tokens < 0) | (tokens >= self.config.n_vocab)
        if bad.any():
            raise ModelError(f"token id {int(tokens[bad][0])} is outside the vocabulary of {self.config.n_vocab}")
        logits = []
        self.observer = observer
        try:
            n_step = min(self.n_ubatch, cache.max_batch)
            for start in range(0, n_tok, n_step):
                batch = tokens[start : start + n_step]
                last = start + len(batch) == n_tok
                with step_threads(len(batch)):
                    out = self.step(batch, cache, "all" if all_logits else "last" if last else None)
                if out is not None:
                    logits.append(out)
        finally:
            self.observer = None
        return logits[0] if len(logits) == 1 else np.concatenate(logits)

    def step(self, tokens: np.ndarray, cache: KVCache, logits: str | None) -> np.ndarray | None:
        """One micro-batch at positions cache.n_past..: the logits of "all" its positions (n_tok, n_vocab),
        of the "last" (1, n_vocab), or None."""
        positions = np.arange(cache.n_past, cache.n_past + len(tokens))
        x = self.emit("inp_embd", self.embed(tokens))  # (n_tok, n_embd)
        one_token = self.one_token_layers
        if one_token is not None and len(tokens) == 1 and self.observer is None and one_token.usable(cache):
            x = one_token(x, int(positions[0]), cache)  # decoding: the same layers in fewer calls (arch/decode.py)
        else:
            for il in range(self.config.n_layer):
                x = self.emit("l_out", self.layer(il, x, positions, cache), il)
        cache.n_past += len(tokens)
        if logits is None:
            return None
        if logits == "last":
            x = x[-1:]
        x = self.emit("result_norm", rms_norm(x, self.output_norm, self.config.norm_eps, self.numerics))
        return self.emit("result_output", self.output(x))  # (n_tok, n_vocab)

    def layer(self, il: int, x: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        """A pre-norm layer (Layer): x + attention(attn_norm(x)), then x + ffn(ffn_norm(x)): (n_tok, n_embd)."""
        c, w, n = self.config, self.layers[il], self.numerics
        h = self.emit("attn_norm", rms_norm(x, w.attn_norm, c.norm_eps, n), il)  # (n_tok, n_embd)
        x = self.emit("ffn_inp", x + self.attention(il, h, positions, cache), il)
        h = self.emit("ffn_norm", rms_norm(x, w.ffn_norm, c.norm_eps, n), il)
        return x + self.ffn(w.ffn, h, il)  # (n_tok, n_embd)

    def attention(self, il: int, x: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        """Layer il's attention on its normed input: (n_tok, n_embd) -> (n_tok, n_embd)."""
        raise NotImplementedError


@dataclass
class AttentionWeights:
    attn_q: Linear  # (n_head * head_dim, n_embd)
    attn_k: Linear  # (n_head_kv * head_dim, n_embd)
    attn_v: Linear  # (n_head_kv * head_dim, n_embd)
    attn_output: Linear  # (n_embd, n_head * head_dim)
    attn_q_norm: np.ndarray | None = None  # (head_dim,) QK-norm (qwen3, gemma3)
    attn_k_norm: np.ndarray | None = None  # (head_dim,)
    bias_q: np.ndarray | None = None  # (n_head * head_dim,) qwen2
    bias_k: np.ndarray | None = None
    bias_v: np.ndarray | None = None


def load_attention(t: dict[str, Tensor | None], dtype, numerics: str = "exact") -> AttentionWeights:
    """Grouped-query attention from a layer's tensors by role (Architecture.tensors_of: shapes checked)."""
    w = AttentionWeights(
        attn_q=Linear(t["attn_q"], numerics=numerics),
        attn_k=Linear(t["attn_k"], numerics=numerics),
        attn_v=Linear(t["attn_v"], numerics=numerics),
        attn_output=Linear(t["attn_output"], numerics=numerics),
    )
    if (t.get("attn_q_norm") is None) != (t.get("attn_k_norm") is None):
        found = t["attn_q_norm"] if t.get("attn_q_norm") is not None else t["attn_k_norm"]
        raise ModelError(f"{found.path}: {found.name!r} without its pair: QK-norm needs attn_q_norm and attn_k_norm")
    if t.get("attn_q_norm") is not None:
        w.attn_q_norm = t["attn_q_norm"].to_numpy().astype(dtype)
        w.attn_k_norm = t["attn_k_norm"].to_numpy().astype(dtype)
    for name in ("q", "k", "v"):
        bias = t.get(f"attn_{name}.bias")
        if bias is not None:
            setattr(w, f"bias_{name}", bias.to_numpy().astype(dtype))
    return w


@dataclass
class Layer:
    """One pre-norm layer: x + attn(attn_norm(x)), then x + ffn(ffn_norm(x))."""

    attn_norm: np.ndarray  # (n_embd,)
    attn: Any  # AttentionWeights, or deepseek2's MLAWeights
    ffn_norm: np.ndarray  # (n_embd,)
    ffn: GLU | MoE


def kq_scale(model: DecoderModel, head_dim: int) -> float:
    """1/sqrt(head_dim): in ggml numerics as llama.cpp rounds it, 1.0f / sqrtf(float(head_dim))."""
    if model.numerics == "ggml":
        return float(np.float32(1) / np.sqrt(np.float32(head_dim)))
    return 1.0 / math.sqrt(head_dim)


def self_attention(
    model: DecoderModel, w: AttentionWeights, x, positions, cache: KVCache, il: int, rope, scale, scale_q: bool = False
):
    """Project, QK-norm, rotate, append to the cache, attend, project back: (n_tok, n_embd).
    scale_q: the queries are multiplied by `scale` after rope and the scores are not (gemma3's graph in
    llama.cpp: the same function, rounded otherwise in ggml numerics)."""
    c, n_tok, numerics = model.config, x.shape[0], model.numerics
    q, k, v = w.attn_q(x), w.attn_k(x), w.attn_v(x)  # (n_tok, heads * head_dim)
    if w.bias_q is not None:
        q, k, v = q + w.bias_q, k + w.bias_k, v + w.bias_v
    if numerics == "ggml" and n_tok == 1 and model.observer is None and model.cache_type == "f16":  # one call
        out = decode_attention_ggml(
            q.reshape(c.n_head, c.head_dim), k.reshape(c.n_head_kv, c.head_dim), v.reshape(c.n_head_kv, c.head_dim),
            cache.layers[il], int(positions[0]), rope, 1.0 if scale_q else scale, w.attn_q_norm, w.attn_k_norm,
            c.norm_eps, scale if scale_q else 1.0,
        )  # fmt: skip
        return w.attn_output(out.reshape(1, -1))
    q = q.reshape(n_tok, c.n_head, c.head_dim)
    k = k.reshape(n_tok, c.n_head_kv, c.head_dim)
    v = v.reshape(n_tok, c.n_head_kv, c.head_dim)
    if w.attn_q_norm is not None:
        q = model.emit("Qcur_normed", rms_norm(q, w.attn_q_norm, c.norm_eps, numerics), il)
        k = model.emit("Kcur_normed", rms_norm(k, w.attn_k_norm, c.norm_eps, numerics), il)
    q = model.emit("Qcur", rope.apply(q, positions, numerics), il)  # (n_tok, n_head, head_dim)
    k = model.emit("Kcur", rope.apply(k, positions, numerics), il)  # (n_tok, n_head_kv, head_dim)
    model.emit("Vcur", v, il)
    layer = cache.layers[il]
    layer.store(int(positions[0]), k, v)
    if numerics == "ggml":
        if scale_q:
            q, scale = q * np.float32(scale), 1.0
        out = attention_ggml(q, layer, int(positions[0]), scale)  # (n_tok, n_head, head_dim)
    else:
        out = attention(q, layer, int(positions[0]), scale)
    out = model.emit("kqv_out", out.reshape(n_tok, c.n_head * c.head_dim), il)
    return w.attn_output(out)
