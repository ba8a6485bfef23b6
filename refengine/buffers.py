"""The sizes of the buffers a forward pass allocates, in one numba-free place: refengine.nn allocates by
them, refengine.plan sizes a model's memory by them before anything is loaded."""

from __future__ import annotations

# Rows of a weight decoded per BLAS call: at most 8 MB of float32, whatever the model's size.
# Wider tiles make fewer, larger sgemm calls: gemma3-270m's pp512 went from 535 tok/s with 1 MB
# tiles to 605-667 with 8 MB (16 MB: no better); the dequantization itself is a few % of prefill.
TILE_FLOATS = 1 << 21

# Prompts are evaluated in micro-batches of this many tokens, as llama.cpp's n_ubatch: activations
# are sized by it, not by the prompt.
N_UBATCH = 512

# Score values one key block of prefill attention holds at most (16 MB of float32), whatever the
# context: the keys are taken in blocks of ATTENTION_TILE_FLOATS // (query rows) positions.
ATTENTION_TILE_FLOATS = 1 << 22
MIN_KEY_BLOCK = 64


def cache_slots(n_ctx: int, window: int, n_ubatch: int = N_UBATCH) -> int:
    """Slots a layer's KV cache needs at n_ctx: all of them, or a sliding window's ring of window + n_ubatch
    (refengine.nn.LayerCache; llama.cpp's iSWA cache)."""
    return min(n_ctx, window + n_ubatch) if window else n_ctx
