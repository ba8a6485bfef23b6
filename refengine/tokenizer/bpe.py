"""Byte-level BPE, as llama.cpp's llm_tokenizer_bpe_session (tokenizer.ggml.model = "gpt2")."""

from __future__ import annotations

from refengine.tokenizer.merge import merge_pairs
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

        def candidate(left: int, right: int) -> tuple[int, str] | None:
            rank = self.ranks.get((texts[left], texts[right]))  # lowest rank first: llm_bigram_bpe::comparator
            return None if rank is None else (rank, texts[left] + texts[right])

        def stale(left: int, right: int, joined: str) -> bool:
            return not texts[left] or not texts[right] or texts[left] + texts[right] != joined

        def merge(left: int, right: int, joined: str) -> None:
            texts[left], texts[right] = joined, ""

        merge_pairs(len(texts), candidate, stale, merge)

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
