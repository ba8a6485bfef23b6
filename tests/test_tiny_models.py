"""The tiny synthetic models of refengine.testing: well-formed for our reader, gguf-py and llama.cpp,
and the same model in transformers through to_hf_state_dict.

llama.cpp is the judge of well-formedness: its loader fails on any key it needs and does not find,
on any tensor whose name or shape differs from what it creates, and on any tensor left over. So
each model, F32 and Q4_K_M, must load there and evaluate a prompt to finite, spread-out logits.
The other checks are independent of llama.cpp: names against gguf-py's per-architecture tensor
lists, shapes against the declarations (refengine.arch.declarations, a transcription of llama.cpp's
load_arch_tensors), and the Q4_K_M file
against the F32 one it was made from.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from refengine.errors import RefengineError
from refengine.gguf import open_gguf
from refengine.testing import (
    GGUF_ARCH,
    MODELS,
    check_spec,
    expected_shapes,
    moe_spec,
    spec_for,
    to_hf_state_dict,
    write_tiny_model,
)

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["f32", "q4_k_m"]
PROMPT = b"the number 1234 is hello world"
MAX_Q4_K_M_ERROR = 0.1  # relative RMS error of any tensor after Q4_K_M; Q4_K on Gaussian weights is ~0.072


# -- the files as our reader and gguf-py see them -------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", MODELS)
def test_reader_sees_llama_cpp_tensors(tiny_model, arch, variant):
    model = open_gguf(tiny_model(arch, variant))
    spec = spec_for(arch)
    assert model.architecture == GGUF_ARCH[arch]
    assert model.require(f"{model.architecture}.block_count") == spec.n_layer
    assert {name: t.shape for name, t in model.tensors.items()} == expected_shapes(arch, spec)
    assert len(model.metadata["tokenizer.ggml.tokens"]) == spec.n_vocab


@pytest.mark.parametrize("arch", MODELS)
def test_tensor_names_are_gguf_py_names(tiny_model, arch):
    """Every name is one gguf-py lists for the architecture (gguf.MODEL_TENSORS)."""
    model = open_gguf(tiny_model(arch))
    arch_enum = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[model.architecture]
    n_layer = spec_for(arch).n_layer
    known = {gguf.TENSOR_NAMES[t].format(bid=il) for t in gguf.MODEL_TENSORS[arch_enum] for il in range(n_layer)}
    unknown = [name for name in model.tensors if name.rsplit(".", 1)[0] not in known]
    assert not unknown


@pytest.mark.parametrize(
    ("arch", "head_count_kv", "key_length", "has_mla_keys"),
    [("deepseek2", 1, 256 + 32, True), ("deepseek2-kvb", 4, 64 + 32, False)],
)
def test_deepseek2_layout_keys(tiny_model, arch, head_count_kv, key_length, has_mla_keys):
    """The current layout has the *_mla keys and one KV head over the latent; the older one neither."""
    model = open_gguf(tiny_model(arch))
    assert model.require("deepseek2.attention.head_count_kv") == head_count_kv
    assert model.require("deepseek2.attention.key_length") == key_length
    assert ("deepseek2.attention.key_length_mla" in model.metadata) == has_mla_keys
    assert model.require("deepseek2.rope.scaling.type") == "yarn"
    assert model.require("deepseek2.expert_gating_func") == int(gguf.ExpertGatingFuncType.SIGMOID)


@pytest.mark.parametrize("arch", MODELS)
def test_q4_k_m_is_the_f32_model_quantized(tiny_model, arch):
    """Same tensors; every weight quantized (mostly Q4_K, some Q6_K, Q5_K, Q8_0 as llama.cpp's
    Q4_K_M policy picks, Q5_0 where a row is not a whole 256-block) and within MAX_Q4_K_M_ERROR of
    the F32 numbers; norms, biases and the MoE routers stay F32 (llama-quant.cpp never quantizes
    ffn_gate_inp: routing is too sensitive)."""
    f32, q4 = open_gguf(tiny_model(arch, "f32")), open_gguf(tiny_model(arch, "q4_k_m"))
    assert {n: t.shape for n, t in q4.tensors.items()} == {n: t.shape for n, t in f32.tensors.items()}
    types = {t.ggml_type for t in q4.tensors.values()}
    assert {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K} <= types
    for name, t in q4.tensors.items():
        stays_f32 = len(t.shape) == 1 or ".ffn_gate_inp." in name
        assert (t.ggml_type == gguf.GGMLQuantizationType.F32) == stays_f32, f"{name} is {t.ggml_type.name}"
        exact, approx = f32.tensors[name].to_numpy(), t.to_numpy()
        error = np.sqrt(np.mean((approx - exact) ** 2) / np.mean(exact**2))
        assert error < MAX_Q4_K_M_ERROR, f"{name} ({t.ggml_type.name}): relative RMS error {error:.3f}"


# -- determinism, specs, the script ---------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_tiny_model("llama", tmp_path / "a.gguf", seed=1).read_bytes()
    b = write_tiny_model("llama", tmp_path / "b.gguf", seed=1).read_bytes()
    c = write_tiny_model("llama", tmp_path / "c.gguf", seed=2).read_bytes()
    assert a == b
    assert len(a) == len(c) and a != c


@pytest.mark.parametrize(
    ("arch", "change", "words"),
    [
        ("deepseek2", {"n_expert_groups": 3}, "expert groups"),
        ("deepseek2", {"n_group_used": 1, "n_expert_used": 4}, "at least n_expert_used"),
        ("deepseek2", {"n_expert_shared": 0}, "shared expert"),
        ("deepseek2", {"n_leading_dense": 3}, "at least one MoE layer"),
        ("deepseek2", {"gating": "relu"}, "gating must be"),
        ("llama", {"n_expert": 4, "n_expert_used": 2}, "dense"),
        ("qwen3moe", {"n_expert_used": 9}, "n_expert_used <= n_expert"),
        ("gemma3", {"sliding_window": 0}, "sliding_window"),
        ("qwen3", {"n_head_kv": 3}, "multiple of n_head_kv"),
    ],
)
def test_specs_llama_cpp_would_refuse_are_one_clear_error(arch, change, words):
    with pytest.raises(RefengineError, match=words):
        check_spec(arch, replace(spec_for(arch), **change))


def test_unknown_names_are_clear_errors(tmp_path, tiny_model):
    with pytest.raises(RefengineError, match="unknown tiny model 'falcon'"):
        write_tiny_model("falcon", tmp_path / "x.gguf")
    with pytest.raises(RefengineError, match="unknown preset 'huge'"):
        spec_for("llama", "huge")
    with pytest.raises(RefengineError, match="a llama file, not a tiny qwen3 model"):
        to_hf_state_dict("qwen3", tiny_model("llama"))


@pytest.mark.parametrize("n_expert", [8, 64, 256])
def test_moe_spec_keeps_active_experts(n_expert):
    spec = moe_spec(n_expert)
    check_spec("deepseek2", spec)
    assert (spec.n_expert, spec.n_expert_used) == (n_expert, 8)


def test_script_makes_a_model_and_refuses_bad_flags(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py")]
    out = tmp_path / "m.gguf"
    done = subprocess.run([*script, "--arch", "qwen3", "--seed", "3", "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert open_gguf(out).architecture == "qwen3"
    bad = subprocess.run([*script, "--arch", "falcon", "-o", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "falcon" in bad.stderr
    assert subprocess.run([*script, "-h"], capture_output=True).returncode == 0


# -- llama.cpp --------------------------------------------------------------------------------------


def llama_cpp_logits(path: Path) -> tuple[list[int], np.ndarray]:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[oracle]')"
    )
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    try:
        tokens = llm.tokenize(PROMPT, add_bos=True)
        llm.eval(tokens)
        return tokens, np.array(llm.scores[: llm.n_tokens])  # (n_tok, n_vocab)
    finally:
        llm.close()


@pytest.mark.oracle
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", MODELS)
def test_llama_cpp_loads_and_runs_it(tiny_model, arch, variant):
    tokens, logits = llama_cpp_logits(tiny_model(arch, variant))
    assert np.isfinite(logits).all()
    spread = logits.std(axis=-1)  # about LOGIT_SPREAD = 3 nats at every position
    assert (spread > 2).all() and (spread < 5).all(), spread
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert np.median(top2[:, 1] - top2[:, 0]) > 0.2, "top-1 is a near-tie at most positions"
    # Not stuck on one token, nor echoing the input (what a tied head does with random weights).
    argmax = logits.argmax(axis=-1)
    assert len(set(argmax)) > len(tokens) // 2
    assert np.mean(argmax == np.array(tokens)) < 0.5


def assert_same_logits(ours: np.ndarray, theirs: np.ndarray, max_abs: float) -> None:
    """Within max_abs everywhere, and the same top-1 wherever `theirs` is not a near-tie."""
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < max_abs
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * max_abs
    assert (ours.argmax(-1) == theirs.argmax(-1))[decided].all()


@pytest.mark.oracle
def test_both_mla_layouts_are_one_model_in_llama_cpp(tiny_model):
    """attn_k_b/attn_v_b (absorbed MLA, MQA over the latent) and attn_kv_b (decompressed MHA) hold
    the same weights, so llama.cpp's two MLA paths must give the same logits."""
    _, split = llama_cpp_logits(tiny_model("deepseek2"))
    _, legacy = llama_cpp_logits(tiny_model("deepseek2-kvb"))
    assert_same_logits(split, legacy, max_abs=0.02)  # F32 weights, f16 KV cache: seen 0.006


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_refengine_dense_models_match_llama_cpp(tiny_model, arch):
    """The dense tiny models through refengine's tokenizer and forward pass: the files mean the
    same to both. 21 positions, so gemma3's window of 4 is exercised."""
    from refengine.session import Session

    path = tiny_model(arch)
    tokens, theirs = llama_cpp_logits(path)
    session = Session.load(str(path))
    assert session.tokenizer.encode(PROMPT.decode()) == tokens
    ours = session.model.forward(np.array(tokens), session.new_cache(64))
    assert_same_logits(ours, theirs, max_abs=0.05)  # llama.cpp keeps its KV cache in f16: seen 0.008


@pytest.mark.oracle
def test_rope_scaling_matches_llama_cpp(tmp_path):
    """rope.scaling.type linear divides positions by the factor, and llama3's rope_freqs.weight divides
    each pair's frequency by its factor, in refengine as in llama.cpp."""
    from refengine.session import Session
    from refengine.testing import PRESETS

    _, unscaled = llama_cpp_logits(write_tiny_model("llama", tmp_path / "llama.gguf"))
    for name, change in (("linear4", {"rope_linear_factor": 4.0}), ("llama3-freqs", {"rope_freq_factors": True})):
        path = write_tiny_model("llama", tmp_path / f"llama-{name}.gguf", replace(PRESETS["llama"]["tiny"], **change))
        tokens, theirs = llama_cpp_logits(path)
        assert np.abs(theirs - unscaled).max() > 0.2, name  # the scaling matters at these positions
        session = Session.load(str(path))
        ours = session.model.forward(np.array(tokens), session.new_cache(64))
        assert_same_logits(ours, theirs, max_abs=0.05)


@pytest.mark.oracle
@pytest.mark.parametrize("arch", MODELS)
def test_transformers_from_to_hf_state_dict_matches_llama_cpp(tiny_model, arch):
    """to_hf_state_dict's checkpoint in transformers' own model class (LlamaForCausalLM, ...,
    DeepseekV3ForCausalLM) gives llama.cpp's logits: the rope un-permutation, the gemma norms, the
    expert packing, kv_b_proj from attn_k_b/attn_v_b and the YaRN parameters are all right (a wrong
    YaRN mapping moves these logits by 7 nats)."""
    torch = pytest.importorskip("torch", reason="the transformers oracle needs torch (pip install -e '.[oracle]')")
    transformers = pytest.importorskip("transformers", reason="pip install -e '.[oracle]'")

    path = tiny_model(arch)
    tokens, theirs = llama_cpp_logits(path)
    config, weights = to_hf_state_dict(arch, path)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    hf.load_state_dict({name: torch.from_numpy(w) for name, w in weights.items()}, strict=True)
    with torch.no_grad():
        ours = hf.eval()(torch.tensor([tokens])).logits[0].numpy()
    assert_same_logits(ours, theirs, max_abs=0.05)  # seen 0.003-0.008
