"""Decoding in few calls (refengine/arch/decode.py, and deepseek2's MLA for one token) against the
layer-by-layer forward pass it replaces: in numerics ggml the same logits to the bit, in numerics exact
within float32 reassociation."""

import numpy as np
import pytest

import refengine
from refengine.arch.decode import paired_rows, spanned_rows

PROMPT = [1, 50, 60, 70, 80]


def decoded_logits(model, fused: bool, n_new: int = 12) -> np.ndarray:
    """A prompt, then n_new greedy tokens one at a time: every step's logits, (n_new + 1, n_vocab)."""
    kept = model.one_token_layers
    model.one_token_layers = kept if fused else None
    try:
        cache = model.new_cache(64)
        steps = [model.forward(np.array(PROMPT), cache, all_logits=False)]
        for _ in range(n_new):
            steps.append(model.forward(np.array([int(steps[-1][-1].argmax())]), cache, all_logits=False))
    finally:
        model.one_token_layers = kept
    return np.concatenate(steps)


@pytest.mark.parametrize(
    "arch", ["llama", "qwen2", "qwen3", "mixtral", "qwen3moe", "deepseek2", "deepseek2-kvb", "deepseek2-lite"]
)
@pytest.mark.parametrize("variant", ["f32", "q4_k_m"])
@pytest.mark.parametrize("numerics", ["ggml", "exact"])
def test_fused_decoding_is_the_layer_by_layer_pass(tiny_model, arch, variant, numerics):
    model = refengine.load(tiny_model(arch, variant), numerics=numerics).session.model
    assert model.one_token_layers is not None
    layered, fused = decoded_logits(model, False), decoded_logits(model, True)
    if numerics == "ggml":
        assert np.array_equal(fused, layered), f"{arch} {variant}: fused decoding differs from the layer-by-layer pass"
    else:
        scale = np.abs(layered).max()
        assert np.abs(fused - layered).max() <= 1e-5 * scale, f"{arch} {variant}: {np.abs(fused - layered).max()}"
        assert (fused.argmax(-1) == layered.argmax(-1)).all()


@pytest.mark.parametrize("numerics", ["ggml", "exact"])
def test_fused_decoding_on_smollm2(smollm_path, numerics):
    """SmolLM2's ffn_gate and ffn_up lie side by side in the file: one matvec over both; its attn_k, attn_output,
    attn_q, attn_v (Q4_1) start whole rows apart: q, k and v in one call over 192-row slices of their span."""
    model = refengine.load(smollm_path, numerics=numerics).session.model
    ffn = model.layers[0].ffn
    rows = paired_rows(ffn.ffn_gate, ffn.ffn_up)
    assert rows is not None and np.array_equal(rows[ffn.ffn_gate.n_out :], ffn.ffn_up.rows)
    attn = model.layers[0].attn
    view, n_out, slices = spanned_rows([attn.attn_q, attn.attn_k, attn.attn_v])
    assert n_out == 192 and list(slices) == [4, 5, 6, 0, 7]
    ours = view[np.concatenate([np.arange(s * n_out, (s + 1) * n_out) for s in slices])]
    assert np.array_equal(ours, np.concatenate([attn.attn_q.rows, attn.attn_k.rows, attn.attn_v.rows]))
    assert all(f is not None for f in model.one_token_layers.attention.qkv_of)
    layered, fused = decoded_logits(model, False, 6), decoded_logits(model, True, 6)
    if numerics == "ggml":
        assert np.array_equal(fused, layered)
    else:
        assert np.abs(fused - layered).max() <= 1e-5 * np.abs(layered).max()


def test_paired_rows_needs_adjacent_rows(tiny_model):
    """attn_q and attn_k are not side by side (attn_output lies between in llama.cpp's order): no view."""
    model = refengine.load(tiny_model("llama", "q4_k_m"), numerics="ggml").session.model
    attn = model.layers[0].attn
    assert paired_rows(attn.attn_k, attn.attn_q) is None
    assert paired_rows(attn.attn_q, attn.attn_q) is None
    assert spanned_rows([attn.attn_q, attn.attn_q]) is None  # overlapping rows
    assert spanned_rows([attn.attn_q, attn.attn_k, attn.attn_v]) is None  # Q4_K: llama.cpp repacks it
