"""Copies of a GGUF model with metadata or tensor data changed, for the hardening and fuzz tests.

`rewrite` writes a new file through refengine.gguf_write (what `refengine quantize` writes with);
`with_metadata` makes the same change in memory, on a GGUFFile sharing the original's tensors, for
running thousands of mutants through the loader without writing a file for each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, Keys

from refengine.gguf import DEFAULT_ALIGNMENT, GGUFFile, open_gguf
from refengine.gguf_write import TensorInfo, pad, write_header

# A change: (value, its GGUF type), or None to remove the key. Arrays: a numpy array (numeric) or list[str].
Change = tuple[Any, GGUFValueType] | None
ARRAY = GGUFValueType.ARRAY


def changed_metadata(gguf_file: GGUFFile, changes: Mapping[str, Change]) -> tuple[dict, dict]:
    metadata, value_types = dict(gguf_file.metadata), dict(gguf_file.value_types)
    for key, change in changes.items():
        if change is None:
            metadata.pop(key, None)
            value_types.pop(key, None)
        else:
            metadata[key], value_types[key] = change
    return metadata, value_types


def with_metadata(gguf_file: GGUFFile, changes: Mapping[str, Change]) -> GGUFFile:
    """A GGUFFile like `gguf_file` (same tensors, same mapping) with its metadata changed."""
    metadata, value_types = changed_metadata(gguf_file, changes)
    return dataclasses.replace(gguf_file, metadata=metadata, value_types=value_types)


def rewrite(
    src: str | Path,
    dst: str | Path,
    changes: Mapping[str, Change] = {},  # noqa: B006 (never mutated)
    edit_tensor: Callable[[str, np.ndarray], np.ndarray | None] | None = None,
) -> Path:
    """Write src to dst with metadata `changes`; edit_tensor(name, data) may return new bytes for a
    tensor (same size: a (n_rows, row_bytes) uint8 array), or None to keep them."""
    gguf_file = open_gguf(src)
    metadata, value_types = changed_metadata(gguf_file, changes)
    alignment = gguf_file.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
    tensors = list(gguf_file.tensors.values())
    with open(dst, "wb") as fh:
        write_header(fh, metadata, value_types, [TensorInfo(t.name, t.ggml_type, t.shape) for t in tensors], alignment)
        for t in tensors:
            data = edit_tensor(t.name, t.data) if edit_tensor else None
            fh.write((t.data if data is None else data).tobytes())
            pad(fh, alignment)
    return Path(dst)


def f32_values(values: np.ndarray) -> np.ndarray:
    """F32 values as a tensor's (1, row_bytes) uint8 data, for edit_tensor."""
    return np.asarray(values, dtype="<f4").view(np.uint8).reshape(1, -1)
