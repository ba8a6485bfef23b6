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

from refengine.gguf import GGUFFile, open_gguf
from refengine.testing.tiny import (
    GATING_FUNC,
    GGUF_ARCH,
    QK_NORM,
    YARN_BETA_FAST,
    YARN_BETA_SLOW,
    TinyModelError,
)

SLIDING_WINDOW_PATTERN = 6  # gemma3: llama.cpp's set_swa_pattern(6), HF's layer_types
GEMMA3_LOCAL_ROPE_BASE = 10000.0


def to_hf_state_dict(arch: str, path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, weights) of tiny model file `path` made as `arch` (a name of refengine.testing.MODELS):
    keyword arguments for transformers.AutoConfig.for_model, and float32 arrays by HF parameter name."""
    model = open_gguf(path)
    if GGUF_ARCH.get(arch) != model.architecture:
        raise TinyModelError(f"{path}: a {model.architecture} file, not a tiny {arch} model")
    key = Keys(model)
    if model.architecture == "deepseek2":
        config = deepseek2_config(key, model)
    else:
        config = dense_config(arch, key)
    weights = {
        "model.embed_tokens.weight": tensor(model, "token_embd.weight"),
        "model.norm.weight": norm(model, "output_norm.weight", arch),
        "lm_head.weight": tensor(model, "output.weight"),
    }
    for il in range(key("block_count")):
        weights |= layer_weights(model, arch, config, il)
    return config, weights


class Keys:
    """`{arch}.*` metadata of one file: key("block_count"), key("expert_count", 0)."""

    def __init__(self, model: GGUFFile):
        self.model = model

    def __call__(self, name: str, default=None):
        value = self.model.get(f"{self.model.architecture}.{name}", default)
        if value is None:
            raise TinyModelError(f"{self.model.path}: missing {self.model.architecture}.{name}")
        return value.item() if isinstance(value, np.generic) else value


def common_config(key: Keys, model: GGUFFile) -> dict:
    return {
        "vocab_size": model.tensors["token_embd.weight"].shape[0],
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": key("attention.head_count"),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "tie_word_embeddings": False,
        "bos_token_id": model.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": model.get("tokenizer.ggml.eos_token_id"),
    }


def dense_config(arch: str, key: Keys) -> dict:
    """llama, qwen3, gemma3 and their MoE kin: the attention of LlamaConfig's family."""
    n_layer = key("block_count")
    rope = {"rope_type": "default", "rope_theta": key("rope.freq_base")}
    config = common_config(key, key.model) | {
        "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": key("attention.key_length"),
        "rope_parameters": rope,
    }
    if arch in ("llama", "qwen2", "qwen3"):
        return config | {"model_type": arch}
    if arch == "mixtral":
        return config | {
            "model_type": "mixtral",
            "num_local_experts": key("expert_count"),
            "num_experts_per_tok": key("expert_used_count"),
        }
    if arch == "qwen3moe":
        return config | {
            "model_type": "qwen3_moe",
            "num_experts": key("expert_count"),
            "num_experts_per_tok": key("expert_used_count"),
            "moe_intermediate_size": key("expert_feed_forward_length"),
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    assert arch == "gemma3"
    return config | {
        "model_type": "gemma3_text",
        "query_pre_attn_scalar": config["head_dim"],
        "sliding_window": key("attention.sliding_window"),
        "layer_types": [
            "full_attention" if (il + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention" for il in range(n_layer)
        ],
        "rope_parameters": {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_BASE},
        },
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def deepseek2_config(key: Keys, model: GGUFFile) -> dict:
    mla_split = "deepseek2.attention.key_length_mla" in model.metadata
    qk_rope = key("rope.dimension_count")
    qk_head = key("attention.key_length_mla") if mla_split else key("attention.key_length")
    rope = {"rope_type": "default", "rope_theta": key("rope.freq_base")}
    if key("rope.scaling.type", "none") == "yarn":
        mscale_all_dim = key("rope.scaling.yarn_log_multiplier") / 0.1
        rope = rope | {
            "rope_type": "yarn",
            "factor": key("rope.scaling.factor"),
            "original_max_position_embeddings": key("rope.scaling.original_context_length"),
            "beta_fast": key("rope.scaling.yarn_beta_fast", YARN_BETA_FAST),
            "beta_slow": key("rope.scaling.yarn_beta_slow", YARN_BETA_SLOW),
            "mscale": mscale_all_dim,
            "mscale_all_dim": mscale_all_dim,
        }
    n_groups = key("expert_group_count", 0)
    config = common_config(key, model) | {
        "num_key_value_heads": key("attention.head_count"),
        "q_lora_rank": key("attention.q_lora_rank") or None,
        "kv_lora_rank": key("attention.kv_lora_rank"),
        "qk_nope_head_dim": qk_head - qk_rope,
        "qk_rope_head_dim": qk_rope,
        "v_head_dim": key("attention.value_length_mla") if mla_split else key("attention.value_length"),
        "rope_parameters": rope,
        "n_routed_experts": key("expert_count"),
        "num_experts_per_tok": key("expert_used_count"),
        "moe_intermediate_size": key("expert_feed_forward_length"),
        "n_shared_experts": key("expert_shared_count"),
        "first_k_dense_replace": key("leading_dense_block_count"),
        "routed_scaling_factor": key("expert_weights_scale", 1.0),
        "n_group": max(n_groups, 1),
        "topk_group": max(key("expert_group_used_count", 0), 1),
    }
    if key("expert_gating_func") == GATING_FUNC["sigmoid"]:
        return config | {"model_type": "deepseek_v3", "norm_topk_prob": key("expert_weights_norm", False)}
    if n_groups or key("expert_weights_norm", False):
        raise TinyModelError(f"{model.path}: softmax gating with groups or weights norm has no transformers model")
    return config | {"model_type": "deepseek_v2", "topk_method": "greedy", "norm_topk_prob": False}


# -- weights ----------------------------------------------------------------------------------------


def tensor(model: GGUFFile, name: str) -> np.ndarray:
    return np.array(model.tensors[name].to_numpy(), dtype=np.float32)  # a writable copy, for torch


def norm(model: GGUFFile, name: str, arch: str) -> np.ndarray:
    w = tensor(model, name)
    return w - 1 if arch == "gemma3" else w  # HF's gemma norms scale by 1 + w


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute of llama's attn_q / attn_k rows: per head, rows in
    adjacent-pair order (NORM rope) back to halves order (HF's rotate_half)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def layer_weights(model: GGUFFile, arch: str, config: dict, il: int) -> dict[str, np.ndarray]:
    def blk(name: str) -> np.ndarray:
        return tensor(model, f"blk.{il}.{name}.weight")

    def has(name: str) -> bool:
        return f"blk.{il}.{name}.weight" in model.tensors

    hf = f"model.layers.{il}."
    out = {hf + "input_layernorm.weight": norm(model, f"blk.{il}.attn_norm.weight", arch)}
    if model.architecture == "deepseek2":
        out |= mla_weights(blk, has, hf + "self_attn.", config)
    else:
        q, k = blk("attn_q"), blk("attn_k")
        if model.architecture == "llama":
            q, k = unpermute(q, config["num_attention_heads"]), unpermute(k, config["num_key_value_heads"])
        a = hf + "self_attn."
        out |= {a + "q_proj.weight": q, a + "k_proj.weight": k}
        out |= {a + "v_proj.weight": blk("attn_v"), a + "o_proj.weight": blk("attn_output")}
        for proj in ("q", "k", "v"):  # qwen2's biases
            if f"blk.{il}.attn_{proj}.bias" in model.tensors:
                out[a + f"{proj}_proj.bias"] = tensor(model, f"blk.{il}.attn_{proj}.bias")
        if arch in QK_NORM:
            out[a + "q_norm.weight"] = norm(model, f"blk.{il}.attn_q_norm.weight", arch)
            out[a + "k_norm.weight"] = norm(model, f"blk.{il}.attn_k_norm.weight", arch)
    if arch == "gemma3":
        out[hf + "post_attention_layernorm.weight"] = norm(model, f"blk.{il}.post_attention_norm.weight", arch)
        out[hf + "pre_feedforward_layernorm.weight"] = norm(model, f"blk.{il}.ffn_norm.weight", arch)
        out[hf + "post_feedforward_layernorm.weight"] = norm(model, f"blk.{il}.post_ffw_norm.weight", arch)
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
        bias_name = f"blk.{il}.exp_probs_b.bias"
        n_expert = config["n_routed_experts"]
        bias = tensor(model, bias_name) if bias_name in model.tensors else np.zeros(n_expert, np.float32)
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
