"""Byte-level BPE, as llama.cpp's llm_tokenizer_bpe_session (tokenizer.ggml.model = "gpt2")."""

from __future__ import annotations

import heapq

from refengine.tokenizer.pretokenize import (
    BYTE_CHARS,
    Splitter,
    llama_codepoints,
    pre_tokenize,
)
from refengine.tokenizer.vocab import Vocab

# -- byte-level BPE: llm_tokenizer_bpe_session -------------------------------------------------


class BpeModel:
    """Lowest-rank merge first over the byte-encoded characters of each word."""

    def __init__(self, vocab: Vocab):
        self.token_ids = vocab.index
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(vocab.merges):
            space = merge.find(" ", 1)  # as load(): a merge without a space becomes ("", "")
            pair = (merge[:space], merge[space + 1 :]) if space >= 0 else ("", "")
            self.ranks.setdefault(pair, rank)  # the first rank of a repeated merge wins
        self.splitters = [Splitter.compile(r) for r in vocab.pre.regexes]
        self.ignore_merges = vocab.pre.ignore_merges
        self.cache: dict[str, list[int]] = {}

    def tokenize(self, text: bytes) -> list[int]:
        ids: list[int] = []
        for word in pre_tokenize(llama_codepoints(text), self.splitters):
            # Surrogates from invalid input are encoded back as llama.cpp's unicode_cpt_to_utf8 does.
            encoded = "".join(BYTE_CHARS[b] for b in word.encode("utf-8", "surrogatepass"))
            if encoded not in self.cache:
                if len(self.cache) > 100_000:
                    self.cache.clear()
                self.cache[encoded] = self.tokenize_word(encoded)
            ids.extend(self.cache[encoded])
        return ids

    def tokenize_word(self, word: str) -> list[int]:
        if self.ignore_merges and word in self.token_ids:
            return [self.token_ids[word]]
        texts = list(word)  # one symbol per byte-encoded character; "" once merged to the left
        prev = list(range(-1, len(texts) - 1))
        next_ = [*range(1, len(texts)), -1]
        queue: list[tuple[int, int, int, str]] = []

        def add_bigram(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                rank = self.ranks.get((texts[left], texts[right]))
                if rank is not None:
                    # Lowest rank first, then leftmost: llm_bigram_bpe::comparator.
                    heapq.heappush(queue, (rank, left, right, texts[left] + texts[right]))

        for i in range(1, len(texts)):
            add_bigram(i - 1, i)
        while queue:
            _, left, right, joined = heapq.heappop(queue)
            if not texts[left] or not texts[right] or texts[left] + texts[right] != joined:
                continue  # outdated
            texts[left], texts[right] = joined, ""
            next_[left] = next_[right]
            if next_[right] >= 0:
                prev[next_[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, next_[left])

        ids: list[int] = []
        for symbol in filter(None, texts):
            token = self.token_ids.get(symbol)
            if token is not None:
                ids.append(token)
                continue
            # llama.cpp looks up each UTF-8 byte of the symbol as a one-byte text and
            # drops the bytes that are no token (only ASCII ones can be).
            for byte in symbol.encode("utf-8"):
                token = self.token_ids.get(bytes([byte]).decode("utf-8", "surrogateescape"))
                if token is not None:
                    ids.append(token)
        return ids
