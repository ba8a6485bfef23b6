"""The GGUF reader: header and metadata parsed with struct, tensors as zero-copy views.

File layout (GGUF v2 and v3, little-endian; see ggml/docs/gguf.md):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x       ( key: string | value_type u32 | value )
    n_tensors x  ( name: string | n_dims u32 | ne: u64 x n_dims | ggml_type u32 | offset u64 )
    padding to `general.alignment` (default 32)
    tensor data: each tensor at data_start + offset

    string = length u64 | utf-8 bytes;  array = elem_type u32 | count u64 | elements

We parse this ourselves rather than with gguf.GGUFReader, which builds one
numpy view per string and so takes about 12 s to open a 262k-token vocabulary.
The gguf package still supplies the constants: value types, ggml types, block
sizes and key names.

Everything read from the file is untrusted: every count and length is checked
against the bytes that remain before anything is allocated from it, strings
longer than a megabyte are decoded only once the whole header has checked out
(a corrupt length may claim the tensor data), and every problem is a GGUFError
whose message names the file and the byte offset.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import reprlib
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from refengine.errors import RefengineError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name and its terminating NUL
MAX_KEY = 2**16 - 1  # the GGUF spec's limit on a metadata key
# Longer strings are decoded only once the whole header has checked out, so that a corrupt
# length which swallows the tensor data fails fast instead of decoding hundreds of megabytes.
_DECODE_LATER = 1 << 20
_INT64_MAX = 2**63 - 1

# repr() for error messages, cut short: keys and values come from the file, at any length.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 100
_shown = _SHOWN.repr

# Smallest encoding of one header record, used to reject impossible counts up front.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset

_SCALAR_FORMATS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_ARRAY_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

SPLIT_PATTERN = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFError(RefengineError):
    """A file that is not valid GGUF, or one we cannot use. The message names the file."""


@dataclass(frozen=True, eq=False)
class Tensor:
    """One tensor of a GGUF file: its ggml type, its shape and a zero-copy view of its blocks.

    `shape` is in the order users know, rows x columns (numpy order, as
    gguf.quants.dequantize returns it), which is GGUF's `ne` reversed. The last
    axis is the one that is cut into quant blocks.
    """

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # (..., n_rows, n_cols)
    data: np.ndarray  # (n_rows_total, row_bytes) uint8, read-only, backed by the file mapping
    path: Path  # the file (or split) that holds the data
    offset: int  # absolute byte offset of the data in `path`

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.data.size

    @property
    def n_cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def n_rows(self) -> int:
        """Rows over all leading axes (for a 3-D expert tensor, n_expert * rows per expert)."""
        return self.data.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.data.shape[1]

    def dequantize(self, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as float32 (stop - start, n_cols), written into `out` if given."""
        from refengine.kernels import dequantize_rows  # numba loads only when dequantizing

        stop = self.n_rows if stop is None else stop
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"tensor {self.name}: rows [{start}, {stop}) outside [0, {self.n_rows})")
        return dequantize_rows(self.ggml_type, self.data[start:stop], out)

    def to_numpy(self) -> np.ndarray:
        """The whole tensor as float32 in `shape`."""
        return self.dequantize().reshape(self.shape)


@dataclass(eq=False)
class GGUFFile:
    """An open GGUF model, every split of it, memory-mapped read-only."""

    path: Path  # the path the user gave (the first split for split models)
    version: int
    metadata: dict[str, Any]  # numeric arrays as np.ndarray, string arrays as list[str]
    value_types: dict[str, GGUFValueType]  # the stored type of each value (ARRAY for arrays)
    tensors: dict[str, Tensor]  # in file order
    splits: list[Path] = field(default_factory=list)
    _maps: list[mmap.mmap] = field(default_factory=list, repr=False)

    @property
    def architecture(self) -> str:
        return self.require(Keys.General.ARCHITECTURE, str)

    @property
    def file_size(self) -> int:
        return sum(p.stat().st_size for p in self.splits)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str, kind: type | tuple[type, ...] | None = None) -> Any:
        """A metadata value that must be present (and of `kind`), or a GGUFError naming the key."""
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}")
        value = self.metadata[key]
        if kind is not None and not isinstance(value, kind):
            raise GGUFError(f"{self.path}: metadata key {key!r} has type {type(value).__name__}")
        return value

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def close(self) -> None:
        """Drop our references to the mappings; they unmap once no tensor view uses them."""
        self.tensors = {}
        self._maps.clear()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file, and every split of it if it is part of a split model."""
    path = Path(path)
    first = _read_file(path)
    count = first.metadata.get(Keys.Split.LLM_KV_SPLIT_COUNT, 1)
    if not isinstance(count, int) or count < 1:
        raise GGUFError(f"{path}: {Keys.Split.LLM_KV_SPLIT_COUNT} is {_shown(count)}, not a positive integer")
    if count == 1:
        return first.into_model(path, [first])
    parts = _split_paths(path, count)
    files = [first if p == path else _read_file(p) for p in parts]
    for i, (part, parsed) in enumerate(zip(parts, files, strict=False)):
        no = _split_int(parsed, Keys.Split.LLM_KV_SPLIT_NO)
        if no != i or _split_int(parsed, Keys.Split.LLM_KV_SPLIT_COUNT) != count:
            raise GGUFError(
                f"{part}: split file says it is split {no!r} of "
                f"{_shown(parsed.metadata.get(Keys.Split.LLM_KV_SPLIT_COUNT))}, expected {i} of {count}"
            )
    head = files[0]
    expected = _split_int(head, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    total = sum(len(f.tensors) for f in files)
    if expected is not None and expected != total:
        raise GGUFError(f"{parts[0]}: {Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT} is {expected}, the splits hold {total}")
    return head.into_model(parts[0], files)


def _split_int(parsed: _ParsedFile, key: str) -> int | None:
    """A split key's value, which must be an integer: an array would compare element-wise."""
    value = parsed.metadata.get(key)
    if value is not None and not isinstance(value, int):
        raise GGUFError(f"{parsed.path}: {key} is {_shown(value)}, not an integer")
    return value


def _split_paths(path: Path, count: int) -> list[Path]:
    match = SPLIT_PATTERN.match(path.name)
    if match is None:
        raise GGUFError(f"{path}: split.count is {count} but the name is not NAME-NNNNN-of-NNNNN.gguf")
    if int(match["count"]) != count:
        raise GGUFError(f"{path}: the name says {int(match['count'])} splits, split.count says {count}")
    parts = [path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise GGUFError(f"{path}: missing split file{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return parts


@dataclass
class _ParsedFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, GGUFValueType]
    tensors: dict[str, Tensor]
    map: mmap.mmap

    def into_model(self, path: Path, files: list[_ParsedFile]) -> GGUFFile:
        tensors: dict[str, Tensor] = {}
        for f in files:
            for name, t in f.tensors.items():
                if name in tensors:
                    raise GGUFError(f"{f.path}: tensor {name!r} also appears in {tensors[name].path}")
                tensors[name] = t
        return GGUFFile(
            path=path,
            version=self.version,
            metadata=self.metadata,
            value_types=self.value_types,
            tensors=tensors,
            splits=[f.path for f in files],
            _maps=[f.map for f in files],
        )


def _read_file(path: Path) -> _ParsedFile:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GGUFError(f"{path}: cannot open: it is {_file_kind(st.st_mode)}, not a regular file")
        if st.st_size == 0:
            raise GGUFError(f"{path}: file is empty, not GGUF")
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, OverflowError) as e:
        os.close(fd)
        raise GGUFError(f"{path}: cannot map: {getattr(e, 'strerror', None) or e}") from None
    except BaseException:
        os.close(fd)
        raise
    if not _lease(fd, path):
        os.close(fd)  # the mapping keeps the file open
    return _HeaderParser(path, mapping).parse()


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
    kinds |= {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


# -- read leases: see refengine.signals --------------------------------------------------------

_leases: dict[int, Path] | None = None  # fd -> file, while leases are taken (None: they are not)


def start_leases() -> None:
    """Take a read lease on every file mapped from now on, until stop_leases(). The caller must handle
    SIGIO, which the kernel sends when a lease breaks (its default action kills the process)."""
    global _leases
    _leases = {}


def stop_leases() -> None:
    """Give back every lease (the mappings stay) and take no more."""
    global _leases
    leases, _leases = _leases or {}, None
    for fd in leases:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)


def broken_leases() -> list[Path]:
    """The leased files another process is waiting to open for writing or to truncate."""
    broken = []
    for fd, path in (_leases or {}).items():
        with contextlib.suppress(OSError):
            if fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:  # a lease being broken reports F_UNLCK
                broken.append(path)
    return broken


def _lease(fd: int, path: Path) -> bool:
    """Keep `fd` open with a read lease, if leases are being taken and the kernel grants one (it refuses
    when the file is open for writing somewhere, when it is not ours, or on some filesystems)."""
    if _leases is None:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False
    _leases[fd] = path
    return True


@dataclass(frozen=True)
class _Later:
    """The place of a long string, decoded by _HeaderParser.decode_later."""

    start: int
    stop: int


class _HeaderParser:
    """Walks the header once, front to back, with a cursor that never reads past the end."""

    def __init__(self, path: Path, mapping: mmap.mmap):
        self.path = path
        self.buf = mapping
        self.end = len(mapping)
        self.pos = 0
        self.lists_with_later: list[list] = []  # string arrays holding a _Later

    def fail(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: byte {self.pos if at is None else at}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes, {self.end - self.pos} remain")

    def scalar(self, fmt: struct.Struct, what: str):
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def string(self, what: str, limit: int | None = None) -> str | _Later:
        """A string, or a _Later for one longer than _DECODE_LATER (which a `limit` below it rules out)."""
        n = self.scalar(_U64, f"length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} of {n} bytes is longer than the {limit} allowed", at=self.pos - 8)
        self.need(n, what)
        start = self.pos
        self.pos += n
        if n > _DECODE_LATER:
            return _Later(start, self.pos)
        return self.buf[start : self.pos].decode("utf-8", "surrogateescape")

    def decode_later(self, metadata: dict[str, Any]) -> None:
        """Decode the long strings, now that the header is known to be sound."""

        def decode(later: _Later) -> str:
            return self.buf[later.start : later.stop].decode("utf-8", "surrogateescape")

        for key, value in metadata.items():
            if isinstance(value, _Later):
                metadata[key] = decode(value)
        for strings in self.lists_with_later:
            for i, value in enumerate(strings):
                if isinstance(value, _Later):
                    strings[i] = decode(value)

    def parse(self) -> _ParsedFile:
        self.need(4, "magic")
        magic = self.buf[0:4]
        if magic != GGUF_MAGIC:
            raise self.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})", at=0)
        self.pos = 4
        version = self.scalar(_U32, "version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 16) != 0:
                raise self.fail("big-endian GGUF is not supported", at=4)
            raise self.fail(f"unsupported GGUF version {version} (supported: 2, 3)", at=4)
        n_tensors = self.scalar(_U64, "tensor count")
        n_kv = self.scalar(_U64, "metadata count")
        if n_kv * _MIN_KV_BYTES > self.end - self.pos:
            raise self.fail(f"metadata count {n_kv} cannot fit in the {self.end - self.pos} bytes that remain")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > self.end - self.pos:
            raise self.fail(f"tensor count {n_tensors} cannot fit in the {self.end - self.pos} bytes that remain")

        metadata: dict[str, Any] = {}
        value_types: dict[str, GGUFValueType] = {}
        for _ in range(n_kv):
            key_at = self.pos
            key = self.string("metadata key", limit=MAX_KEY)
            label = _shown(key)
            if key in metadata:
                raise self.fail(f"duplicate metadata key {label}", at=key_at)
            value_type = self.value_type(f"value type of {label}")
            metadata[key] = self.value(value_type, label)
            value_types[key] = value_type

        alignment = metadata.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"{Keys.General.ALIGNMENT} is {_shown(alignment)}, not a power of two")

        names: set[str] = set()
        infos = [self.tensor_info(names) for _ in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        tensors = self.tensors(infos, data_start, alignment)
        self.decode_later(metadata)
        return _ParsedFile(self.path, version, metadata, value_types, tensors, self.buf)

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        raw = self.scalar(_U32, what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"unknown {what} {raw}", at=at) from None

    def value(self, value_type: GGUFValueType, label: str) -> Any:
        """The value of the key shown in messages as `label`."""
        if value_type == GGUFValueType.STRING:
            return self.string(f"value of {label}")
        if value_type != GGUFValueType.ARRAY:
            return self.scalar(_SCALAR_FORMATS[value_type], f"value of {label}")
        elem_type = self.value_type(f"element type of {label}")
        count = self.scalar(_U64, f"element count of {label}")
        if elem_type == GGUFValueType.STRING:
            return self.string_array(count, label)
        if elem_type == GGUFValueType.ARRAY:
            raise self.fail(f"nested arrays are not supported (key {label})")
        dtype = _ARRAY_DTYPES[elem_type]
        if count > (self.end - self.pos) // dtype.itemsize:
            raise self.fail(f"array {label} of {count} {elem_type.name} cannot fit in the bytes that remain")
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return values

    def string_array(self, count: int, label: str) -> list[str]:
        # Each string costs at least its 8-byte length, which bounds the count before the list exists.
        if count > (self.end - self.pos) // 8:
            raise self.fail(f"array {label} of {count} strings cannot fit in the bytes that remain")
        buf, pos, end = self.buf, self.pos, self.end
        unpack = _U64.unpack_from
        # The list grows with the strings actually read, never from the count:
        # a count that fits in a file full of tensor data must not allocate it.
        strings: list[str | _Later] = []
        append = strings.append
        # The hot loop of opening a model (262k tokens): unpack_from raises at
        # the end of the mapping, and a string that runs past the end stops the
        # loop before it is sliced.
        try:
            for _ in range(count):
                start = pos + 8
                stop = start + unpack(buf, pos)[0]
                if stop > end:
                    break
                if stop - start > _DECODE_LATER:
                    append(_Later(start, stop))
                    if not self.lists_with_later or self.lists_with_later[-1] is not strings:
                        self.lists_with_later.append(strings)
                else:
                    append(buf[start:stop].decode("utf-8", "surrogateescape"))
                pos = stop
        except struct.error:
            pass
        if len(strings) < count:
            raise self.fail(
                f"truncated: string {len(strings)} of {count} in array {label} runs past the end of the file",
                at=pos,
            )
        self.pos = pos
        return strings

    def tensor_info(self, names: set[str]) -> tuple[str, tuple[int, ...], int, int, int]:
        at = self.pos
        # ggml's limit, checked before the name is read: a corrupt length must not swallow the data.
        name = self.string("tensor name", limit=MAX_NAME - 1)
        # Checked here rather than with the data, so that a tensor count that runs on into
        # zero padding stops at the second empty name instead of reading millions of them.
        if name in names:
            raise self.fail(f"duplicate tensor name {name!r}", at=at)
        names.add(name)
        n_dims = self.scalar(_U32, f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions, at most {MAX_DIMS} are allowed", at=at)
        ne = tuple(self.scalar(_U64, f"dimensions of tensor {name!r}") for _ in range(n_dims))
        type_at = self.pos
        ggml_type = self.scalar(_U32, f"type of tensor {name!r}")
        offset = self.scalar(_U64, f"offset of tensor {name!r}")
        return name, ne, ggml_type, offset, type_at

    def tensors(self, infos, data_start: int, alignment: int) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        spans = []
        for name, ne, raw_type, offset, at in infos:
            try:
                ggml_type = GGMLQuantizationType(raw_type)
                block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            except (ValueError, KeyError):
                raise self.fail(f"tensor {name!r} has unknown ggml type {raw_type}", at=at) from None
            n_cols = ne[0] if ne else 1
            if n_cols % block_size:
                raise self.fail(
                    f"tensor {name!r}: row of {n_cols} elements is not a multiple of the "
                    f"{ggml_type.name} block size {block_size}",
                    at=at,
                )
            n_rows = 1
            for dim in ne[1:]:
                n_rows *= dim
            row_bytes = n_cols // block_size * type_size
            nbytes = n_rows * row_bytes  # Python ints: no overflow, however large the dims
            # ggml keeps dimensions as int64, and numpy needs the byte shape to fit in one even
            # when a zero dimension makes the tensor empty.
            if max(ne, default=0) > _INT64_MAX or max(n_rows, 1) * max(row_bytes, 1) > _INT64_MAX:
                raise self.fail(f"tensor {name!r}: dimensions {list(ne)} are too large", at=at)
            if offset % alignment:
                raise self.fail(f"tensor {name!r}: data offset {offset} is not a multiple of {alignment}", at=at)
            start = data_start + offset
            if start > self.end or nbytes > self.end - start:  # nor may an empty tensor start past it
                raise self.fail(
                    f"tensor {name!r}: {nbytes} bytes at offset {start} run past the end of the file ({self.end})",
                    at=at,
                )
            data = np.frombuffer(self.buf, dtype=np.uint8, count=nbytes, offset=start).reshape(n_rows, row_bytes)
            tensors[name] = Tensor(name, ggml_type, tuple(reversed(ne)), data, self.path, start)
            spans.append((start, start + nbytes, name, at))
        spans.sort()
        for (_, end_a, name_a, _), (start_b, _, name_b, at_b) in zip(spans, spans[1:], strict=False):
            if start_b < end_a:
                raise self.fail(f"tensor {name_b!r} overlaps the data of tensor {name_a!r}", at=at_b)
        return tensors
