"""The per-type records of refengine.kernels.QUANT_TYPES: each block's fields tile it, the scale fields are
where gguf-py's own decoder reads its scales, and each type's kernels are its record's."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T
from refengine.kernels import QUANT_TYPES

from refengine import kernels

# Types gguf.quants decodes; their scales can be checked against it.
DECODED = sorted(
    (t for t in QUANT_TYPES if t in quants._type_traits and hasattr(quants._type_traits[t], "dequantize_blocks")),
    key=lambda t: t.value,
)
# A zero e8m0 byte is 2^-127, not 0: MXFP4's scale never zeroes a block.
NEVER_ZERO = ("e8m0",)


@pytest.mark.parametrize("ggml_type", list(QUANT_TYPES), ids=lambda t: t.name)
def test_fields_tile_the_block(ggml_type):
    q = QUANT_TYPES[ggml_type]
    assert (q.block_size, q.type_size) == GGML_QUANT_SIZES[ggml_type]
    ends = [0] + [f.stop for f in q.fields]
    assert [f.start for f in q.fields] == ends[:-1] and ends[-1] == q.type_size
    assert all(f.stop > f.start for f in q.fields)
    assert len({f.name for f in q.fields}) == len(q.fields)


@pytest.mark.parametrize("ggml_type", DECODED, ids=lambda t: t.name)
def test_scale_fields_are_where_gguf_py_reads_the_scales(ggml_type):
    """Random blocks with every scale field zeroed decode to zeros in gguf-py; with the scales set to 1 (or
    kept random) they do not. A field at the wrong offset zeroes quants instead, which leaves values."""
    q = QUANT_TYPES[ggml_type]
    scales = [f for f in q.scale_fields() if f.kind not in NEVER_ZERO]
    if not scales:
        pytest.skip(f"{q.name} has no scale that can be zero")
    rng = np.random.default_rng(ggml_type.value)
    blocks = rng.integers(0, 256, (64, q.type_size), dtype=np.uint8)
    for f in q.scale_fields():  # sane scales first: f16 1.0 where the field is an f16
        if f.kind == "f16":
            blocks[:, f.start : f.stop] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    assert (quants.dequantize(blocks, ggml_type) != 0).any()
    for f in scales:
        blocks[:, f.start : f.stop] = 0
    np.testing.assert_array_equal(quants.dequantize(blocks, ggml_type), 0)


def test_each_kernel_is_its_records():
    for t, q in QUANT_TYPES.items():
        assert q.matvec.get("exact") is kernels.MATVEC_KERNELS.get(t)
        assert q.matvec.get("ggml") is kernels.GGML_MATVEC_KERNELS.get(t)
    assert QUANT_TYPES[T.Q4_K].field("dmin").start == 2 and QUANT_TYPES[T.Q6_K].field("d").start == 208
    assert set(kernels.DEQUANTIZERS) >= {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_K, T.Q6_K, T.IQ4_XS, T.MXFP4}
    with pytest.raises(kernels.KernelError, match="no quantization kernel for ggml type IQ2_XXS"):
        kernels.quantize_rows(T.IQ2_XXS, np.zeros((1, 256), np.float32))
