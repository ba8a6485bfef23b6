"""refengine trace and compare: llama.cpp's graph names, the first-divergence report, and agreement with
llama-eval-callback's printed sums (goldens in tests/golden/eval_callback.json, made by
scripts/make_golden_trace.py; live where scripts/build_llama_tools.sh has built the tool)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import model_path

import refengine
from refengine.cli import EXIT_ERROR, EXIT_USAGE, main
from refengine.compare import (
    CompareError,
    compare_eval_callback,
    compare_files,
    compare_traces,
    parse_eval_callback,
    tensor_diff,
)
from refengine.gguf import open_gguf
from refengine.testing.f32copy import f32_copy, write_f32_copy
from refengine.testing.llama_tools import find_tool, run_tool
from refengine.testing.trace_oracle import (
    GOLDEN_PATH,
    MAX_SUM_REL,
    PROMPT,
    eval_callback_args,
    golden,
    golden_nodes,
)
from refengine.trace import Trace, TraceError

LAYER_NAMES = {
    "llama": ["attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "ffn_inp", "ffn_norm", "ffn_out", "l_out"],
    "qwen3moe": ["attn_norm", "Qcur_normed", "Kcur_normed", "Qcur", "Kcur", "Vcur", "kqv_out", "ffn_inp",
                 "ffn_norm", "ffn_moe_logits", "ffn_moe_topk", "ffn_moe_weights_norm", "ffn_moe_out", "l_out"],
    "gemma3": ["attn_norm", "Qcur_normed", "Kcur_normed", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_post_norm",
               "sa_out", "ffn_norm", "ffn_out", "ffn_post_norm", "l_out"],
}  # fmt: skip


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_llama(tiny_model):
    return refengine.load(tiny_model("llama"))


def ids_of(model):
    return model.tokenize(PROMPT)


# -- trace ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(LAYER_NAMES))
def test_trace_names_in_forward_order(tiny_model, arch):
    model = refengine.load(tiny_model(arch))
    trace = model.trace(ids_of(model))
    n_layer = model.session.model.config.n_layer
    expected = ["inp_embd"]
    for il in range(n_layer):
        expected += [f"{name}-{il}" for name in LAYER_NAMES[arch]]
    expected += ["result_norm", "result_output"]
    assert trace.names == expected
    n_tok = len(trace.tokens)
    assert all(trace[name].shape[0] == n_tok for name in trace)
    assert trace["Qcur-0"].shape[1:] == (model.session.model.config.n_head, model.session.model.config.head_dim)


def test_trace_deepseek2_has_the_latent_and_the_router(tiny_model):
    model = refengine.load(tiny_model("deepseek2"))
    trace = model.trace(ids_of(model))
    for name in ["kv_cmpr-0", "k_pe-0", "kqv_out-0", "ffn_out-0", "ffn_moe_logits-1", "ffn_moe_topk-1", "l_out-2"]:
        assert name in trace, name
    topk = trace["ffn_moe_topk-1"]
    assert topk.shape == (len(trace.tokens), model.session.model.config.moe.n_expert_used)
    assert np.issubdtype(topk.dtype, np.integer)


def test_trace_holds_the_logits_and_filters(tiny_llama):
    ids = ids_of(tiny_llama)
    full = tiny_llama.trace(ids)
    np.testing.assert_array_equal(full["result_output"], tiny_llama.logits(ids))
    only = tiny_llama.trace(ids, filter=r"^l_out-\d+$", positions="last")
    assert only.names == ["l_out-0", "l_out-1"]
    np.testing.assert_array_equal(only["l_out-1"], full["l_out-1"][-1:])


def test_trace_joins_micro_batches(tiny_llama):
    ids = ids_of(tiny_llama)
    whole = tiny_llama.trace(ids)
    forward = tiny_llama.session.model
    saved, forward.n_ubatch = forward.n_ubatch, 4
    try:
        pieces = tiny_llama.trace(ids)
    finally:
        forward.n_ubatch = saved
    assert pieces.names == whole.names
    for name in whole:
        np.testing.assert_allclose(pieces[name], whole[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_trace_file_round_trip(tiny_llama, tmp_path):
    trace = tiny_llama.trace(ids_of(tiny_llama), filter="norm")
    trace.save(tmp_path / "t.npz")
    back = Trace.load(tmp_path / "t.npz")
    assert back.names == trace.names and (back.tokens == trace.tokens).all()
    for name in trace:
        np.testing.assert_array_equal(back[name], trace[name])
    with pytest.raises(TraceError, match="no tensor"):
        back["Qcur-0"]


# -- compare ----------------------------------------------------------------------------------------


def perturbed_copy(source, target, tensor: str, delta: float):
    """A copy of an F32 model with column 3 of the first row of `tensor` moved by delta; for a 3-D
    expert tensor, of each expert's first row, since an expert's weights are read only where it is chosen."""
    shutil.copyfile(source, target)
    t = open_gguf(target).tensor(tensor)
    rows_per_matrix = t.shape[-2] if len(t.shape) == 3 else t.n_rows
    values = t.data.reshape(-1).view(np.float32)
    with open(target, "r+b") as fh:
        for row in range(0, t.n_rows, rows_per_matrix):
            index = row * t.n_cols + 3
            fh.seek(t.offset + 4 * index)
            fh.write(np.float32(values[index] + delta).tobytes())
    return target


@pytest.mark.parametrize(
    ("arch", "tensor", "first"),
    [
        ("llama", "blk.1.ffn_up.weight", "ffn_out-1"),
        ("llama", "blk.0.attn_k.weight", "Kcur-0"),
        ("gemma3", "blk.3.attn_v.weight", "Vcur-3"),
        ("deepseek2", "blk.2.ffn_down_exps.weight", "ffn_moe_out-2"),
    ],
)
def test_compare_names_the_perturbed_layer(tiny_model, tmp_path, arch, tensor, first):
    source = tiny_model(arch)
    model = refengine.load(source)
    ids = ids_of(model)
    other = refengine.load(perturbed_copy(source, tmp_path / "perturbed.gguf", tensor, 0.5))
    result = compare_traces(other.trace(ids), model.trace(ids))
    assert result.first_divergence is not None and result.first_divergence.name == first, result.render()
    for d in result.diffs[: result.diffs.index(result.first_divergence)]:
        assert d.nmse == 0, f"{d.name}, before {first}, differs"
    assert result.verdict().startswith(f"first divergence: {first} ")


def test_quantized_trace_equals_its_f32_copy(tiny_model, tmp_path):
    """refengine on a Q4_K_M file computes the function gguf-py's F32 dequantization defines."""
    quantized = tiny_model("qwen3moe", "q4_k_m")
    f32 = write_f32_copy(quantized, tmp_path / "f32.gguf")
    a, b = refengine.load(quantized), refengine.load(f32)
    ids = ids_of(a)
    result = compare_traces(a.trace(ids), b.trace(ids))
    assert result.first_divergence is None, result.render()
    assert max(d.nmse for d in result.diffs) < 1e-6
    logits = next(d for d in result.diffs if d.name == "result_output")
    assert logits.top1 == 1.0 and logits.kl_mean < 1e-9


def test_tensor_diff_figures():
    b = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    a = b.copy()
    a[2, 1] += 0.5
    d = tensor_diff("x", a, b)
    assert d.max_at == (2, 1) and d.max_diff == 0.5
    assert d.nmse == pytest.approx(0.25 / np.sum(b.astype(np.float64) ** 2))
    assert d.cosine < 1 and d.rel_diff > 0
    with pytest.raises(CompareError, match="shapes differ"):
        tensor_diff("x", a, b[:2])


# -- llama-eval-callback -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["deepseek2"])
@pytest.mark.parametrize("numerics", ["exact", "ggml"])
def test_trace_matches_eval_callback_golden(tiny_model, case, numerics):
    """Every tensor llama-eval-callback printed for the tiny model (F32, F32 KV cache, no flash attention)
    agrees with the sum of ours, in either numerics (ggml's with llama.cpp's F32 cache, as the golden's)."""
    entry = golden()[case]
    cache_type = "f32" if numerics == "ggml" else None
    model = refengine.load(tiny_model(entry["arch"]), numerics=numerics, cache_type=cache_type)
    ids = ids_of(model)
    assert ids == entry["tokens"]
    result = compare_eval_callback(model.trace(ids), golden_nodes(case), MAX_SUM_REL["default"])
    print(result.render())
    assert result.first_divergence is None, result.render()
    assert len(result.diffs) >= entry["min_matched"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["smollm2-135m", "gemma3-270m"])
def test_real_model_trace_matches_eval_callback_golden(case):
    """Our trace of the quantized file against llama-eval-callback on gguf-py's F32 copy of it."""
    model_path(case)  # skips when the model is not installed
    if case not in golden():
        pytest.skip(f"{GOLDEN_PATH.name} has no {case} (scripts/make_golden_trace.py)")
    entry = golden()[case]
    model = refengine.load(case)
    ids = ids_of(model)
    assert ids == entry["tokens"]
    result = compare_eval_callback(model.trace(ids), golden_nodes(case), MAX_SUM_REL.get(case, MAX_SUM_REL["default"]))
    worst = max(result.diffs, key=lambda d: d.rel)
    print(f"{case}: {len(result.diffs)} tensors, largest sum rel. diff {worst.rel:.2e} ({worst.name})")
    assert result.first_divergence is None, result.render()
    assert len(result.diffs) >= entry["min_matched"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["smollm2-135m", "gemma3-270m"])
def test_real_model_ggml_trace_matches_eval_callback_golden(case):
    """llama.cpp's arithmetic (numerics ggml, its F32 KV cache) on gguf-py's F32 copy, which is what the golden
    ran: every printed sum within 1e-3, gemma3's too, since ggml numerics computes GELU from ggml's F16 table.
    Measured: smollm2 5e-6, gemma3 3.7e-4 (float32 reassociation, grown over 18 layers)."""
    model_path(case)  # skips when the model is not installed
    if case not in golden():
        pytest.skip(f"{GOLDEN_PATH.name} has no {case} (scripts/make_golden_trace.py)")
    entry = golden()[case]
    model = refengine.load(f32_copy(case), numerics="ggml", cache_type="f32")
    result = compare_eval_callback(model.trace(entry["tokens"]), golden_nodes(case), MAX_SUM_REL["default"])
    worst = max(result.diffs, key=lambda d: d.rel)
    print(f"{case}: {len(result.diffs)} tensors, largest sum rel. diff {worst.rel:.2e} ({worst.name})")
    assert result.first_divergence is None, result.render()
    assert len(result.diffs) >= entry["min_matched"]


def test_eval_callback_log_that_disagrees_is_named(tiny_model):
    """The golden test can fail: one printed sum moved by 1% is named as the first divergence."""
    model = refengine.load(tiny_model(golden()["deepseek2"]["arch"]))
    nodes = golden_nodes("deepseek2")
    nodes["attn_norm-1"].sum *= 1.01
    result = compare_eval_callback(model.trace(ids_of(model)), nodes, MAX_SUM_REL["default"])
    assert result.first_divergence is not None and result.first_divergence.name == "attn_norm-1"


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ["llama", "qwen3moe", "deepseek2"])
def test_live_tiny_trace_matches_eval_callback(tiny_model, arch):
    if find_tool("llama-eval-callback") is None:
        pytest.skip("llama-eval-callback is not built (scripts/build_llama_tools.sh)")
    path = tiny_model(arch)
    model = refengine.load(path)
    nodes = parse_eval_callback(run_tool("llama-eval-callback", *eval_callback_args(path)))
    result = compare_eval_callback(model.trace(ids_of(model)), nodes, MAX_SUM_REL["default"])
    print(result.render())
    assert result.first_divergence is None, result.render()


# -- the commands -----------------------------------------------------------------------------------


def test_cli_trace_and_compare(capsys, tiny_model, tmp_path):
    path = tiny_model("llama")
    code, out, _ = run(capsys, "trace", "-m", path, "-p", PROMPT, "--out", tmp_path / "a.npz", "--json")
    assert code == 0
    record = json.loads(out)
    assert record["tensors"][0]["name"] == "inp_embd" and record["tensors"][-1]["name"] == "result_output"
    ids = ",".join(map(str, record["tokens"]))
    code, _, _ = run(capsys, "trace", "-m", path, "--tokens", ids, "--out", tmp_path / "b.npz", "--filter", "out")
    assert code == 0
    code, out, _ = run(capsys, "compare", tmp_path / "a.npz", tmp_path / "b.npz", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["first_divergence"] is None and "kqv_out-0" in [t["name"] for t in report["tensors"]]
    assert "Qcur-0" in report["only_a"]
    np.save(tmp_path / "l.npy", Trace.load(tmp_path / "a.npz")["result_output"] + 1.0)  # a shift: same softmax
    code, out, _ = run(capsys, "compare", tmp_path / "l.npy", tmp_path / "a.npz")
    assert code == 0 and out.startswith("first divergence: result_output") and "top-1 100.0%" in out


@pytest.mark.parametrize(
    ("argv", "expected_code", "needle"),
    [
        (["trace", "--out", "x.npz"], EXIT_USAGE, "one of -p PROMPT or --tokens"),
        (["trace", "-p", "hi", "--out", "x.npz", "--filter", "("], EXIT_ERROR, "not a regular expression"),
        (["trace", "--tokens", "1,99999", "--out", "x.npz"], EXIT_ERROR, "outside the vocabulary"),
        (["compare", "missing.npz", "missing.npy"], EXIT_ERROR, "No such file"),
        (["compare", "plain.txt", "plain.txt"], EXIT_ERROR, "not a trace"),
    ],
)
def test_cli_errors_are_one_line(capsys, tiny_model, tmp_path, monkeypatch, argv, expected_code, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain.txt").write_text("hello\n")
    if argv[0] == "trace":
        argv = [*argv, "-m", tiny_model("llama")]
    code, _, err = run(capsys, *argv)
    assert code == expected_code
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_compare_files_refuses_a_log_against_logits(tmp_path):
    (tmp_path / "l.npy").write_bytes(b"")
    np.save(tmp_path / "l.npy", np.zeros((2, 3), dtype=np.float32))
    log = tmp_path / "log.txt"
    log.write_text(
        "common_debug_cb_eval:  l_out-0 = (f32) ADD(a{3, 2, 1, 1}, b{3, 2, 1, 1}}) = {3, 2, 1, 1}\n sum = 1.0\n"
    )
    with pytest.raises(CompareError, match="cannot compare"):
        compare_files(tmp_path / "l.npy", log)


@pytest.mark.slow
def test_gemma3_q4_k_m_trace_equals_its_f32_copy():
    """Our Q4_K_M trace against our trace of gguf-py's F32 copy, NMSE below 1e-6 everywhere."""
    from refengine.testing.f32copy import f32_copy

    model_path("gemma3-270m")
    quantized = refengine.load("gemma3-270m")
    copy = refengine.load(f32_copy("gemma3-270m"))
    ids = ids_of(quantized)
    result = compare_traces(quantized.trace(ids), copy.trace(ids), threshold=1e-6)
    worst = max(result.diffs, key=lambda d: d.nmse)
    print(f"gemma3-270m Q4_K_M vs F32 copy: {len(result.diffs)} tensors, largest NMSE {worst.nmse:.2e} ({worst.name})")
    assert result.first_divergence is None, result.render()
    assert next(d for d in result.diffs if d.name == "result_output").top1 == 1.0


def test_eval_callback_parser_keeps_each_names_last_print():
    head = "common_debug_cb_eval: {:>24} = (f32) {:>10}({}) = {{{}}}"
    log = "\n".join(
        [
            head.format("Qcur-0", "MUL_MAT", "blk.0.attn_q.weight{4, 4, 1, 1}, x{4, 3, 1, 1}}", "4, 3, 1, 1"),
            "    sum = 1.5",
            head.format("Qcur-0", "ROPE", "Qcur-0{2, 2, 3, 1}, inp_pos{3, 1, 1, 1}}", "2, 2, 3, 1"),
            "        [ values ]",
            "    sum = -2.250000",
            head.format("Kcur-0 (view)", "VIEW", "Kcur-0{2, 1, 3, 1}, }", "2, 3, 1, 1"),
            "    sum = 9.0",
            head.format("l_out-0", "ADD", "ffn_out-0{4, 1, 1, 1}, ffn_inp-0{4, 1, 1, 1}}", "4, 1, 1, 1"),
            "    sum = 3.0",
        ]
    )
    nodes = parse_eval_callback(log)
    assert list(nodes) == ["Qcur-0", "l_out-0"]
    assert nodes["Qcur-0"].op == "ROPE" and nodes["Qcur-0"].ne == (2, 2, 3, 1) and nodes["Qcur-0"].sum == -2.25
    # l_out covers one position (llama.cpp keeps only the output rows in the last layer): our last row
    trace = Trace(
        np.arange(3), {"Qcur-0": np.full((3, 2, 2), -0.1875), "l_out-0": np.array([[9.0] * 4, [0.0] * 4, [0.75] * 4])}
    )
    result = compare_eval_callback(trace, nodes)
    assert [(d.name, d.n_positions) for d in result.diffs] == [("Qcur-0", 3), ("l_out-0", 1)]
    assert result.first_divergence is None and result.diffs[0].ours == pytest.approx(-2.25)
