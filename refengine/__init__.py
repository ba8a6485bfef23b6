"""refengine: a CPU reference inference engine for GGUF language models.

`refengine.load(name_or_path, precision="f32", numerics="exact", cache_type=None)` returns a
refengine.api.Model (tokenize, logits, trace, generate, perplexity). numpy and numba load only when it is called."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from refengine.api import CacheType, Model, Numerics, Precision

try:
    __version__ = version("refengine")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def load(
    name_or_path: str | os.PathLike,
    precision: Precision = "f32",
    numerics: Numerics = "exact",
    cache_type: CacheType | None = None,
) -> Model:
    """A model by path or short name; see refengine.api.load."""
    from refengine import api

    return api.load(name_or_path, precision, numerics, cache_type)


__all__ = ["__version__", "load"]
