"""gguf-py's F32 dequantization of a model: the same file with every tensor dequantized to F32 by
gguf.quants (written by the ggml authors, independently of refengine's kernels).

llama.cpp on this copy computes the exact function the quantized file defines (no 8-bit rounding of
activations: its F32 matmuls are plain float32), which is what refengine's f32 path must equal. The
oracle tests and golden scripts run llama.cpp's tools on it.

    path = f32_copy("gemma3-270m")     # made once into ~/.cache/refengine/f32/, then reused
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType, quants

from refengine.gguf import DEFAULT_ALIGNMENT, open_gguf
from refengine.gguf_write import TensorInfo, pad, write_header
from refengine.models import cache_dir, resolve_model

ROWS_PER_STEP = 8192  # rows dequantized at a time, so a 262,144-row embedding is never held twice


def write_f32_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write `source` with every tensor as F32, dequantized by gguf.quants; metadata kept, file type ALL_F32."""
    target = Path(target)
    with open_gguf(source) as model:
        metadata = dict(model.metadata)
        value_types = dict(model.value_types)
        metadata["general.file_type"] = int(LlamaFileType.ALL_F32)
        value_types["general.file_type"] = GGUFValueType.UINT32
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        tensors = list(model.tensors.values())
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as fh:
                infos = [TensorInfo(t.name, GGMLQuantizationType.F32, t.shape) for t in tensors]
                write_header(fh, metadata, value_types, infos, alignment)
                for t in tensors:
                    for start in range(0, t.n_rows, ROWS_PER_STEP):
                        rows = t.data[start : start + ROWS_PER_STEP]  # (n, row_bytes) uint8
                        fh.write(np.ascontiguousarray(quants.dequantize(rows, t.ggml_type), dtype="<f4").tobytes())
                    pad(fh, alignment)
            os.chmod(partial, 0o644)  # mkstemp's 0600 would hide the copy from other users of the cache
            os.replace(partial, target)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    return target


def f32_copy(name_or_path: str | os.PathLike) -> Path:
    """The F32 copy of a model, made once into the cache (keyed by the source's name and size)."""
    source = resolve_model(name_or_path)
    folder = cache_dir() / "f32"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{source.stem}.{source.stat().st_size}.f32.gguf"
    return target if target.is_file() else write_f32_copy(source, target)
