"""The one reader of a file's `{arch}.*` hyper-parameter keys, and the errors of a model that cannot load.

Every reader of hyper-parameters (the architectures, the memory plan, the quantizer's type rules, the
transformers mapping of the tiny models) goes through HParams, so that a key is found, typed and checked
one way. A key may hold one value or one per layer (llama.cpp's per-layer arrays, e.g.
attention.head_count_kv); each caller says what it needs of such an array (`per_layer`):

    "uniform"   the one value every layer has; an array that varies is an error (the architectures here)
    "max"       the largest (the memory plan's bounds)
    "first"     layer 0's (llama.cpp's hparams.n_head(0), as its quantizer's type rules read it)

and `per_layer_ints` gives every layer's value. Numba-free: the plan reads headers without compiling kernels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refengine.errors import RefengineError
from refengine.gguf import GGUFFile
from refengine.tokenizer import describe_value

PER_LAYER_RULES = ("uniform", "max", "first")
# A scalar stands for block_count values: a bound on how many a per-layer tuple is made of.
MAX_LAYERS = 1 << 16


class ModelError(RefengineError):
    """Missing keys or tensors, or an architecture we do not support."""


class HParams:
    """`{arch}.*` keys of one file, each read with a clear error naming the key when it is missing, of
    the wrong type, or out of range (so that no size of 0, no NaN and no string reaches the model).
    `error`: the RefengineError subclass raised (ModelError; the plan's PlanError, the quantizer's ...)."""

    def __init__(self, gguf_file: GGUFFile, error: type[RefengineError] = ModelError):
        self.gguf = gguf_file
        self.arch = gguf_file.architecture
        self.error = error

    def fail(self, key: str, problem: str) -> RefengineError:
        return self.error(f"{self.gguf.path}: {self.arch}.{key} {problem}")

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.gguf.metadata

    def raw(self, key: str, default: Any = None) -> Any:
        """The value as stored (a per-layer array stays an array), or default."""
        return self.gguf.get(f"{self.arch}.{key}", default)

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], expected: str, per_layer: str) -> Any:
        full = f"{self.arch}.{key}"
        value = self.gguf.get(full, default)
        if value is None:
            raise self.error(f"{self.gguf.path}: missing metadata key {full!r}")
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            value = self._one_of_layers(key, value, per_layer)
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.fail(key, f"is {describe_value(value)}, expected {expected}")
        return value

    def _one_of_layers(self, key: str, values: np.ndarray, per_layer: str) -> Any:
        if values.size == 0:
            raise self.fail(key, "is an empty array")
        if per_layer == "uniform":
            if (values != values.flat[0]).any():
                raise self.fail(key, "varies per layer, which is not supported")
            return values.flat[0].item()
        if per_layer == "max":
            return values.max().item()
        if per_layer == "first":
            return values.flat[0].item()
        raise ValueError(f"per_layer {per_layer!r}: one of {PER_LAYER_RULES}")

    def int(self, key: str, default: int | None = None, minimum: int = 0, per_layer: str = "uniform") -> int:
        value = self._get(key, default, (int,), "an integer", per_layer)
        if value < minimum:
            raise self.fail(key, f"is {value}, must be at least {minimum}")
        return value

    def float(self, key: str, default: float | None = None, minimum: float | None = None, above: bool = False) -> float:
        """A finite number, at least `minimum` (or above it, with above=True)."""
        value = float(self._get(key, default, (int, float), "a number", "uniform"))
        if not math.isfinite(value):
            raise self.fail(key, f"is {value}, not a finite number")
        if minimum is not None and (value <= minimum if above else value < minimum):
            raise self.fail(key, f"is {value}, must be {'above' if above else 'at least'} {minimum}")
        return value

    def str(self, key: str, default: str | None = None) -> str:
        return self._get(key, default, (str,), "a string", "uniform")

    def bool(self, key: str, default: bool | None = None) -> bool:
        return self._get(key, default, (bool,), "a boolean", "uniform")

    def per_layer_ints(self, key: str, n_layer: int, default: int | None = None, minimum: int = 0) -> tuple[int, ...]:
        """Each layer's value of a key that holds one value or one per layer."""
        full = f"{self.arch}.{key}"
        value = self.gguf.get(full, default)
        if value is None:
            raise self.error(f"{self.gguf.path}: missing metadata key {full!r}")
        if not isinstance(value, np.ndarray):
            if n_layer > MAX_LAYERS:
                raise self.fail("block_count", f"is {n_layer}, more than {MAX_LAYERS}")
            return (self.int(key, default, minimum),) * n_layer
        if value.size != n_layer:
            raise self.fail(key, f"has {value.size} entries for {n_layer} layers")
        if value.dtype.kind not in "iu" or (value < minimum).any():
            raise self.fail(key, f"is {describe_value(value)}, expected integers of at least {minimum}")
        return tuple(int(v) for v in value.tolist())
