"""Long contexts: micro-batched prefill, tiled attention with the online softmax, sliding-window rings,
the fused decode kernel and the thread policy, each against a reference that does none of it.

The reference is the same model evaluating the whole sequence as one batch with one key block: the
plain softmax over a materialised (heads, n_tok, n_kv) score array.
"""

import numpy as np
import pytest
from refengine.kernels import attend_one_token

import refengine.nn
from refengine.nn import KVCache, LayerCache, attention, lazy_zeros
from refengine.session import Session

N_LONG = 3000


def naive_attention(q, k, v, q_positions, k_positions, scale, window=0):
    """softmax(scale * q k^T, masked) v in float64, written out: q (n_tok, n_head, d), k/v (n_kv, n_kv_head, d)."""
    n_head, n_kv_head = q.shape[1], k.shape[1]
    k = np.repeat(k.astype(np.float64), n_head // n_kv_head, axis=1)  # (n_kv, n_head, d)
    v = np.repeat(v.astype(np.float64), n_head // n_kv_head, axis=1)
    scores = np.einsum("thd,khd->htk", q.astype(np.float64), k) * scale
    visible = k_positions[None, :] <= q_positions[:, None]
    if window:
        visible &= k_positions[None, :] > q_positions[:, None] - window
    scores = np.where(visible[None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("htk,khd->thd", p, v)


def filled_layer(rng, n_kv_head, n_slots, dk, dv, window, positions, dtype):
    """A LayerCache whose ring holds random keys and values for `positions`, and those k, v in order."""
    layer = LayerCache(lazy_zeros((n_kv_head, n_slots, dk), dtype), lazy_zeros((n_kv_head, n_slots, dv), dtype), window)
    k = rng.standard_normal((len(positions), n_kv_head, dk)).astype(dtype)
    v = rng.standard_normal((len(positions), n_kv_head, dv)).astype(dtype)
    layer.store(int(positions[0]), k, v)
    return layer, k, v


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize(
    "n_head, n_kv_head, dk, dv, window, first, n_tok, n_slots",
    [
        (4, 1, 256, 256, 0, 0, 700, 700),  # gemma3's global layers: one KV head, several key blocks
        (9, 3, 64, 64, 0, 40, 300, 400),  # smollm2: GQA over a cache with earlier positions
        (4, 1, 32, 32, 48, 1000, 200, 48 + 200),  # a sliding window in a ring that wraps mid-batch
        (8, 1, 80, 64, 0, 0, 150, 160),  # MLA-like: keys wider than values
        (4, 2, 16, 16, 0, 77, 1, 100),  # one token: the fused kernel
        (4, 1, 32, 32, 48, 1000, 1, 48 + 200),  # one token in a wrapped ring
    ],
)
def test_attention_equals_the_naive_softmax(
    monkeypatch, n_head, n_kv_head, dk, dv, window, first, n_tok, n_slots, dtype, tol
):
    monkeypatch.setattr(refengine.nn, "ATTENTION_TILE_FLOATS", 4096)  # many key blocks
    rng = np.random.default_rng(n_head * 1000 + first)
    begin = max(0, first - window + 1) if window else 0  # the earliest key the batch needs
    positions = np.arange(begin, first + n_tok)
    layer, k, v = filled_layer(rng, n_kv_head, n_slots, dk, dv, window, positions, dtype)
    q = rng.standard_normal((n_tok, n_head, dk)).astype(dtype)
    ours = attention(q, layer, first, 1 / np.sqrt(dk))
    reference = naive_attention(q, k, v, np.arange(first, first + n_tok), positions, 1 / np.sqrt(dk), window)
    assert ours.dtype == dtype and ours.shape == (n_tok, n_head, dv)
    assert np.abs(ours - reference).max() <= tol


def test_one_token_kernel_splits_the_keys_over_ranges_exactly():
    """The flash-decoding merge of per-range partial results, at every split count."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 64))
    k = rng.standard_normal((2, 1000, 64))
    v = rng.standard_normal((2, 1000, 48))
    results = []
    for n_split in (1, 2, 3, 7, 64):
        out = np.empty((2, 3, 48))
        refengine.kernels.attention.attend_one_token(q, k, v, 5, 990, 0.125, n_split, out)
        results.append(out)
    reference = naive_attention(
        q.reshape(1, 6, 64),
        k[:, 5:995].transpose(1, 0, 2),
        v[:, 5:995].transpose(1, 0, 2),
        np.array([2000]),
        np.arange(990),
        0.125,
    )[0].reshape(2, 3, 48)
    for out in results:
        assert np.abs(out - reference).max() <= 1e-13


def test_wrong_shapes_are_refused():
    q = np.zeros((2, 3, 8), np.float32)
    k = np.zeros((2, 10, 8), np.float32)
    with pytest.raises(ValueError):
        attend_one_token(q, k, k, 0, 11, 1.0, np.empty((2, 3, 8), np.float32))  # more keys than slots
    with pytest.raises(ValueError):
        attend_one_token(q, k, k.astype(np.float64), 0, 5, 1.0, np.empty((2, 3, 8), np.float32))


def test_a_ring_that_moved_past_the_window_cannot_be_rewound():
    cache = KVCache.for_heads(4096, 1, 4, 4, np.float32, [100, 0], n_ubatch=50)
    assert [layer.n_slots for layer in cache.layers] == [150, 4096]
    assert cache.max_batch == 50
    cache.n_past = 1000
    assert cache.keep(990) == 990  # the ring still holds 850..999, and 891..989 is what 990 needs
    cache.n_past = 1000
    assert cache.keep(900) == 0  # 801..899 were overwritten: evaluate again from the start


def long_tokens(session, n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(10, session.model.config.n_vocab, size=n)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def hidden_and_logits(model, tokens: np.ndarray, cache) -> tuple[np.ndarray, np.ndarray]:
    """The last layer's output at every position (n_tok, n_embd), seen through the observer, and the
    logits of the last position (n_vocab,): what every position's logits are a fixed function of,
    without gemma3's 3,000 x 262,144 logits (3 GB in float32)."""
    name, hidden = f"l_out-{model.config.n_layer - 1}", []
    logits = model.forward(tokens, cache, all_logits=False, observer=lambda n, x: n == name and hidden.append(x))
    return np.concatenate(hidden), logits[-1]


@pytest.mark.parametrize(
    "model, precision",
    [
        ("gemma3-270m", "f32"),
        ("smollm2-135m", "f32"),
        ("gemma3-270m", "f64"),
    ],
)
def test_chunked_tiled_prefill_equals_one_batch(request, monkeypatch, model, precision):
    """3,000 tokens in micro-batches of 512, keys in blocks, gemma3's local layers in rings of 1,024,
    then one decoded token (the fused kernel), against one batch with one key block, whose last token
    is decoded as the second of a batch of two (the tiled path).

    The float32 bar is float32's own noise: the same one-batch forward of 3,000 and 3,001 tokens differs
    by up to 1.5e-5 of the largest logit on gemma3, from BLAS blocking the products differently."""
    request.getfixturevalue({"gemma3-270m": "gemma_path", "smollm2-135m": "smollm_path"}[model])
    session = Session.load(model, precision)
    m = session.model
    tokens = long_tokens(session, N_LONG + 1)
    cache = m.new_cache(N_LONG + 1)
    hidden, _ = hidden_and_logits(m, tokens[:N_LONG], cache)  # (N_LONG, n_embd)
    decoded = m.forward(tokens[N_LONG:], cache)[0]  # (n_vocab,)
    assert model != "gemma3-270m" or cache.layers[0].n_slots == 512 + 512  # gemma3's layer 0 is a ring

    monkeypatch.setattr(m, "n_ubatch", N_LONG + 1)
    monkeypatch.setattr(refengine.nn, "ATTENTION_TILE_FLOATS", 1 << 40)
    reference = m.new_cache(N_LONG + 1)
    hidden_whole, _ = hidden_and_logits(m, tokens[:N_LONG], reference)
    reference.keep(N_LONG - 1)
    last = m.forward(tokens[N_LONG - 1 :], reference)[1]  # (n_vocab,)

    # Relative to the reference's norm: gemma3's hidden states span five orders of magnitude, and one
    # float32 rounding in a large component moves a small one by more than its own 1e-5.
    diff_prefill = np.linalg.norm(hidden - hidden_whole) / np.linalg.norm(hidden_whole)
    worst = np.abs(hidden - hidden_whole).max() / np.abs(hidden_whole).max()
    diff_decode = np.linalg.norm(decoded - last) / np.linalg.norm(last)
    kl = (np.exp(log_softmax(last)) * (log_softmax(last) - log_softmax(decoded))).sum()
    print(
        f"{model} {precision}: relative difference: hidden states {diff_prefill:.1e} (largest {worst:.1e}), "
        f"decoded logits {diff_decode:.1e}, KL {kl:.1e}"
    )
    if precision == "f32":
        assert diff_prefill <= 1e-5 and diff_decode <= 1e-5 and worst <= 1e-4 and kl <= 1e-9
    else:
        assert diff_prefill <= 1e-12 and diff_decode <= 1e-12 and worst <= 1e-12


@pytest.mark.parametrize("precision", ["f32", "f64"])
def test_a_decode_step_at_depth_4096_runs_blas_on_one_thread_or_not_at_all(tiny_model, monkeypatch, precision):
    """The thread policy (refengine.threads): decoding is numba's, so BLAS is held to one thread for the
    step, and a float32 step makes no BLAS call at all (matvec and attention are numba kernels).
    Seen from inside the step: the observer reads BLAS's setting at every named tensor."""
    from refengine.threads import blas_threads

    session = Session.load(str(tiny_model("llama")), precision)
    m = session.model
    cache = m.new_cache(4097)
    m.forward(np.arange(4096) % m.config.n_vocab, cache, all_logits=False)
    products = []
    real_matmul = np.matmul
    monkeypatch.setattr(np, "matmul", lambda *a, **k: products.append(blas_threads()) or real_matmul(*a, **k))
    seen = []
    m.forward(np.array([3]), cache, observer=lambda name, x: seen.append(blas_threads()))
    assert seen and set(seen) == {1}
    assert set(products) <= {1}
    if precision == "f32":
        assert products == []
    assert blas_threads() == threads_at_start()  # restored after the step


def threads_at_start() -> int:
    from refengine.threads import _blas

    return min(_blas()[1], refengine.threads.cores())


@pytest.mark.oracle
@pytest.mark.parametrize(
    "arch", ["llama", "qwen2", "qwen3", "gemma3", "qwen3moe", "mixtral", "deepseek2", "deepseek2-kvb"]
)
def test_every_architecture_through_micro_batches_matches_transformers(tiny_model, monkeypatch, arch):
    """A 40-token prompt in micro-batches of 7 (tiny gemma3's window of 4 in a ring of 11), keys in
    blocks of 64 values' worth of scores, then 8 tokens decoded one at a time, against transformers'
    own model class on the same F32 file (to_hf_state_dict)."""
    torch = pytest.importorskip("torch", reason="the transformers oracle needs torch (pip install -e '.[oracle]')")
    transformers = pytest.importorskip("transformers", reason="pip install -e '.[oracle]'")
    from refengine.testing import to_hf_state_dict

    path = tiny_model(arch)
    config, weights = to_hf_state_dict(arch, path)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    hf.load_state_dict({name: torch.from_numpy(w) for name, w in weights.items()}, strict=True)
    session = Session.load(str(path))
    m = session.model
    tokens = np.random.default_rng(3).integers(0, m.config.n_vocab, size=48)
    with torch.no_grad():
        theirs = hf.eval()(torch.tensor(tokens[None])).logits[0].numpy()  # (48, n_vocab)

    monkeypatch.setattr(m, "n_ubatch", 7)
    monkeypatch.setattr(refengine.nn, "ATTENTION_TILE_FLOATS", 64)
    cache = m.new_cache(64)
    prompt = m.forward(tokens[:40], cache)  # (40, n_vocab)
    decoded = np.concatenate([m.forward(tokens[i : i + 1], cache) for i in range(40, 48)])  # (8, n_vocab)
    ours = np.concatenate([prompt, decoded])
    diff = np.abs(log_softmax(ours) - log_softmax(theirs)).max()
    print(f"{arch}: max |d log-softmax| {diff:.1e}")
    assert diff <= 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_softmax_exp_is_within_one_ulp_and_keeps_zero_and_nan():
    """The float32 exp of the decode kernel (Cephes' polynomial, so that it vectorises) against float64."""
    import numba
    from refengine.kernels.attention import softmax_exp

    @numba.njit
    def exps(x, out):
        for i in range(x.size):
            out[i] = softmax_exp(x[i])

    x = np.concatenate([-np.linspace(0, 87, 500001, dtype=np.float32), np.float32([-88, -1e30, -np.inf, np.nan])])
    out = np.empty_like(x)
    exps(x, out)
    reference = np.exp(x[:-4].astype(np.float64))
    ulps = np.abs(out[:-4] - reference) / np.spacing(reference.astype(np.float32))
    assert ulps.max() <= 1.01
    assert out[-4] < 1e-37 and out[-3] == 0 and out[-2] == 0 and np.isnan(out[-1])
    out64 = np.empty(3)
    exps(np.array([-1.5, -np.inf, 0.0]), out64)
    assert (out64 == np.exp([-1.5, -np.inf, 0.0])).all()  # float64 keeps libm's exp


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_a_long_prompt_equals_llama_cpp_on_the_f32_copy(request, model):
    """3,000 tokens of real text, micro-batched and tiled here, against llama.cpp on gguf-py's F32
    dequantization of the same file (llama-cpp-python, F32 KV cache), teacher-forced: the last 64
    positions' logits, mean KL <= 1e-4."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp oracle needs llama-cpp-python")
    from refengine.testing.f32copy import f32_copy
    from refengine.testing.perplexity_oracle import reference_text

    request.getfixturevalue({"gemma3-270m": "gemma_path", "smollm2-135m": "smollm_path"}[model])
    session = Session.load(model)
    tokens = session.tokenizer.encode(reference_text().decode())[:N_LONG]
    cache = session.new_cache(N_LONG)
    session.model.forward(np.array(tokens[:-64]), cache, all_logits=False)
    ours = session.model.forward(np.array(tokens[-64:]), cache)  # (64, n_vocab)

    llm = llama_cpp.Llama(
        str(f32_copy(model)), n_ctx=N_LONG, n_batch=512, n_ubatch=512, n_threads=2, type_k=0, type_v=0, verbose=False
    )  # type 0: GGML_TYPE_F32, the cache refengine keeps
    llm.eval(tokens[:-64])
    theirs = []
    for token in tokens[-64:]:  # teacher-forced, one position at a time, reading the context's last logits
        llm.eval([token])
        theirs.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy())
    theirs = np.stack(theirs)  # (64, n_vocab)
    p, q = log_softmax(theirs), log_softmax(ours)
    kl = (np.exp(p) * (p - q)).sum(-1)
    top1 = (theirs.argmax(-1) == ours.argmax(-1)).mean()
    print(f"{model}: KL(llama.cpp F32 copy || ours) mean {kl.mean():.1e}, max {kl.max():.1e}, top-1 {top1:.0%}")
    assert kl.mean() <= 1e-4
