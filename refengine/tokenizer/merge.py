"""The bigram merge loop llama.cpp's SPM and BPE tokenizers share (llm_tokenizer_spm_session::tokenize,
llm_tokenizer_bpe_session::tokenize): symbols in a linked list, candidate pairs in a priority queue, the
best pair merged into its left symbol, its new neighbours queued."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


def merge_pairs(
    n: int,
    candidate: Callable[[int, int], tuple[Any, Any] | None],
    stale: Callable[[int, int, Any], bool],
    merge: Callable[[int, int, Any], None],
) -> None:
    """Merge symbols 0 .. n-1 pairwise until no candidate is left. candidate(left, right): (priority, joined)
    for a pair that may merge, else None; the lowest priority goes first, then the leftmost pair.
    stale(left, right, joined): a queued pair one of whose sides changed since; merge(left, right, joined):
    right into left (the caller keeps the symbols)."""
    prev = list(range(-1, n - 1))
    next_ = [*range(1, n), -1]
    queue: list[tuple[Any, int, int, Any]] = []

    def add(left: int, right: int) -> None:
        if left >= 0 and right >= 0:
            found = candidate(left, right)
            if found is not None:
                heapq.heappush(queue, (found[0], left, right, found[1]))

    for i in range(1, n):
        add(i - 1, i)
    while queue:
        _, left, right, joined = heapq.heappop(queue)
        if stale(left, right, joined):
            continue
        merge(left, right, joined)
        next_[left] = next_[right]
        if next_[right] >= 0:
            prev[next_[right]] = left
        add(prev[left], left)
        add(left, next_[left])
