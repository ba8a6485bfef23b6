"""A minimal GGUF v3 writer that streams tensor data, for `refengine quantize`.

The header (metadata and tensor infos, with every tensor's type, shape and
offset) is written first; tensor data then follows in as many pieces as the
caller likes, each tensor padded to the alignment. Layout as in refengine/gguf.py.

gguf.GGUFWriter is not used: it writes a tensor's data from one array (so a
tensor would have to be held whole), refuses empty metadata arrays and numpy
arrays, and packs string arrays one struct call per string.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_VERSION = 3

_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
# numpy dtype of a numeric metadata array (as refengine.gguf reads it) -> its GGUF element type
_ARRAY_TYPES = {
    np.dtype("u1"): GGUFValueType.UINT8,
    np.dtype("i1"): GGUFValueType.INT8,
    np.dtype("<u2"): GGUFValueType.UINT16,
    np.dtype("<i2"): GGUFValueType.INT16,
    np.dtype("<u4"): GGUFValueType.UINT32,
    np.dtype("<i4"): GGUFValueType.INT32,
    np.dtype("<f4"): GGUFValueType.FLOAT32,
    np.dtype("?"): GGUFValueType.BOOL,
    np.dtype("<u8"): GGUFValueType.UINT64,
    np.dtype("<i8"): GGUFValueType.INT64,
    np.dtype("<f8"): GGUFValueType.FLOAT64,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (..., n_rows, n_cols); written reversed, as GGUF's ne

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        n = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        return n // block_size * type_size


def _string(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")  # refengine.gguf decodes with surrogateescape
    return struct.pack("<Q", len(raw)) + raw


def _value(value: Any, value_type: GGUFValueType) -> bytes:
    """A metadata value (without its type id) as refengine.gguf returns it: scalars, str,
    list[str] for string arrays and np.ndarray for numeric ones."""
    if value_type == GGUFValueType.STRING:
        return _string(value)
    if value_type != GGUFValueType.ARRAY:
        return struct.pack(_SCALARS[value_type], value)
    if isinstance(value, np.ndarray):
        head = struct.pack("<IQ", _ARRAY_TYPES[value.dtype.newbyteorder("<")], value.size)
        return head + value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
    return struct.pack("<IQ", GGUFValueType.STRING, len(value)) + b"".join(_string(s) for s in value)


def align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def write_header(
    fh: IO[bytes],
    metadata: Mapping[str, Any],
    value_types: Mapping[str, GGUFValueType],
    tensors: Iterable[TensorInfo],
    alignment: int,
) -> None:
    """Write magic, counts, metadata and tensor infos, and pad to where the first tensor's data goes.

    Tensors must then be written in the same order, each followed by `pad(fh, alignment)`."""
    tensors = list(tensors)
    parts = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        parts += [_string(key), struct.pack("<I", value_types[key]), _value(value, value_types[key])]
    offset = 0
    for t in tensors:
        ne = tuple(reversed(t.shape))
        parts += [_string(t.name), struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t.ggml_type, offset)]
        offset += align(t.nbytes, alignment)
    fh.write(b"".join(parts))
    pad(fh, alignment)


def pad(fh: IO[bytes], alignment: int) -> None:
    """Zeros up to the next multiple of `alignment` (the file position is the count)."""
    at = fh.tell()
    fh.write(bytes(align(at, alignment) - at))
