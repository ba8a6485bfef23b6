"""The mixture-of-experts feed-forward and the MoE architectures (qwen3moe, mixtral, deepseek2 in both
MLA layouts, deepseek2-lite) on the tiny models of refengine.testing.

- routing: refengine.arch.moe.route against a per-token Python transcription of build_moe_ffn;
  a batch grouped by expert against a per-token dense numpy reference;
- the whole model against transformers' own classes (DeepseekV3/V2ForCausalLM, Qwen3Moe, Mixtral)
  in float32 and float64, and YaRN's frequencies and scales against theirs;
- against llama.cpp on the Q4_K_M files: live (oracle) and from the committed golden file;
- token-by-token decoding through MLA's compressed cache against the batch path;
- bad MoE metadata: one clear error naming the key or tensor.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

import refengine.nn as nn
import refengine.testing.tiny as tiny
from refengine.arch.moe import MoE, MoEConfig, route
from refengine.cli import main
from refengine.errors import RefengineError
from refengine.gguf import open_gguf
from refengine.session import Session
from refengine.testing import MOE_MODELS, spec_for, to_hf_state_dict, write_tiny_model
from refengine.testing.moe_oracle import (
    N_CTX,
    PROMPTS,
    Scores,
    forward_with_margins,
    load_golden_moe,
    make_q4_k_m,
    needs_decided_positions,
    sha256,
)
from refengine.testing.oracle_utils import (
    N_GENERATE,
    binned_kl,
    kl_divergence,
    llama_cpp_generate_and_score,
    log_softmax,
)

SEQUENCE = np.random.default_rng(7).integers(0, 510, size=48)  # random ids below the tiny vocabularies' BOS/EOS
MAX_DIFF_F32 = 1e-3  # max |d log-softmax| against transformers in float32; seen 1.1-2.3e-5
# float64 against transformers' .double(): what is left is transformers' own float32 islands (RMSNorm,
# the rope tables and the routers compute in float32 whatever the model's dtype); seen 2.4-3.8e-6.
MAX_DIFF_F64 = 2e-5
MAX_DECODE_DIFF = 1e-3  # max |d logit| decode vs batch in float32 (other summation orders); seen 1.1-1.7e-5


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    """arch -> its tiny Q4_K_M file, quantized by refengine (the same bytes as llama.cpp's: see the golden test)."""
    folder, made = tmp_path_factory.mktemp("moe_q4_k_m"), {}

    def get(arch: str):
        if arch not in made:
            made[arch] = make_q4_k_m(arch, folder)
        return made[arch]

    return get


# -- routing ----------------------------------------------------------------------------------------


def naive_route(logits: np.ndarray, c: MoEConfig, bias: np.ndarray | None) -> dict[int, float]:
    """One token's experts and weights, read off llama.cpp's build_moe_ffn step by step, in plain Python."""
    if c.gating == "softmax":
        e = [np.exp(v - max(logits)) for v in logits]
        probs = [v / sum(e) for v in e]
    else:
        probs = [1 / (1 + np.exp(-v)) for v in logits]
    scores = list(probs) if bias is None else [p + b for p, b in zip(probs, bias, strict=True)]
    candidates = range(c.n_expert)
    if c.n_group > 1:
        size = c.n_expert // c.n_group
        group_score = [sum(sorted(scores[g * size : (g + 1) * size])[-2:]) for g in range(c.n_group)]
        best_groups = sorted(range(c.n_group), key=lambda g: -group_score[g])[: c.n_group_used]
        candidates = [e for e in candidates if e // size in best_groups]
    chosen = sorted(candidates, key=lambda e: -scores[e])[: c.n_expert_used]
    weights = [probs[e] for e in chosen]
    if c.weights_norm:
        weights = [w / sum(weights) for w in weights]
    return {e: w * c.weights_scale for e, w in zip(chosen, weights, strict=True)}


ROUTINGS = {
    "mixtral (softmax, renormalised)": MoEConfig(8, 2, 16, "softmax", True, 1.0, 0, 0, 0),
    "deepseek-v2-lite (softmax, scaled)": MoEConfig(16, 6, 16, "softmax", False, 1.5, 0, 0, 0),
    "deepseek-v3 (sigmoid, groups, bias)": MoEConfig(64, 8, 16, "sigmoid", True, 2.5, 8, 4, 1),
    "sigmoid, no norm, no bias": MoEConfig(32, 4, 16, "sigmoid", False, 1.0, 4, 2, 1),
}


@pytest.mark.parametrize("name", ROUTINGS)
def test_route_matches_build_moe_ffn_token_by_token(name):
    c = ROUTINGS[name]
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, c.n_expert))
    bias = rng.standard_normal(c.n_expert) * 0.1 if "bias" in name else None
    chosen, weights = route(logits, c, bias)
    assert chosen.shape == weights.shape == (64, c.n_expert_used)
    for t in range(64):
        expected = naive_route(logits[t], c, bias)
        assert set(chosen[t].tolist()) == set(expected)
        np.testing.assert_allclose(weights[t], [expected[e] for e in chosen[t]], rtol=1e-12)


def naive_moe(gguf, il: int, c: MoEConfig, x: np.ndarray) -> np.ndarray:
    """The MoE layer one token at a time, from the dequantized dense weights, in float64."""

    def w(name: str) -> np.ndarray:
        return gguf.tensors[f"blk.{il}.{name}"].to_numpy().astype(np.float64)

    gate_inp, gate = w("ffn_gate_inp.weight"), w("ffn_gate_exps.weight")  # (n_expert, n_embd), (n_expert, ff, n_embd)
    up, down = w("ffn_up_exps.weight"), w("ffn_down_exps.weight")  # (n_expert, ff, n_embd), (n_expert, n_embd, ff)
    bias = w("exp_probs_b.bias") if f"blk.{il}.exp_probs_b.bias" in gguf.tensors else None
    out = np.zeros_like(x)
    for t, xt in enumerate(x):
        for e, weight in naive_route(gate_inp @ xt, c, bias).items():
            g = gate[e] @ xt
            out[t] += weight * (down[e] @ (g / (1 + np.exp(-g)) * (up[e] @ xt)))
        if c.n_expert_shared:
            g = w("ffn_gate_shexp.weight") @ xt
            out[t] += w("ffn_down_shexp.weight") @ (g / (1 + np.exp(-g)) * (w("ffn_up_shexp.weight") @ xt))
    return out


@pytest.mark.parametrize("arch", ["deepseek2", "qwen3moe"])
def test_batch_grouped_by_expert_matches_token_by_token(q4_k_m, arch):
    """A 24-token batch through one MoE layer (each chosen expert once, over its tokens) equals the
    per-token dense reference, and only the chosen experts were ever built."""
    model = Session.load(str(q4_k_m(arch)), "f64").model
    il = model.config.n_layer - 1
    moe_layer: MoE = model.layers[il].ffn
    x = np.random.default_rng(1).standard_normal((24, model.config.n_embd))
    ours = moe_layer(x)
    np.testing.assert_allclose(ours, naive_moe(model.gguf, il, moe_layer.config, x), rtol=1e-9, atol=1e-12)
    chosen, _ = route(moe_layer.ffn_gate_inp(x), moe_layer.config, moe_layer.exp_probs_b)
    assert set(moe_layer.experts) == set(np.unique(chosen).tolist())


# -- transformers -----------------------------------------------------------------------------------


def transformers_model(arch: str, path, torch, transformers):
    config, weights = to_hf_state_dict(arch, path)
    hf_config = transformers.AutoConfig.for_model(**config, attn_implementation="eager", experts_implementation="eager")
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf.load_state_dict({name: torch.from_numpy(w) for name, w in weights.items()}, strict=True)
    return hf.eval()


@pytest.mark.oracle
@pytest.mark.parametrize("arch", MOE_MODELS)
def test_matches_transformers(tiny_model, arch):
    """The F32 file in refengine (f32 and f64) and in transformers' own class (float32 and .double())."""
    torch = pytest.importorskip("torch", reason="the transformers oracle needs torch (pip install -e '.[oracle]')")
    transformers = pytest.importorskip("transformers", reason="pip install -e '.[oracle]'")
    path = tiny_model(arch)
    hf = transformers_model(arch, path, torch, transformers)
    for precision, bound in (("f32", MAX_DIFF_F32), ("f64", MAX_DIFF_F64)):
        if precision == "f64":
            hf = hf.double()
        with torch.no_grad():
            theirs = hf(torch.tensor(SEQUENCE[None])).logits[0].numpy()
        session = Session.load(str(path), precision)
        ours = session.model.forward(SEQUENCE, session.new_cache(len(SEQUENCE)))
        diff = np.abs(log_softmax(ours) - log_softmax(theirs)).max()
        print(f"{arch} {precision}: max |d log-softmax| {diff:.2e}")
        assert diff <= bound
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.oracle
@pytest.mark.parametrize(("factor", "mscale_all_dim"), [(4.0, 1.0), (40.0, 1.0), (16.0, 0.707)])
def test_yarn_frequencies_and_scales_match_transformers(tmp_path, factor, mscale_all_dim):
    """YaRN as refengine reads it from GGUF keys (llama.cpp's way) against DeepseekV3's rope and
    attention: the blended frequencies, the size of cos and sin, and the attention scale with mscale^2."""
    torch = pytest.importorskip("torch", reason="the transformers oracle needs torch (pip install -e '.[oracle]')")
    transformers = pytest.importorskip("transformers", reason="pip install -e '.[oracle]'")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds3

    base = spec_for("deepseek2")
    spec = replace(
        base,
        n_layer=2,
        n_ctx_train=int(factor * base.yarn_orig_ctx),  # as transformers expects: the extended context
        yarn_factor=factor,
        yarn_mscale_all_dim=mscale_all_dim,
    )
    path = write_tiny_model("deepseek2", tmp_path / "yarn.gguf", spec=spec)
    config = transformers.AutoConfig.for_model(**to_hf_state_dict("deepseek2", path)[0])
    ours = Session.load(str(path)).model.config
    rotary = ds3.DeepseekV3RotaryEmbedding(config)
    np.testing.assert_allclose(ours.rope.inv_freq, rotary.inv_freq.double().numpy(), rtol=1e-6)
    assert ours.rope.yarn.magnitude == pytest.approx(rotary.attention_scaling, rel=1e-6)
    assert ours.attn_scale == pytest.approx(ds3.DeepseekV3Attention(config, 0).scaling, rel=1e-6)
    del torch


def test_both_mla_layouts_are_one_model(tiny_model):
    """attn_k_b/attn_v_b and the older attn_kv_b hold the same weights: in float64 the same logits."""
    logits = []
    for arch in ("deepseek2", "deepseek2-kvb"):
        session = Session.load(str(tiny_model(arch)), "f64")
        logits.append(session.model.forward(SEQUENCE[:16], session.new_cache(16)))
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-9)


# -- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["deepseek2", "deepseek2-kvb", "qwen3moe"])
def test_decode_token_by_token_matches_the_batch(q4_k_m, arch, monkeypatch):
    """One token at a time (fused matvec kernels, MLA's compressed cache) gives the batch's logits."""
    calls, bind = [], nn.bound_matvec

    def counting(ggml_type, rows, *args):  # every Linear's kernel, counted when a token goes through it
        kernel = bind(ggml_type, rows, *args)
        return lambda x, out: calls.append(ggml_type) or kernel(x, out)

    monkeypatch.setattr(nn, "bound_matvec", counting)
    session = Session.load(str(q4_k_m(arch)))
    tokens = SEQUENCE[:24]
    batch = session.model.forward(tokens, session.new_cache(len(tokens)))
    calls.clear()  # (an expert that one token of the batch chose runs as a matvec too)
    cache = session.new_cache(len(tokens))
    decoded = np.concatenate([session.model.forward(tokens[i : i + 1], cache) for i in range(len(tokens))])
    assert calls, "decoding did not go through the fused matvec kernels"
    diff = np.abs(decoded - batch).max()
    print(f"{arch}: decode vs batch max |d logit| {diff:.2e}, {len(calls) // len(tokens)} matvec calls a token")
    assert diff <= MAX_DECODE_DIFF
    assert (decoded.argmax(-1) == batch.argmax(-1)).all()
    if arch.startswith("deepseek2"):
        c = session.model.config
        # the latent and the rope key, one head, not keys and values per head; the values a view of the latent
        for layer in cache.layers:
            assert layer.k.shape == (1, len(tokens), c.kv_lora_rank + c.qk_rope_dim)
            assert layer.v.shape == (1, len(tokens), c.kv_lora_rank) and np.shares_memory(layer.k, layer.v)
        assert cache.nbytes == c.n_layer * len(tokens) * (c.kv_lora_rank + c.qk_rope_dim) * 4


# -- llama.cpp --------------------------------------------------------------------------------------


def scores_against(model, cases) -> Scores:
    """Scores over (tokens, top_ids, top_logprobs or None, full llama.cpp logits or None) cases."""
    kl, top1, margin = [], [], []
    for tokens, their_ids, their_logp, their_logits in cases:
        ours, m = forward_with_margins(model, tokens)
        our_logp = log_softmax(ours)
        if their_logits is not None:
            kl.append(kl_divergence(log_softmax(their_logits), our_logp))
        else:  # a top-k golden: merging the rest into one bin gives a lower bound on the KL
            kl.append(binned_kl(their_ids, their_logp.astype(np.float64), our_logp))
        top1.append(ours.argmax(-1) == their_ids[:, 0])
        margin.append(m)
    return Scores(np.concatenate(kl), np.concatenate(top1), np.concatenate(margin))


@pytest.mark.oracle
@pytest.mark.parametrize("arch", MOE_MODELS)
def test_q4_k_m_matches_llama_cpp(tiny_model, arch):
    """Each prompt continued greedily by llama.cpp for N_GENERATE tokens, then teacher-forced through
    both, on llama.cpp's own Q4_K_M file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[oracle])")
    path = tiny_model(arch, "q4_k_m")
    session = Session.load(str(path))
    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, logits_all=True, n_threads=2, verbose=False)
    cases = []
    try:
        for p in PROMPTS:
            n_prompt, tokens, _, logits = llama_cpp_generate_and_score(llm, p)
            assert session.tokenizer.encode(p.text) == tokens[:n_prompt]
            cases.append((tokens, logits.argmax(-1)[:, None], None, logits))
    finally:
        llm.close()
    scores = scores_against(session.model, cases)
    print(f"{arch}: {scores.summary()}")
    scores.check(decided_only=needs_decided_positions(session.model))


@pytest.mark.parametrize("arch", MOE_MODELS)
def test_q4_k_m_matches_llama_cpp_golden(q4_k_m, arch):
    """The same against the committed golden file, on the same bytes: refengine's quantizer rebuilds the
    file llama.cpp quantized, and its sha256 must be the one the golden was made from."""
    meta, cases = load_golden_moe()
    assert meta["n_generate"] == N_GENERATE
    path = q4_k_m(arch)
    assert sha256(path) == meta["models"][arch]["sha256"], (
        f"{arch}: the Q4_K_M file is not the one the golden was made from; run scripts/make_golden_moe.py"
    )
    session = Session.load(str(path))
    golden = [cases[arch, p.name] for p in PROMPTS]
    for p, g in zip(PROMPTS, golden, strict=True):
        assert g.tokens[: g.n_prompt].tolist() == session.tokenizer.encode(p.text)
    scores = scores_against(session.model, [(g.tokens, g.top_ids, g.top_logprobs, None) for g in golden])
    print(f"{arch}: {scores.summary()} (KL: the top-16 lower bound)")
    scores.check(decided_only=needs_decided_positions(session.model))


# -- bad metadata -----------------------------------------------------------------------------------


def write_unchecked(arch: str, path, monkeypatch, drop: str = "", reshape: dict | None = None, **change):
    """A tiny model llama.cpp would refuse: spec fields changed past check_spec, a tensor dropped, or one
    written in another shape."""
    monkeypatch.setattr(tiny, "check_spec", lambda arch, spec: None)
    add = tiny.Weights.add

    def add_edited(self, name, array):
        if name == drop:
            return
        add(self, name, array[..., : reshape[name]] if reshape and name in reshape else array)

    monkeypatch.setattr(tiny.Weights, "add", add_edited)
    return write_tiny_model(arch, path, spec=replace(spec_for(arch), **change))


BAD_FILES = [
    ("qwen3moe", dict(n_expert_used=9), r"qwen3moe\.expert_used_count is 9, not between 1 and qwen3moe\.expert_count"),
    ("mixtral", dict(n_expert_used=0), r"llama\.expert_used_count is 0"),
    (
        "deepseek2",
        dict(n_expert_groups=3),
        r"deepseek2\.expert_group_count \(3\) does not divide deepseek2\.expert_count \(8\)",
    ),
    ("deepseek2", dict(n_group_used=4), r"deepseek2\.expert_group_used_count is 4, not between 1 and"),
    (
        "deepseek2",
        dict(n_group_used=1, n_expert_used=4),
        r"expert_group_used_count \(1\) groups of 2 experts hold fewer",
    ),
    ("deepseek2", dict(n_expert=4, n_expert_groups=4), r"expert_group_count \(4\) leaves groups of one expert"),
    ("deepseek2", dict(drop="blk.2.ffn_up_exps.weight"), r"missing tensor 'blk\.2\.ffn_up_exps\.weight'"),
    ("qwen3moe", dict(drop="blk.0.ffn_gate_inp.weight"), r"missing tensor 'blk\.0\.ffn_gate_inp\.weight'"),
    ("deepseek2", dict(drop="blk.1.ffn_down_shexp.weight"), r"missing tensor 'blk\.1\.ffn_down_shexp\.weight'"),
    (
        "deepseek2",
        dict(reshape={"blk.1.ffn_down_exps.weight": 128}),
        r"tensor 'blk\.1\.ffn_down_exps\.weight' has shape \(8, 256, 128\), expected \(8, 256, 256\)",
    ),
    ("deepseek2", dict(reshape={"blk.2.exp_probs_b.bias": 4}), r"'blk\.2\.exp_probs_b\.bias' has shape \(4,\)"),
    ("deepseek2-kvb", dict(drop="blk.0.attn_kv_b.weight"), r"missing tensor 'blk\.0\.attn_kv_b\.weight'"),
]


@pytest.mark.parametrize(("arch", "change", "message"), BAD_FILES)
def test_bad_moe_metadata_is_one_clear_error_at_load(tmp_path, monkeypatch, arch, change, message):
    path = write_unchecked(arch, tmp_path / "bad.gguf", monkeypatch, **change)
    with pytest.raises(RefengineError, match=message) as error:
        Session.load(str(path))
    assert str(path) in str(error.value)


def test_bad_moe_metadata_through_the_cli(tmp_path, monkeypatch, capsys):
    path = write_unchecked("qwen3moe", tmp_path / "bad.gguf", monkeypatch, n_expert_used=9)
    code = main(["logits", "-m", str(path), "--tokens", "1,2", "--out", str(tmp_path / "l.npy")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "qwen3moe.expert_used_count is 9" in err


def test_unknown_gating_function_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(tiny.GATING_FUNC, "sigmoid", SimpleNamespace(value=5))  # what GGUFWriter reads of an enum
    path = write_tiny_model("deepseek2", tmp_path / "bad.gguf")
    assert open_gguf(path).require("deepseek2.expert_gating_func") == 5
    with pytest.raises(RefengineError, match=r"deepseek2\.expert_gating_func is 5"):
        Session.load(str(path))
