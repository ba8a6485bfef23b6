"""One record per ggml type, as gguf-py's quants.py keeps one class per type: the block's size in values and
in bytes, the named fields of a block (ggml-common.h's block_* structs: byte ranges and encodings), and the
type's kernels in every direction (dequantize, matvec in each numerics, quantize).

refengine.kernels looks every type up in QUANT_TYPES; the kernels themselves stay in their family modules
(legacy.py, kquants.py, ...), which read the same byte ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

# How a field's bytes encode a scale (the rest are "bytes": quants, high bits, packed sub-block scales).
FLOAT_KINDS = ("f16", "bf16", "f32", "e8m0", "ue4m3", "iq1m_f16")


@dataclass(frozen=True)
class Field:
    """Bytes [start, stop) of every block. kind: the encoding of a scale (FLOAT_KINDS), or "bytes".
    "iq1m_f16": IQ1_M's d, spread over the top nibbles of the four uint16 sub-block scales."""

    name: str
    start: int
    stop: int
    kind: str = "bytes"


def fields(*spec: tuple[str, int] | tuple[str, int, str]) -> tuple[Field, ...]:
    """Consecutive fields from (name, size[, kind]) in struct order."""
    out, start = [], 0
    for name, size, *kind in spec:
        out.append(Field(name, start, start + size, *kind))
        start += size
    return tuple(out)


# ggml-common.h's block structs, field by field (QK_K = 256). Q8_1 is left out: gguf-py sizes it as the
# older 40-byte block (float d and s), ggml as 36 (half d and s); only ggml's activations use it
# (activations.py).
LAYOUTS: dict[T, tuple[Field, ...]] = {
    T.F32: fields(("value", 4, "f32")),
    T.F16: fields(("value", 2, "f16")),
    T.BF16: fields(("value", 2, "bf16")),
    T.Q4_0: fields(("d", 2, "f16"), ("qs", 16)),
    T.Q4_1: fields(("d", 2, "f16"), ("m", 2, "f16"), ("qs", 16)),
    T.Q5_0: fields(("d", 2, "f16"), ("qh", 4), ("qs", 16)),
    T.Q5_1: fields(("d", 2, "f16"), ("m", 2, "f16"), ("qh", 4), ("qs", 16)),
    T.Q8_0: fields(("d", 2, "f16"), ("qs", 32)),
    T.Q2_K: fields(("scales", 16), ("qs", 64), ("d", 2, "f16"), ("dmin", 2, "f16")),
    T.Q3_K: fields(("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2, "f16")),
    T.Q4_K: fields(("d", 2, "f16"), ("dmin", 2, "f16"), ("scales", 12), ("qs", 128)),
    T.Q5_K: fields(("d", 2, "f16"), ("dmin", 2, "f16"), ("scales", 12), ("qh", 32), ("qs", 128)),
    T.Q6_K: fields(("ql", 128), ("qh", 64), ("scales", 16), ("d", 2, "f16")),
    T.Q8_K: fields(("d", 4, "f32"), ("qs", 256), ("bsums", 32)),
    T.IQ2_XXS: fields(("d", 2, "f16"), ("qs", 64)),
    T.IQ2_XS: fields(("d", 2, "f16"), ("qs", 64), ("scales", 8)),
    T.IQ2_S: fields(("d", 2, "f16"), ("qs", 64), ("qh", 8), ("scales", 8)),
    T.IQ3_XXS: fields(("d", 2, "f16"), ("qs", 96)),
    T.IQ3_S: fields(("d", 2, "f16"), ("qs", 64), ("qh", 8), ("signs", 32), ("scales", 4)),
    T.IQ1_S: fields(("d", 2, "f16"), ("qs", 32), ("qh", 16)),
    T.IQ1_M: fields(("qs", 32), ("qh", 16), ("scales", 8, "iq1m_f16")),
    T.IQ4_NL: fields(("d", 2, "f16"), ("qs", 16)),
    T.IQ4_XS: fields(("d", 2, "f16"), ("scales_h", 2), ("scales_l", 4), ("qs", 128)),
    T.TQ1_0: fields(("qs", 48), ("qh", 4), ("d", 2, "f16")),
    T.TQ2_0: fields(("qs", 64), ("d", 2, "f16")),
    T.MXFP4: fields(("e", 1, "e8m0"), ("qs", 16)),
    T.NVFP4: fields(("d0", 1, "ue4m3"), ("d1", 1, "ue4m3"), ("d2", 1, "ue4m3"), ("d3", 1, "ue4m3"), ("qs", 32)),
}


@dataclass(frozen=True)
class QuantType:
    """A ggml type: its blocks and its kernels. A kernel the type does not have is None (or absent from matvec)."""

    ggml_type: T
    block_size: int  # values per block
    type_size: int  # bytes per block
    fields: tuple[Field, ...]
    dequantize: Callable | None = None  # kernel(blocks (n, type_size) uint8, out (n, block_size) float32, *tables)
    tables: tuple = ()  # read-only lookup tables dequantize takes (IQ grids)
    matvec: Mapping[str, Callable] = field(default_factory=dict)  # numerics -> kernel(rows, x (n_in,), out)
    quantize: Callable | None = None  # kernel(x (n, block_size) float32, out (n, type_size) uint8)

    @property
    def name(self) -> str:
        return self.ggml_type.name

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} blocks have no field {name!r}")

    def scale_fields(self) -> tuple[Field, ...]:
        """The fields that scale a block's values (each must hold a sane float for the values to be)."""
        return tuple(f for f in self.fields if f.kind in FLOAT_KINDS)


def build(
    dequantize: Mapping[T, Callable],
    tables: Mapping[T, tuple],
    matvec: Mapping[str, Mapping[T, Callable]],
    quantize: Mapping[T, Callable],
) -> Mapping[T, QuantType]:
    """QUANT_TYPES: every type with a layout, tied to the kernels the family modules register for it."""
    records = {}
    for ggml_type, layout in LAYOUTS.items():
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        records[ggml_type] = QuantType(
            ggml_type,
            block_size,
            type_size,
            layout,
            dequantize.get(ggml_type),
            tables.get(ggml_type, ()),
            MappingProxyType({n: k[ggml_type] for n, k in matvec.items() if ggml_type in k}),
            quantize.get(ggml_type),
        )
    return MappingProxyType(records)
