"""The tokenizer: llama.cpp's token ids, built from GGUF metadata alone.

Everything here follows llama.cpp's src/llama-vocab.cpp and src/unicode.cpp,
function by function, because "the same ids as llama.cpp" includes its quirks
(which we name where they show). One module per part:

    vocab.py        Vocab.from_metadata          llama_vocab::impl::load
                    split_special                llama_vocab::impl::tokenizer_st_partition
    spm.py          SpmModel.tokenize            llm_tokenizer_spm_session::tokenize   (tokenizer.ggml.model = "llama")
    pretokenize.py  pre_tokenize                 unicode_regex_split
    bpe.py          BpeModel.tokenize            llm_tokenizer_bpe_session::tokenize   (tokenizer.ggml.model = "gpt2")
    here            Tokenizer.encode             llama_vocab::impl::tokenize
                    Tokenizer.token_to_piece     llama_vocab::impl::token_to_piece
                    Tokenizer.decode             llama_vocab::impl::detokenize

Text is handled as UTF-8 bytes, as llama.cpp does, so invalid UTF-8 gets
llama.cpp's treatment. `encode` takes bytes, or a str that is encoded with
"surrogateescape": the str that `bytes.decode("utf-8", "surrogateescape")`
gives (and gguf.py gives for token texts) encodes back to the same bytes.

Unicode categories come from the stdlib `unicodedata`, read the way llama.cpp's
pre-tokenizer reads them (see `pre_tokenize`), so no regex engine with \\p{..}
is needed. llama.cpp's table is Unicode 15.1: the 15.0/15.1 additions are listed
below for Pythons older than 3.13. Characters newer than 15.1 (Python >= 3.14)
or from 14.0 (Python 3.10) can pre-tokenize differently in BPE models.
"""

from __future__ import annotations

import codecs

from refengine.tokenizer.bpe import BpeModel
from refengine.tokenizer.pretokenize import BYTE_CHARS, CHAR_BYTES
from refengine.tokenizer.spm import SPACE_ESCAPE, SpmModel
from refengine.tokenizer.vocab import (
    PARSE_SPECIAL_ONLY,
    SPECIAL_ATTRS,
    Attr,
    TokenizerError,
    Vocab,
    describe_value,
    special_tokens,
    split_special,
    utf8,
)

__all__ = ["BYTE_CHARS", "StreamDecoder", "Tokenizer", "TokenizerError", "Vocab", "describe_value"]


# -- the tokenizer ------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for a GGUF model, equal to llama.cpp's llama_tokenize / llama_detokenize."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.model = SpmModel(vocab.index, vocab.scores) if vocab.kind == "spm" else BpeModel(vocab)
        self.specials = special_tokens(vocab.texts, vocab.attrs)
        self.pieces: dict[tuple[int, bool], bytes] = {}

    @classmethod
    def from_gguf(cls, gguf_file) -> Tokenizer:
        """From an open GGUFFile (refengine.gguf.open_gguf); reads only its metadata."""
        try:
            return cls(Vocab.from_metadata(gguf_file.metadata))
        except TokenizerError as e:
            raise TokenizerError(f"{gguf_file.path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab.texts)

    @property
    def bos_id(self) -> int | None:
        return self.vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.vocab.eos_id

    @property
    def eot_id(self) -> int | None:
        return self.vocab.eot_id

    @property
    def eog_ids(self) -> frozenset[int]:
        """Every id that ends generation: EOS, EOT, <end_of_turn>, <|im_end|>, ... as llama_vocab_is_eog."""
        return self.vocab.eog_ids

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.vocab.eog_ids

    def encode(
        self,
        text: str | bytes,
        add_bos: bool | None = None,
        parse_special: bool = False,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Token ids of `text`. add_bos / add_eos: None follows the model (tokenizer.ggml.add_bos_token ...).

        parse_special=True turns the text of control tokens (<start_of_turn>,
        <|im_start|>) into those tokens; otherwise it is tokenized as plain text.
        """
        try:
            data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as e:  # a surrogate that does not stand for a byte: no UTF-8 for it
            raise TokenizerError(f"the text holds {text[e.start]!r} at {e.start}, a lone surrogate, not text") from None
        add_bos = self.vocab.add_bos if add_bos is None else add_bos
        add_eos = self.vocab.add_eos if add_eos is None else add_eos
        if add_bos and self.bos_id is None:
            raise TokenizerError("add_bos is set, but the model has no BOS token")
        if add_eos and self.eos_id is None:
            raise TokenizerError("add_eos is set, but the model has no EOS token")

        ids = [self.bos_id] if add_bos else []
        after_special = True  # SPM's space prefix goes on the first text and on text after a special token
        for fragment in split_special(data, self.specials, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
                continue
            if self.vocab.kind == "spm":
                if self.vocab.add_space_prefix and after_special:
                    fragment = b" " + fragment
                fragment = fragment.replace(b" ", SPACE_ESCAPE)
            ids.extend(self.model.tokenize(fragment))
            after_special = False
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token stands for. special=False renders control and unknown tokens as b""."""
        key = (token_id, special)
        if key not in self.pieces:
            self.pieces[key] = self._piece(token_id, special)
        return self.pieces[key]

    def _piece(self, token_id: int, special: bool) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        attr = self.vocab.attrs[token_id]
        text = self.vocab.texts[token_id]
        if attr & PARSE_SPECIAL_ONLY and not special:
            return b""
        if attr & SPECIAL_ATTRS:
            return utf8(text)
        if attr & Attr.NORMAL:
            if self.vocab.kind == "spm":
                return utf8(text).replace(SPACE_ESCAPE, b" ")
            return gpt2_decode_text(text)
        if attr & Attr.BYTE:
            return bytes([int(text[3:5], 16)])  # "<0xXX>"
        return b""  # unused and undefined tokens render as nothing

    def decode_bytes(self, ids: list[int], special: bool = False) -> bytes:
        """llama_detokenize(remove_special=False, unparse_special=special), as bytes."""
        pieces = [self.token_to_piece(i, special) for i in ids]
        if pieces and self.vocab.add_space_prefix and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]  # the space encode() put in front of the text
        text = b"".join(pieces)
        if self.vocab.kind == "bpe" and self.vocab.pre.clean_spaces:
            text = clean_up_spaces(text)
        return text

    def decode(self, ids: list[int], special: bool = False) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", "replace")

    def stream(self, special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, special)


def gpt2_decode_text(text: str) -> bytes:
    """llama_decode_text: each character of a byte-level token back to its byte."""
    out = bytearray()
    for char in text:
        if char in CHAR_BYTES:
            out.append(CHAR_BYTES[char])
        else:  # not a byte character: llama.cpp writes this marker instead
            raw = char.encode("utf-8", "surrogatepass")
            out += b"[UNK_BYTE_0x" + raw.hex().encode() + text.encode("utf-8", "surrogatepass") + b"]"
    return bytes(out)


def clean_up_spaces(text: bytes) -> bytes:
    """detokenize's clean_spaces passes, kept in their in-place form since later passes read earlier writes:
    " ?" " !" " ." " ," lose the space; " ' " loses both spaces; " 's" " 'm" " 're" " 've" lose the space."""
    buf = bytearray(text)

    def pass_over(step) -> None:
        total = len(buf)
        kept = 1 if total else 0
        i = 1
        while i < total:
            kept, i = step(buf, i, total, kept)
            i += 1
        del buf[kept:]

    def punctuation(b, i, total, kept):
        if b[i - 1] == 0x20 and b[i] in b"?!.,":
            kept -= 1
        b[kept] = b[i]
        return kept + 1, i

    def lone_apostrophe(b, i, total, kept):
        x = b[i]
        if x == 0x27 and i + 1 < total and b[i - 1] == 0x20 and b[i + 1] == 0x20:
            kept -= 1
            i += 1
            b[i] = 0
        b[kept] = x
        return kept + 1, i

    def contractions(b, i, total, kept):
        x = b[i]
        if b[i - 1] == 0x20 and x == 0x27 and i + 1 < total:
            x1 = b[i + 1]
            if x1 in b"sm" or x1 not in b"td" and i + 2 < total and bytes((x1, b[i + 2])) in (b"re", b"ve"):
                kept -= 1
        b[kept] = x
        return kept + 1, i

    for step in (punctuation, lone_apostrophe, contractions):
        pass_over(step)
    return bytes(buf)


class StreamDecoder:
    """Feed token ids as they are generated; get back only text whose UTF-8 is complete.

    A multi-byte character split across tokens (byte-fallback emoji) is held
    back until its last byte arrives. Pieces are joined as llama.cpp's
    streaming examples join token_to_piece, without detokenize's space clean-up.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.first = True

    def feed(self, *ids: int) -> str:
        out = []
        for token_id in ids:
            piece = self.tokenizer.token_to_piece(token_id, self.special)
            if self.first and self.tokenizer.vocab.add_space_prefix and piece.startswith(b" "):
                piece = piece[1:]  # as decode_bytes: only the very first token loses a space
            self.first = False
            out.append(self.utf8.decode(piece))
        return "".join(out)

    def flush(self) -> str:
        """The held-back bytes of an unfinished character, as U+FFFD."""
        return self.utf8.decode(b"", final=True)
