"""Where a forward pass first produced NaN or infinity, by llama.cpp's tensor names.

The sampler refuses logits that are not finite (refengine.sampler.NonFiniteLogits); generation then
evaluates the same tokens again from an empty cache with an observer on the forward pass
(DecoderModel.forward's `observer=`), as llama-eval-callback prints a graph, and names the first
tensor that holds a value that is not finite: "attn_norm-3" (layer 3's attention norm), "inp_embd",
"result_output". The tokens before the last are evaluated as one batch and the last one alone, so the
step that failed runs through the same path (the one-token kernels) as it did.
"""

from __future__ import annotations

import numpy as np

from refengine.sampler import NonFiniteLogits


def first_non_finite(model, tokens: list[int]) -> tuple[str, int] | None:
    """The name of the first tensor of `tokens`' forward pass holding NaN or inf, and the position of
    its first bad row; None if every tensor is finite (the failure does not reproduce)."""
    found: list[tuple[str, int]] = []
    n_past = 0

    def observe(name: str, x: np.ndarray) -> None:
        if found or x.dtype.kind != "f":
            return
        rows = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)  # (n_tok,) positions with a bad value
        if rows.any():
            found.append((name, n_past + int(np.argmax(rows))))

    cache = model.new_cache(len(tokens))
    if len(tokens) > 1:
        model.forward(np.asarray(tokens[:-1]), cache, all_logits=False, observer=observe)
        n_past = len(tokens) - 1
    if not found:
        model.forward(np.asarray(tokens[-1:]), cache, all_logits=False, observer=observe)
    return found[0] if found else None


def locate(error: NonFiniteLogits, model, tokens: list[int]) -> NonFiniteLogits:
    """`error` with the first non-finite tensor named, for its one-line message."""
    try:
        found = first_non_finite(model, tokens)
    except Exception as e:  # the diagnosis must not hide the error it explains
        return NonFiniteLogits(f"{error} (re-running to find the layer failed: {e})", error.n_evaluated)
    if found is None:
        where = "re-evaluated from an empty cache, every tensor is finite"
    else:
        name, position = found
        layer = name.rpartition("-")[2]
        where = f"first in {name}{f' (layer {layer})' if layer.isdigit() else ''}, at position {position}"
    return NonFiniteLogits(f"{error}; {where}", error.n_evaluated)
