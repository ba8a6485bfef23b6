"""Tiny F32 llama-architecture GGUF models for the quantizer's file-level tests.

Written with gguf.GGUFWriter, with every key llama.cpp's loader needs for the
llama architecture and a byte-level (gpt2) tokenizer of 256 byte tokens, so
llama_model_quantize accepts them. The weights come from numpy's RandomState,
whose stream is frozen, so a model (and the golden hashes of its quantized
tensors) is the same on every machine and numpy version.

The shapes are picked to reach llama.cpp's type rules: 8 layers, so Q4_K_M's
use_more_bits picks layers 0, 3, 6 and 7; 4 query heads sharing one KV head
(n_gqa 4, which Q2_K reads); a feed-forward width of 96, whose ffn_down rows
are not whole 256-element blocks (the fallback to 32-element types); and, when
asked, an `odd` tensor with 80-element rows, which nothing but F16 fits.
Used by tests/test_quantize_file.py and scripts/make_golden_quant.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

N_EMBD = 256
N_FF = 96  # 3 x 32: not a multiple of 256
N_LAYER = 8
N_HEAD, N_HEAD_KV = 4, 1
N_VOCAB = 256  # the byte tokens


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode map: each byte as the printable character byte-level BPE uses for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_llama(
    path: Path,
    *,
    tied: bool = False,
    odd: bool = False,
    weights: str = "F32",
    n_expert: int = 0,
    n_layer: int = N_LAYER,
    seed: int = 0,
) -> Path:
    """Write the model to `path`. tied: no output.weight (the embedding doubles as the output);
    odd: add odd.weight, (4, 80), whose rows fit no quantized type; weights: the type of the
    2-D and 3-D tensors, F32, F16 or BF16 (norms stay F32, as converted models have them);
    n_expert: a mixture of experts (llama.cpp's Mixtral layout: a router and 3-D expert
    tensors of N_FF-wide experts, 2 used per token) instead of a dense feed-forward."""
    rng = np.random.RandomState(seed)
    weight_type = GGMLQuantizationType[weights]
    head_dim = N_EMBD // N_HEAD

    def weight(*shape: int, scale: float = 0.02) -> np.ndarray:
        # heavy-ish tails and a few outliers, as trained weights have
        w = rng.standard_t(5, size=shape) * scale
        w[rng.random_sample(w.shape) < 0.001] *= 20
        return w.astype(np.float32)

    def add(name: str, w: np.ndarray) -> None:
        if w.ndim == 1 or weight_type == GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        else:  # stored as raw bytes, converted by gguf.quants (round to nearest even)
            writer.add_tensor(name, quantize(w, weight_type), raw_dtype=weight_type)

    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type({"F32": 0, "F16": 1, "BF16": 32}[weights])  # LLAMA_FTYPE_ALL_F32, _MOSTLY_F16, _BF16
    writer.add_block_count(n_layer)
    writer.add_context_length(128)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if n_expert:
        writer.add_expert_count(n_expert)
        writer.add_expert_used_count(2)
    writer.add_vocab_size(N_VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(byte_tokens())
    writer.add_token_types([1] * N_VOCAB)  # LLAMA_TOKEN_TYPE_NORMAL
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(ord("^"))
    writer.add_eos_token_id(ord("$"))

    add("token_embd.weight", weight(N_VOCAB, N_EMBD))  # (n_vocab, n_embd)
    add("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))  # (n_embd,)
    if not tied:
        add("output.weight", weight(N_VOCAB, N_EMBD))  # (n_vocab, n_embd)
    if odd:
        add("odd.weight", weight(4, 80))  # (4, 80)
    for i in range(n_layer):
        blk = f"blk.{i}."
        add(blk + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))  # (n_embd,)
        add(blk + "attn_q.weight", weight(N_EMBD, N_EMBD))  # (n_head * head_dim, n_embd)
        add(blk + "attn_k.weight", weight(N_HEAD_KV * head_dim, N_EMBD))  # (n_kv * head_dim, n_embd)
        add(blk + "attn_v.weight", weight(N_HEAD_KV * head_dim, N_EMBD))  # (n_kv * head_dim, n_embd)
        add(blk + "attn_output.weight", weight(N_EMBD, N_EMBD))  # (n_embd, n_head * head_dim)
        add(blk + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))  # (n_embd,)
        if n_expert:
            add(blk + "ffn_gate_inp.weight", weight(n_expert, N_EMBD))  # (n_expert, n_embd): the router
            add(blk + "ffn_gate_exps.weight", weight(n_expert, N_FF, N_EMBD))  # (n_expert, n_ff, n_embd)
            add(blk + "ffn_up_exps.weight", weight(n_expert, N_FF, N_EMBD))  # (n_expert, n_ff, n_embd)
            add(blk + "ffn_down_exps.weight", weight(n_expert, N_EMBD, N_FF))  # (n_expert, n_embd, n_ff)
        else:
            add(blk + "ffn_gate.weight", weight(N_FF, N_EMBD))  # (n_ff, n_embd)
            add(blk + "ffn_up.weight", weight(N_FF, N_EMBD))  # (n_ff, n_embd)
            add(blk + "ffn_down.weight", weight(N_EMBD, N_FF))  # (n_embd, n_ff): 96-element rows
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
