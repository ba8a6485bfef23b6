"""Named traces: every intermediate tensor of one forward pass, by llama.cpp's graph names, so that
another engine's tensors (or `llama-eval-callback`'s printout) can be lined up with ours.

The forward pass shows each tensor to an observer (refengine.arch.common.DecoderModel.forward's
`observer=`) as it is made; `record` keeps those whose name matches a filter, joining the micro-batches
of a long input along the token axis. A trace is saved as one .npz: one array per tensor, (n_tok, ...)
in the model's dtype, plus `__tokens__` and `__names__` (the names in forward order).

The names, per architecture (N is the layer; docs/oracle.md lists them with shapes):
    all           inp_embd, attn_norm-N, Qcur-N, Kcur-N, Vcur-N (after rope), kqv_out-N,
                  l_out-N, result_norm, result_output
    llama, qwen*  ffn_inp-N, ffn_norm-N, ffn_out-N (dense) or ffn_moe_logits-N, ffn_moe_topk-N,
                  ffn_moe_weights[_norm|_scaled]-N, ffn_moe_out-N (experts); Qcur_normed-N, Kcur_normed-N
                  (QK-norm)
    gemma3        attn_post_norm-N, sa_out-N, ffn_norm-N, ffn_out-N, ffn_post_norm-N, Qcur_normed-N, ...
    deepseek2     kv_cmpr-N, k_pe-N (the latent cache's two parts), ffn_inp-N, ffn_norm-N, ffn_out-N,
                  ffn_moe_* as above, then ffn_shexp-N (the shared experts) and ffn_out-N (their sum)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from refengine.errors import RefengineError

TOKENS_KEY = "__tokens__"
NAMES_KEY = "__names__"


class TraceError(RefengineError):
    """A bad filter, a file that is not a trace, or a tensor the trace does not hold."""


@dataclass
class Trace:
    """Tensors by name, in forward order, each (n_positions, ...) for the positions kept."""

    tokens: np.ndarray  # (n_tok,) the ids evaluated
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    positions: Literal["all", "last"] = "all"

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise TraceError(f"the trace has no tensor {name!r} (it has {', '.join(self.tensors) or 'none'})")
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def save(self, path: str | Path) -> None:
        """As one .npz, written beside the target and renamed: an interrupted save leaves nothing."""
        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as fh:
                meta = json.dumps({"names": self.names, "positions": self.positions})
                arrays = {f"t{i}": self.tensors[name] for i, name in enumerate(self.names)}
                np.savez(fh, **{TOKENS_KEY: self.tokens, NAMES_KEY: np.array(meta)}, **arrays)
            os.chmod(partial, 0o644)
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        try:
            with np.load(path, allow_pickle=False) as data:
                if NAMES_KEY not in data or TOKENS_KEY not in data:
                    raise TraceError(f"{path}: not a refengine trace (no {NAMES_KEY} or {TOKENS_KEY})")
                meta = json.loads(str(data[NAMES_KEY]))
                tensors = {name: data[f"t{i}"] for i, name in enumerate(meta["names"])}
                return cls(data[TOKENS_KEY], tensors, meta["positions"])
        except (OSError, ValueError, KeyError) as e:  # missing file, not a zip/npz, missing member
            raise TraceError(f"{path}: cannot read a trace ({e})") from None

    def summary(self) -> list[dict]:
        """Per tensor: name, shape, dtype and the sum llama-eval-callback prints."""
        return [
            {"name": n, "shape": list(x.shape), "dtype": str(x.dtype), "sum": float(np.sum(x, dtype=np.float64))}
            for n, x in self.tensors.items()
        ]


def compile_filter(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise TraceError(f"--filter {pattern!r} is not a regular expression: {e}") from None


def record(model, tokens: np.ndarray, pattern: str | None = None, positions: str = "all") -> Trace:
    """Run `tokens` through a refengine.api.Model from an empty cache and keep the tensors whose name
    matches `pattern` (re.search; None keeps all). positions "last" keeps the last position only."""
    if positions not in ("all", "last"):
        raise TraceError(f"positions must be 'all' or 'last', not {positions!r}")
    wanted = compile_filter(pattern)
    parts: dict[str, list[np.ndarray]] = {}

    def observe(name: str, x: np.ndarray) -> None:
        # x is (n_tok of this micro-batch, ...); copied, since the forward pass may reuse its buffers
        if wanted is not None and not wanted.search(name):
            return
        if positions == "last":
            parts[name] = [np.array(x[-1:])]
        else:
            parts.setdefault(name, []).append(np.array(x))

    session = model.session
    session.model.forward(tokens, session.new_cache(len(tokens)), all_logits=True, observer=observe)
    tensors = {name: p[0] if len(p) == 1 else np.concatenate(p) for name, p in parts.items()}
    return Trace(np.asarray(tokens, dtype=np.int64), tensors, positions)  # type: ignore[arg-type]
