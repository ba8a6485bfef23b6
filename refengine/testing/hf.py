"""A tiny model's GGUF file as a transformers checkpoint, so that transformers can be the oracle:

    config, weights = to_hf_state_dict("deepseek2", path)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.load_state_dict({name: torch.from_numpy(w) for name, w in weights.items()})

Sizes come from the file's metadata and the weights from its tensors (dequantized, for a Q4_K_M
file), so bigger presets and moe_spec models map as well. What the mapping must undo or match
(besides the rope modes of refengine.testing.tiny's docstring):
- gemma3: every norm holds 1 + w (the converter adds 1; HF's Gemma3RMSNorm scales by 1 + w);
  attention scale 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim); every 6th layer global;
  the local layers' rope base is 10000. The head is not tied to token_embd in these files.
- mixtral, qwen3moe, deepseek2: HF keeps each layer's experts as gate_up_proj (gate rows, then up
  rows) and down_proj, 3-D like GGUF's *_exps. llama.cpp's qwen3moe always renormalises the
  chosen experts' weights (norm_topk_prob=True).
- deepseek2: kv_b_proj is, head by head, attn_k_b[h].T over attn_v_b[h] (the converter's cut,
  undone). Sigmoid gating is DeepseekV3 (exp_probs_b is its e_score_correction_bias; groups are
  scored by their top two experts in both); softmax gating is DeepseekV2 with topk_method "greedy",
  whose router neither renormalises nor groups the way llama.cpp does, so only that case maps.
  YaRN: the GGUF key yarn_log_multiplier holds 0.1 * mscale_all_dim (the converter's scaling,
  which llama.cpp divides back out), and mscale = mscale_all_dim.
"""

from __future__ import annotations

import os

import numpy as np

from refengine.arch.declarations import Architecture
from refengine.gguf import GGUFFile, open_gguf
from refengine.hparams import HParams
from refengine.testing.tiny import (
    ARCHITECTURE,
    GATING_FUNC,
    YARN_BETA_FAST,
    YARN_BETA_SLOW,
    TinyModelError,
)


def to_hf_state_dict(arch: str, path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, weights) of tiny model file `path` made as `arch` (a name of refengine.testing.MODELS):
    keyword arguments for transformers.AutoConfig.for_model, and float32 arrays by HF parameter name."""
    gguf_file = open_gguf(path)
    a = ARCHITECTURE.get(arch)
    if a is None or a.name != gguf_file.architecture:
        raise TinyModelError(f"{path}: a {gguf_file.architecture} file, not a tiny {arch} model")
    hp = HParams(gguf_file, TinyModelError)
    config = deepseek2_config(hp, a) if a.mla else dense_config(arch, hp, a)
    weights = {
        "model.embed_tokens.weight": tensor(gguf_file, a.tensor_name("token_embd")),
        "model.norm.weight": norm(gguf_file, a.tensor_name("output_norm"), a),
        "lm_head.weight": tensor(gguf_file, a.tensor_name("output")),
    }
    for il in range(hp.int("block_count")):
        weights |= layer_weights(gguf_file, a, config, il)
    return config, weights


def common_config(hp: HParams, a: Architecture) -> dict:
    gguf_file = hp.gguf
    return {
        "vocab_size": gguf_file.tensors[a.tensor_name("token_embd")].shape[0],
        "hidden_size": hp.int("embedding_length"),
        "intermediate_size": hp.int("feed_forward_length"),
        "num_hidden_layers": hp.int("block_count"),
        "num_attention_heads": hp.int("attention.head_count"),
        "max_position_embeddings": hp.int("context_length"),
        "rms_norm_eps": hp.float("attention.layer_norm_rms_epsilon"),
        "tie_word_embeddings": False,
        "bos_token_id": gguf_file.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_file.get("tokenizer.ggml.eos_token_id"),
    }


def dense_config(arch: str, hp: HParams, a: Architecture) -> dict:
    """llama, qwen3, gemma3 and their MoE kin: the attention of LlamaConfig's family."""
    n_layer = hp.int("block_count")
    rope = {"rope_type": "default", "rope_theta": hp.float("rope.freq_base")}
    config = common_config(hp, a) | {
        "num_key_value_heads": hp.int("attention.head_count_kv"),
        "head_dim": hp.int("attention.key_length"),
        "rope_parameters": rope,
    }
    if arch in ("llama", "qwen2", "qwen3"):
        return config | {"model_type": arch}
    if arch == "mixtral":
        return config | {
            "model_type": "mixtral",
            "num_local_experts": hp.int("expert_count"),
            "num_experts_per_tok": hp.int("expert_used_count"),
        }
    if arch == "qwen3moe":
        return config | {
            "model_type": "qwen3_moe",
            "num_experts": hp.int("expert_count"),
            "num_experts_per_tok": hp.int("expert_used_count"),
            "moe_intermediate_size": hp.int("expert_feed_forward_length"),
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    assert arch == "gemma3"
    return config | {
        "model_type": "gemma3_text",
        "query_pre_attn_scalar": config["head_dim"],
        "sliding_window": hp.int("attention.sliding_window"),
        "layer_types": [
            "full_attention" if (il + 1) % a.sliding_window_pattern == 0 else "sliding_attention"
            for il in range(n_layer)
        ],
        "rope_parameters": {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": a.local_rope_base},
        },
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def deepseek2_config(hp: HParams, a: Architecture) -> dict:
    mla_split = hp.has("attention.key_length_mla")
    qk_rope = hp.int("rope.dimension_count")
    qk_head = hp.int("attention.key_length_mla") if mla_split else hp.int("attention.key_length")
    rope = {"rope_type": "default", "rope_theta": hp.float("rope.freq_base")}
    if hp.str("rope.scaling.type", "none") == "yarn":
        mscale_all_dim = hp.float("rope.scaling.yarn_log_multiplier") / 0.1
        rope = rope | {
            "rope_type": "yarn",
            "factor": hp.float("rope.scaling.factor"),
            "original_max_position_embeddings": hp.int("rope.scaling.original_context_length"),
            "beta_fast": hp.float("rope.scaling.yarn_beta_fast", YARN_BETA_FAST),
            "beta_slow": hp.float("rope.scaling.yarn_beta_slow", YARN_BETA_SLOW),
            "mscale": mscale_all_dim,
            "mscale_all_dim": mscale_all_dim,
        }
    n_groups = hp.int("expert_group_count", 0)
    config = common_config(hp, a) | {
        "num_key_value_heads": hp.int("attention.head_count"),
        "q_lora_rank": hp.int("attention.q_lora_rank") or None,
        "kv_lora_rank": hp.int("attention.kv_lora_rank"),
        "qk_nope_head_dim": qk_head - qk_rope,
        "qk_rope_head_dim": qk_rope,
        "v_head_dim": hp.int("attention.value_length_mla") if mla_split else hp.int("attention.value_length"),
        "rope_parameters": rope,
        "n_routed_experts": hp.int("expert_count"),
        "num_experts_per_tok": hp.int("expert_used_count"),
        "moe_intermediate_size": hp.int("expert_feed_forward_length"),
        "n_shared_experts": hp.int("expert_shared_count"),
        "first_k_dense_replace": hp.int("leading_dense_block_count"),
        "routed_scaling_factor": hp.float("expert_weights_scale", 1.0),
        "n_group": max(n_groups, 1),
        "topk_group": max(hp.int("expert_group_used_count", 0), 1),
    }
    if hp.int("expert_gating_func") == GATING_FUNC["sigmoid"]:
        return config | {"model_type": "deepseek_v3", "norm_topk_prob": hp.bool("expert_weights_norm", False)}
    if n_groups or hp.bool("expert_weights_norm", False):
        raise TinyModelError(f"{hp.gguf.path}: softmax gating with groups or weights norm has no transformers model")
    return config | {"model_type": "deepseek_v2", "topk_method": "greedy", "norm_topk_prob": False}


# -- weights ----------------------------------------------------------------------------------------


def tensor(gguf_file: GGUFFile, name: str) -> np.ndarray:
    return np.array(gguf_file.tensors[name].to_numpy(), dtype=np.float32)  # a writable copy, for torch


def norm(gguf_file: GGUFFile, name: str, a: Architecture) -> np.ndarray:
    w = tensor(gguf_file, name)
    return w - 1 if a.norms_plus_one else w  # HF's gemma norms scale by 1 + w


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute of llama's attn_q / attn_k rows: per head, rows in
    adjacent-pair order (NORM rope) back to halves order (HF's rotate_half)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def layer_weights(gguf_file: GGUFFile, a: Architecture, config: dict, il: int) -> dict[str, np.ndarray]:
    def blk(role: str) -> np.ndarray:
        return tensor(gguf_file, a.tensor_name(role, il))

    def has(role: str) -> bool:
        return any(t.role == role for t in a.tensors) and a.tensor_name(role, il) in gguf_file.tensors

    def norm_of(role: str) -> np.ndarray:
        return norm(gguf_file, a.tensor_name(role, il), a)

    hf = f"model.layers.{il}."
    out = {hf + "input_layernorm.weight": norm_of("attn_norm")}
    if a.mla:
        out |= mla_weights(blk, has, hf + "self_attn.", config)
    else:
        q, k = blk("attn_q"), blk("attn_k")
        if not a.rope_neox:
            q, k = unpermute(q, config["num_attention_heads"]), unpermute(k, config["num_key_value_heads"])
        at = hf + "self_attn."
        out |= {at + "q_proj.weight": q, at + "k_proj.weight": k}
        out |= {at + "v_proj.weight": blk("attn_v"), at + "o_proj.weight": blk("attn_output")}
        for proj in ("q", "k", "v"):  # qwen2's biases
            if has(f"attn_{proj}.bias"):
                out[at + f"{proj}_proj.bias"] = blk(f"attn_{proj}.bias")
        if a.qk_norm:
            out[at + "q_norm.weight"] = norm_of("attn_q_norm")
            out[at + "k_norm.weight"] = norm_of("attn_k_norm")
    if a.norms_plus_one:  # gemma3's sandwich norms
        out[hf + "post_attention_layernorm.weight"] = norm_of("post_attention_norm")
        out[hf + "pre_feedforward_layernorm.weight"] = norm_of("ffn_norm")
        out[hf + "post_feedforward_layernorm.weight"] = norm_of("post_ffw_norm")
    else:
        out[hf + "post_attention_layernorm.weight"] = blk("ffn_norm")
    m = hf + "mlp."
    if not has("ffn_gate_inp"):
        return out | {m + f"{p}_proj.weight": blk(f"ffn_{p}") for p in ("gate", "up", "down")}
    out[m + "gate.weight"] = blk("ffn_gate_inp")  # (n_expert, n_embd)
    gate_up = np.concatenate([blk("ffn_gate_exps"), blk("ffn_up_exps")], axis=1)
    out[m + "experts.gate_up_proj"] = gate_up  # (n_expert, 2 * n_ff_exp, n_embd)
    out[m + "experts.down_proj"] = blk("ffn_down_exps")  # (n_expert, n_embd, n_ff_exp)
    if config.get("model_type") == "deepseek_v3":
        n_expert = config["n_routed_experts"]
        bias = blk("exp_probs_b.bias") if has("exp_probs_b.bias") else np.zeros(n_expert, np.float32)
        out[m + "gate.e_score_correction_bias"] = bias
    if has("ffn_gate_shexp"):
        out |= {m + f"shared_experts.{p}_proj.weight": blk(f"ffn_{p}_shexp") for p in ("gate", "up", "down")}
    return out


def mla_weights(blk, has, a: str, config: dict) -> dict[str, np.ndarray]:
    """DeepseekV2/V3 attention from MLA tensors in either layout (blk: layer tensor by GGUF name)."""
    if config["q_lora_rank"]:
        out = {
            a + "q_a_proj.weight": blk("attn_q_a"),
            a + "q_a_layernorm.weight": blk("attn_q_a_norm"),
            a + "q_b_proj.weight": blk("attn_q_b"),
        }
    else:
        out = {a + "q_proj.weight": blk("attn_q")}
    if has("attn_kv_b"):
        kv_b = blk("attn_kv_b")  # (n_head * (nope + v), kv_lora)
    else:
        k_b = blk("attn_k_b").transpose(0, 2, 1)  # (n_head, nope, kv_lora)
        kv_b = np.concatenate([k_b, blk("attn_v_b")], axis=1).reshape(-1, config["kv_lora_rank"])
    return out | {
        a + "kv_a_proj_with_mqa.weight": blk("attn_kv_a_mqa"),
        a + "kv_a_layernorm.weight": blk("attn_kv_a_norm"),
        a + "kv_b_proj.weight": kv_b,
        a + "o_proj.weight": blk("attn_output"),
    }
