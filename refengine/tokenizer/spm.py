"""SentencePiece tokenization, as llama.cpp's llm_tokenizer_spm_session (tokenizer.ggml.model = "llama")."""

from __future__ import annotations

from collections.abc import Sequence

from gguf import Keys

from refengine.tokenizer.merge import merge_pairs
from refengine.tokenizer.vocab import TokenizerError

# -- SentencePiece: llm_tokenizer_spm_session --------------------------------------------------

# unicode_len_utf8: a character's length from the high nibble of its first byte, valid or not.
UTF8_LENGTH = bytes([1] * 12 + [2, 2, 3, 4])
SPACE_ESCAPE = "\u2581".encode()  # "▁", SentencePiece's visible space


def utf8_character_spans(text: bytes) -> list[tuple[int, int]]:
    """(start, length) of each character, clipped at the end, exactly as llama.cpp splits invalid UTF-8."""
    spans = []
    pos, end = 0, len(text)
    while pos < end:
        length = min(UTF8_LENGTH[text[pos] >> 4], end - pos)
        spans.append((pos, length))
        pos += length
    return spans


class SpmModel:
    """Greedy highest-score bigram merging over characters, with <0xXX> byte fallback."""

    def __init__(self, token_ids: dict[str, int], scores: Sequence[float]):
        # Keyed by text as str (the vocabulary's own index, shared rather than copied as bytes: on a
        # 262k vocabulary that is 30 MB less); pieces of the input are looked up through `piece_id`.
        self.token_ids = token_ids
        self.scores = scores
        self.byte_ids = [self.byte_token(b) for b in range(256)]

    def byte_token(self, byte: int) -> int | None:
        """llama_vocab::byte_to_token: the <0xXX> token, else a token whose text is that byte."""
        found = self.token_ids.get(f"<0x{byte:02X}>")
        return found if found is not None else self.piece_id(bytes([byte]))

    def piece_id(self, piece: bytes) -> int | None:
        return self.token_ids.get(piece.decode("utf-8", "surrogateescape"))

    def tokenize(self, text: bytes) -> list[int]:
        spans = utf8_character_spans(text)
        start = [s for s, _ in spans]
        size = [n for _, n in spans]  # 0 once merged into the symbol on its left

        def candidate(left: int, right: int) -> tuple[float, int] | None:
            joined = size[left] + size[right]
            token = self.piece_id(text[start[left] : start[left] + joined])
            # highest score first: llm_bigram_spm::comparator
            return None if token is None else (-self.scores[token], joined)

        def stale(left: int, right: int, joined: int) -> bool:  # one side was merged since it was queued
            return size[left] == 0 or size[right] == 0 or size[left] + size[right] != joined

        def merge(left: int, right: int, joined: int) -> None:
            size[left], size[right] = joined, 0

        merge_pairs(len(spans), candidate, stale, merge)

        # Every merged symbol is a token (only tokens are queued), so llama.cpp's
        # resegment() reduces to: the symbol's token, or its bytes one by one.
        ids: list[int] = []
        for i in range(len(spans)):
            if size[i]:
                piece = text[start[i] : start[i] + size[i]]
                token = self.piece_id(piece)
                ids.extend([token] if token is not None else map(self.byte_fallback, piece))
        return ids

    def byte_fallback(self, byte: int) -> int:
        token = self.byte_ids[byte]
        if token is None:
            raise TokenizerError(f"byte 0x{byte:02X} has no <0x{byte:02X}> token in {Keys.Tokenizer.LIST}")
        return token
