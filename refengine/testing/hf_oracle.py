"""transformers (CPU torch) as an exact reference: its float32 islands recomputed in float64.

transformers computes some things in float32 whatever the model's dtype: the RoPE tables,
RMSNorm (`.float()`) and gemma's sqrt(n_embd) embedding scale. `float64_islands` patches
them for the duration of a block; see tests/test_oracle_transformers.py for what each is
worth. Imported by that test and by scripts/make_golden_generate.py, only where torch is.
"""

import contextlib

import torch


def rms_norm_f64(module, x):
    """RMSNorm in the input's dtype, where transformers' own goes through float32."""
    eps = module.eps if hasattr(module, "eps") else module.variance_epsilon
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if type(module).__name__.startswith("Gemma"):
        # Gemma scales by (1 + w). The GGUF stores 1 + w in float32 and the loader subtracted 1
        # in float32; adding it back in float32 restores the stored value exactly.
        return normed * (1.0 + module.weight.float()).to(x.dtype)
    return normed * module.weight


def rope_tables_f64(module, x, position_ids, layer_type=None):
    """cos and sin for the positions, computed in float64 and returned in x's dtype."""
    config = module.config
    params = config.rope_parameters[layer_type] if layer_type else config.rope_parameters
    scaling = getattr(module, f"{layer_type}_attention_scaling" if layer_type else "attention_scaling")
    assert params["rope_type"] == "default" and scaling == 1.0  # what we reimplement
    dim = config.head_dim
    inv_freq = params["rope_theta"] ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    theirs = getattr(module, f"{layer_type}_inv_freq" if layer_type else "inv_freq")
    torch.testing.assert_close(theirs.double(), inv_freq, rtol=1e-6, atol=0)  # the same frequencies
    angles = position_ids[..., None].double() * inv_freq  # (batch, n_tok, dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # rotate_half layout
    return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


@contextlib.contextmanager
def float64_islands(hf, everything: bool):
    """Within the block, transformers' RoPE tables (and with everything=True its RMSNorm and
    gemma's embedding scale too) are computed in float64."""
    patched, scales = [], []
    for module in hf.modules():
        name = type(module).__name__
        if name.endswith("RotaryEmbedding"):
            module.forward = rope_tables_f64.__get__(module)
            patched.append(module)
        elif everything and name.endswith("RMSNorm"):
            module.forward = rms_norm_f64.__get__(module)
            patched.append(module)
        if everything and hasattr(module, "scalar_embed_scale"):  # gemma's sqrt(n_embd)
            scales.append((module, module.embed_scale))
            module.embed_scale = torch.tensor(module.scalar_embed_scale, dtype=torch.float64)
    assert patched, "no rotary embedding found: has transformers renamed it?"
    try:
        yield hf
    finally:
        for module in patched:
            del module.forward  # back to the class's
        for module, scale in scales:
            module.embed_scale = scale
