"""Byte-level GGUF writing and walking for the reader's tests.

gguf.GGUFWriter is the independent writer for valid files, but it will not
write a broken one. GGUFBuilder writes exactly what it is told: any magic,
version, counts, value type ids, dimension counts, ggml type ids and offsets,
valid or not, so each validation rule can be hit on purpose.

header_fields() walks a trusted (valid) header and lists where its counts,
lengths and type ids sit, so the fuzz tests can aim their mutations there.

Layout reminder (GGUF v2/v3, little-endian):
    magic | version u32 | n_tensors u64 | n_kv u64 | kv... | tensor info... | pad | data
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value type ids, as plain ints so that invalid ids are just other ints.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR_FORMATS = {
    UINT8: "<B",
    INT8: "<b",
    UINT16: "<H",
    INT16: "<h",
    UINT32: "<I",
    INT32: "<i",
    FLOAT32: "<f",
    BOOL: "<?",
    UINT64: "<Q",
    INT64: "<q",
    FLOAT64: "<d",
}


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def string(text: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string; `length` overrides the stored length (to lie about it)."""
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw) if length is None else length) + raw


def scalar(value_type: int, value) -> bytes:
    return struct.pack(SCALAR_FORMATS[value_type], value)


def array(elem_type: int, values, count: int | None = None) -> bytes:
    """Element type, count and elements (without the ARRAY type id); `count` overrides the count."""
    if elem_type == STRING:
        body = b"".join(string(v) for v in values)
    else:
        body = b"".join(scalar(elem_type, v) for v in values)
    return u32(elem_type) + u64(len(values) if count is None else count) + body


def align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def tensor_nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n = 1
    for dim in ne:
        n *= dim
    return n // block_size * type_size


@dataclass
class _TensorInfo:
    name: bytes
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    ggml_type: int
    offset: int  # relative to the start of the data section
    data: bytes
    n_dims: int


@dataclass
class GGUFBuilder:
    """Collects raw header records and lays out a file; nothing is validated.

    `alignment` only decides where the data section starts; add a
    general.alignment key yourself when the file should declare it.
    """

    version: int = 3
    magic: bytes = b"GGUF"
    alignment: int = 32
    kvs: list[bytes] = field(default_factory=list)
    tensors: list[_TensorInfo] = field(default_factory=list)

    def kv(self, key: str | bytes, value_type: int, value) -> GGUFBuilder:
        """A typed value: a scalar, a str for STRING, or (elem_type, values) for ARRAY."""
        if value_type == STRING:
            payload = string(value)
        elif value_type == ARRAY:
            payload = array(*value)
        else:
            payload = scalar(value_type, value)
        return self.raw_kv(key, value_type, payload)

    def raw_kv(self, key: str | bytes, value_type: int, payload: bytes) -> GGUFBuilder:
        """A key, any value type id, then `payload` verbatim."""
        self.kvs.append(string(key) + u32(value_type) + payload)
        return self

    def tensor(
        self,
        name: str | bytes,
        ne: tuple[int, ...],
        ggml_type: int = GGMLQuantizationType.F32,
        *,
        data: bytes | None = None,
        offset: int | None = None,
        n_dims: int | None = None,
    ) -> GGUFBuilder:
        """A tensor info. By default its data is 0, 1, 2, ... (pass `data` for absurd dimensions) and
        follows the previous tensor's, aligned (modulo 2**64, should that follow an absurd offset)."""
        if data is None:
            nbytes = tensor_nbytes(ne, ggml_type) if ggml_type in GGML_QUANT_SIZES else 0
            data = bytes(i % 251 for i in range(nbytes))
        if offset is None:
            previous_end = max((t.offset + len(t.data) for t in self.tensors), default=0)
            offset = align(previous_end, self.alignment) % 2**64
        raw_name = name.encode() if isinstance(name, str) else name
        n_dims = len(ne) if n_dims is None else n_dims
        self.tensors.append(_TensorInfo(raw_name, tuple(ne), int(ggml_type), offset, data, n_dims))
        return self

    def header(self, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
        """Everything before the padding: the counts default to the true ones."""
        out = bytearray(self.magic + u32(self.version))
        out += u64(len(self.tensors) if n_tensors is None else n_tensors)
        out += u64(len(self.kvs) if n_kv is None else n_kv)
        for record in self.kvs:
            out += record
        for t in self.tensors:
            out += string(t.name) + u32(t.n_dims) + b"".join(u64(d) for d in t.ne)
            out += u32(t.ggml_type) + u64(t.offset)
        return bytes(out)

    def build(self, n_tensors: int | None = None, n_kv: int | None = None, max_size: int = 16 << 20) -> bytes:
        """The whole file: header, zero padding to the alignment, each tensor's data at its offset.

        Data that would end past `max_size` is left out (the file simply lacks it),
        so that a random offset can never make the test itself allocate gigabytes.
        Empty tensors do not grow the file either, however far away they are.
        """
        out = bytearray(self.header(n_tensors, n_kv))
        if self.tensors:
            data_start = align(len(out), self.alignment)
            placed = [t for t in self.tensors if t.data and data_start + t.offset + len(t.data) <= max_size]
            end = max((data_start + t.offset + len(t.data) for t in placed), default=data_start)
            out += bytes(end - len(out))
            for t in placed:
                at = data_start + t.offset
                out[at : at + len(t.data)] = t.data
        return bytes(out)


@dataclass
class HeaderMap:
    """Where the structural fields of a valid header are."""

    fields: list[tuple[int, int]]  # (offset, size) of every count, length and type id we could aim at
    tensor_info_start: int
    header_end: int  # the end of the last tensor info (before the padding)


def header_fields(buf: bytes | memoryview, max_string_lengths: int = 4) -> HeaderMap:
    """Walk a header that is known to be valid and record its fields' positions.

    For string arrays only the count and the first few string lengths are
    recorded: a vocabulary has a quarter of a million lengths, and aiming at all
    of them would drown the other fields.
    """
    fields: list[tuple[int, int]] = [(4, 4), (8, 8), (16, 8)]
    (n_tensors,) = struct.unpack_from("<Q", buf, 8)
    (n_kv,) = struct.unpack_from("<Q", buf, 16)
    pos = 24

    def skip_string(record: bool) -> None:
        nonlocal pos
        if record:
            fields.append((pos, 8))
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n

    for _ in range(n_kv):
        skip_string(record=True)
        fields.append((pos, 4))
        (value_type,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if value_type == STRING:
            skip_string(record=True)
        elif value_type == ARRAY:
            (elem_type,) = struct.unpack_from("<I", buf, pos)
            (count,) = struct.unpack_from("<Q", buf, pos + 4)
            fields += [(pos, 4), (pos + 4, 8)]
            pos += 12
            if elem_type == STRING:
                for i in range(count):
                    skip_string(record=i < max_string_lengths)
            else:
                pos += count * struct.calcsize(SCALAR_FORMATS[elem_type])
        else:
            fields.append((pos, struct.calcsize(SCALAR_FORMATS[value_type])))
            pos += struct.calcsize(SCALAR_FORMATS[value_type])

    tensor_info_start = pos
    for _ in range(n_tensors):
        skip_string(record=True)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        fields.append((pos, 4))
        pos += 4
        fields += [(pos + 8 * i, 8) for i in range(n_dims)]
        pos += 8 * n_dims
        fields += [(pos, 4), (pos + 4, 8)]  # ggml type, offset
        pos += 12
    return HeaderMap(fields, tensor_info_start, pos)
