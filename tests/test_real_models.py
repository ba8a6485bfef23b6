"""Dequantize every tensor of both real models and compare with gguf.quants, bit for bit."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from refengine.gguf import open_gguf


def test_every_tensor_is_bit_exact(real_model_path):
    model = open_gguf(real_model_path)
    seen_types = set()
    for t in model.tensors.values():
        ours = t.to_numpy()
        if t.ggml_type == T.F32:
            ref = t.data.view(np.float32).reshape(t.shape)
        else:
            ref = quants.dequantize(t.data, t.ggml_type).reshape(t.shape)
        assert ours.shape == ref.shape, t.name
        if not np.array_equal(ours.view(np.uint32), ref.view(np.uint32)):
            bad = np.count_nonzero(ours.view(np.uint32) != ref.view(np.uint32))
            pytest.fail(f"{t.name} ({t.ggml_type.name}): {bad} of {ours.size} values differ from gguf.quants")
        seen_types.add(t.ggml_type)
    # Guard against a model that silently changed: these are the mixes we promise to cover.
    expected = {
        "gemma-3-270m-q4_k_m.gguf": {T.F32, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K},
        "SmolLM2-135M-Instruct.Q4_1.gguf": {T.F32, T.Q8_0, T.Q4_1},
    }[real_model_path.name]
    assert seen_types == expected


def test_tile_by_tile_equals_whole(gemma_path):
    """Row ranges into a reused tile give the same bits as one call over the tensor."""
    t = open_gguf(gemma_path).tensor("blk.0.ffn_down.weight")
    whole = t.dequantize()
    tile = np.empty((48, t.n_cols), dtype=np.float32)
    for start in range(0, t.n_rows, 48):
        stop = min(start + 48, t.n_rows)
        t.dequantize(start, stop, out=tile[: stop - start])
        np.testing.assert_array_equal(tile[: stop - start], whole[start:stop])
    with pytest.raises(IndexError, match="blk.0.ffn_down.weight"):
        t.dequantize(0, t.n_rows + 1)
