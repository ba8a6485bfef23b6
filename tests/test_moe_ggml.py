"""A batch through every routed expert at once in numerics "ggml" (kernels/moe_ggml.py, MoE.grouped_experts),
against the path it replaces: each chosen expert's Linear over its tokens (bound_matmul with expert=True, the
one-expert kernels that tests/test_ggml_forward.py holds to llama.cpp's logits to the bit). Equal to the bit:

- the kernel, on random expert tensors of each type it takes, with groups of 1 to 70 tokens (vec_dot, tiled,
  and more than one chunk of entries), the repacked and the plain Q4_K;
- every MoE layer of the tiny MoE models, whose routing gives uneven groups;
- the grouping itself against build_moe_ffn's order: an expert's tokens in token order;
- the router's F32 batch kernel against the F32 Linear's, and the weighted sum against build_moe_ffn's order.

Numerics exact: an expert's few tokens through the matvec kernels one at a time, within float32 reassociation of
the tiles for BLAS.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from refengine.kernels import bound_expert_matmul, bound_matmul, kernel_threads, moe_ggml, quantize_rows

import refengine.arch.moe as moe_module
from refengine.arch.moe import ExpertGroups, MoE, route
from refengine.nn import swiglu
from refengine.session import Session
from refengine.testing.moe_oracle import make_q4_k_m

GROUP_SIZES = [3, 0, 1, 9, 70, 4, 8, 7, 2]  # tokens per expert: under and over TILED_MIN_BATCH and TOKEN_CHUNK


def random_experts(ggml_type, n_expert: int, n_out: int, n_in: int, rng) -> np.ndarray:
    """A 3-D expert tensor's rows (n_expert * n_out, row bytes), quantized from random weights."""
    w = rng.standard_normal((n_expert * n_out, n_in)).astype(np.float32) * rng.uniform(0.01, 2, (n_expert * n_out, 1))
    return quantize_rows(ggml_type, w.astype(np.float32))


def groups_of(sizes: list[int], n_src: int, rng):
    """experts, starts and src for groups of the given sizes (empty ones left out), src random rows of x."""
    experts = np.array([e for e, n in enumerate(sizes) if n], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum([sizes[e] for e in experts])]).astype(np.int64)
    src = np.concatenate([np.sort(rng.choice(n_src, sizes[e], replace=False)) for e in experts]).astype(np.int64)
    return experts, starts, src


@pytest.mark.parametrize(
    ("ggml_type", "n_out"),
    [(T.Q4_K, 40), (T.Q4_K, 20), (T.Q5_K, 24), (T.Q6_K, 40)],
    ids=["q4_k-repacked", "q4_k-plain", "q5_k", "q6_k"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_expert_batch_equals_each_experts_matmul(ggml_type, n_out, threads):
    """One tensor (down), and gate and up with their swiglu, against each expert's matmul and ggml_swiglu_split."""
    rng = np.random.default_rng(int(ggml_type) * 100 + n_out)
    n_in, n_src = 512, 80
    gate = random_experts(ggml_type, len(GROUP_SIZES), n_out, n_in, rng)
    up = random_experts(ggml_type, len(GROUP_SIZES), n_out, n_in, rng)
    x = (rng.standard_normal((n_src, n_in)) * rng.uniform(0.1, 10, (n_src, 1))).astype(np.float32)
    x[3, :7] = 0  # a few exact zeros and a row of them
    x[5] = 0
    experts, starts, src = groups_of(GROUP_SIZES, n_src, rng)
    n_entries = int(starts[-1])
    ours, ours_glu = (np.full((n_entries, n_out), np.nan, dtype=np.float32) for _ in range(2))
    with kernel_threads(threads):
        bound_expert_matmul(ggml_type, gate, n_out)(experts, starts, src, x, ours)
        bound_expert_matmul(ggml_type, gate, n_out, up_rows=up)(experts, starts, src, x, ours_glu)
    for g, e in enumerate(experts):
        entries = slice(starts[g], starts[g + 1])
        expected_gate, expected_up = (np.empty((starts[g + 1] - starts[g], n_out), dtype=np.float32) for _ in range(2))
        bound_matmul(ggml_type, gate[e * n_out : (e + 1) * n_out], expert=True)(x[src[entries]], expected_gate)
        bound_matmul(ggml_type, up[e * n_out : (e + 1) * n_out], expert=True)(x[src[entries]], expected_up)
        expected_glu = swiglu(expected_gate, expected_up, "ggml")
        for got, expected in ((ours[entries], expected_gate), (ours_glu[entries], expected_glu)):
            assert np.array_equal(got, expected), (
                f"expert {e} ({len(expected)} tokens): differs by up to {np.abs(got - expected).max():.3g}"
            )


def test_expert_glu_is_ggml_swiglu_on_extreme_gates():
    """The gate's outputs through silu as ggml_vec_swiglu_f32, where its exponential overflows, underflows or is
    given inf and NaN: activations of huge values and rows of 280 outputs (the 8 past the 16-value blocks by libm's
    expf)."""
    rng = np.random.default_rng(9)
    n_out, n_in = 280, 256
    gate = random_experts(T.Q6_K, 2, n_out, n_in, rng)
    up = random_experts(T.Q6_K, 2, n_out, n_in, rng)
    x = rng.standard_normal((6, n_in)).astype(np.float32) * np.float32([[1], [30], [1e3], [1e5], [1e-30], [0]])
    x[2, 5] = np.inf  # a row of inf and NaN outputs
    experts, starts, src = np.array([0, 1]), np.array([0, 3, 6]), np.arange(6)  # every row of x
    out = np.empty((6, n_out), dtype=np.float32)
    bound_expert_matmul(T.Q6_K, gate, n_out, up_rows=up)(experts, starts, src, x, out)
    for g, e in enumerate(experts):
        entries = slice(starts[g], starts[g + 1])
        expected_gate, expected_up = (np.empty((3, n_out), dtype=np.float32) for _ in range(2))
        bound_matmul(T.Q6_K, gate[e * n_out : (e + 1) * n_out], expert=True)(x[src[entries]], expected_gate)
        bound_matmul(T.Q6_K, up[e * n_out : (e + 1) * n_out], expert=True)(x[src[entries]], expected_up)
        assert np.array_equal(out[entries], swiglu(expected_gate, expected_up, "ggml"), equal_nan=True)
    assert not np.isfinite(out).all() and np.isfinite(out).any()


def test_expert_batch_checks_its_arrays():
    rng = np.random.default_rng(5)
    down = random_experts(T.Q6_K, 3, 256, 256, rng)
    run = bound_expert_matmul(T.Q6_K, down, 256)
    experts, starts, src = groups_of([2, 0, 9], 11, rng)
    h = rng.standard_normal((11, 256)).astype(np.float32)
    assert bound_expert_matmul(T.Q8_0, quantize_rows(T.Q8_0, h), 11) is None  # no grouped kernel: the caller's loop
    assert bound_expert_matmul(T.Q6_K, down, 100) is None  # 768 rows are not whole experts of 100
    with pytest.raises(ValueError, match="up rows"):
        bound_expert_matmul(T.Q6_K, down, 256, up_rows=down[:256])
    with pytest.raises(ValueError, match="x must be"):
        run(experts, starts, src, h[:, :128], np.empty((11, 256), dtype=np.float32))
    with pytest.raises(ValueError, match="out must be"):
        run(experts, starts, src, h, np.empty((5, 256), dtype=np.float32))


@pytest.mark.parametrize("n_tok", [2, 3, 5, 64])
def test_router_logits_are_the_f32_linears(n_tok):
    """moe_ggml.router_logits against the F32 matmul every Linear runs (float_ggml.matmul_f32_ggml, tinyBLAS's order),
    on values whose sums cancel and round, with an inf and a NaN."""
    rng = np.random.default_rng(n_tok)
    w = (rng.standard_normal((64, 1024)) * rng.uniform(1e-3, 1e3, (64, 1))).astype(np.float32)
    x = (rng.standard_normal((n_tok, 1024)) * rng.uniform(1e-3, 1e3, (n_tok, 1))).astype(np.float32)
    w[3, 100], x[-1, 7] = np.inf, np.nan
    ours, theirs = np.empty((n_tok, 64), dtype=np.float32), np.empty((n_tok, 64), dtype=np.float32)
    with kernel_threads(2):
        moe_ggml.router_logits(w, x, ours)
    bound_matmul(T.F32, w.view(np.uint8))(x, theirs)
    assert np.array_equal(ours, theirs, equal_nan=True)


def test_weighted_sum_adds_the_slots_in_order():
    rng = np.random.default_rng(2)
    y = rng.standard_normal((12, 64)).astype(np.float32)
    position = rng.permutation(12).reshape(4, 3).astype(np.int64)
    weights = rng.uniform(0, 1, (4, 3)).astype(np.float32)
    out = np.empty((4, 64), dtype=np.float32)
    moe_ggml.weighted_sum(y, position, weights, out)
    weighted = y[position] * weights[..., None]  # (4, 3, 64), each product rounded to float32
    assert np.array_equal(out, (weighted[:, 0] + weighted[:, 1]) + weighted[:, 2])


def test_groups_are_ggml_matrix_rows():
    """ExpertGroups sorts the entries as mul_mat_id's matrix_rows: by expert, then token; position inverts it."""
    chosen = np.array([[3, 0], [0, 2], [2, 3], [3, 1]])
    groups = ExpertGroups.of(chosen, n_expert=5)
    assert groups.experts.tolist() == [0, 1, 2, 3]
    assert groups.starts.tolist() == [0, 2, 3, 5, 8]
    assert groups.tokens.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]
    n_tok, k = chosen.shape
    entry_expert = np.repeat(groups.experts, np.diff(groups.starts))
    for t in range(n_tok):
        for slot in range(k):
            entry = groups.position[t, slot]
            assert groups.tokens[entry] == t and entry_expert[entry] == chosen[t, slot]


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    folder, made = tmp_path_factory.mktemp("moe_ggml"), {}

    def get(arch: str):
        if arch not in made:
            made[arch] = make_q4_k_m(arch, folder)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral", "deepseek2"])
@pytest.mark.parametrize("n_tok", [5, 40, 300])
def test_moe_layer_grouped_equals_expert_by_expert(q4_k_m, arch, n_tok):
    """Every MoE layer of a tiny model on a batch (300 tokens: more than a chunk of entries per expert), the grouped
    experts against each expert's Linear, on two threads."""
    model = Session.load(str(q4_k_m(arch)), "f32", "ggml").model
    x = np.random.default_rng(n_tok).standard_normal((n_tok, model.config.n_embd)).astype(np.float32)
    layers = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoE)]
    assert layers and all(moe.grouped is not None for moe in layers)
    for moe in layers:
        with kernel_threads(2):
            grouped, bound = moe(x), moe.grouped
            moe.grouped = None
            try:
                expert_by_expert = moe(x)
            finally:
                moe.grouped = bound
        assert np.array_equal(grouped, expert_by_expert), f"differs by up to {np.abs(grouped - expert_by_expert).max()}"


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2"])
def test_exact_few_token_experts_through_the_matvec(q4_k_m, arch, monkeypatch):
    """Numerics exact: experts with 2 or 3 tokens go through the matvec kernels one token at a time, within float32
    reassociation of decoding them to tiles for BLAS, and close to the float64 model."""
    session = Session.load(str(q4_k_m(arch)), "f32", "exact")
    moe = next(layer.ffn for layer in session.model.layers if isinstance(layer.ffn, MoE))
    x = np.random.default_rng(4).standard_normal((6, session.model.config.n_embd)).astype(np.float32)
    counts = np.bincount(route_of(moe, x).ravel(), minlength=moe.config.n_expert)
    assert ((counts > 1) & (counts < moe_module.EXACT_MATVEC_TOKENS)).any(), "no expert with 2 or 3 of the tokens"
    calls, glu = [], moe_module.glu

    def counting(*args):  # the tokens of each expert's swiglu
        calls.append(len(args[-1]))
        return glu(*args)

    monkeypatch.setattr(moe_module, "glu", counting)
    one_by_one = moe(x)
    assert 1 in calls and max(calls) < moe_module.EXACT_MATVEC_TOKENS
    monkeypatch.setattr(moe_module, "EXACT_MATVEC_TOKENS", 2)
    tiles = moe(x)
    np.testing.assert_allclose(one_by_one, tiles, rtol=1e-5, atol=1e-5 * np.abs(tiles).max())
    exact64 = Session.load(str(q4_k_m(arch)), "f64").model.layers[moe_layer_index(session.model, moe)].ffn
    np.testing.assert_allclose(one_by_one, exact64(x.astype(np.float64)), rtol=1e-4, atol=1e-4 * np.abs(tiles).max())


def route_of(moe: MoE, x: np.ndarray) -> np.ndarray:
    return route(moe.router_logits(x), moe.config, moe.exp_probs_b)[0]


def moe_layer_index(model, moe: MoE) -> int:
    return next(il for il, layer in enumerate(model.layers) if layer.ffn is moe)
