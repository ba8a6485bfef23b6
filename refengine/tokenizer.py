"""The tokenizer: llama.cpp's token ids, built from GGUF metadata alone.

Everything here follows llama.cpp's src/llama-vocab.cpp and src/unicode.cpp,
function by function, because "the same ids as llama.cpp" includes its quirks
(which we name where they show):

    Vocab.from_metadata          llama_vocab::impl::load
    Tokenizer.encode             llama_vocab::impl::tokenize
    split_special                llama_vocab::impl::tokenizer_st_partition
    SpmModel.tokenize            llm_tokenizer_spm_session::tokenize   (tokenizer.ggml.model = "llama")
    pre_tokenize                 unicode_regex_split
    BpeModel.tokenize            llm_tokenizer_bpe_session::tokenize   (tokenizer.ggml.model = "gpt2")
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

import array
import codecs
import heapq
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import Keys

from refengine.errors import RefengineError


class TokenizerError(RefengineError):
    """A GGUF vocabulary we cannot build a tokenizer from. The message names the key."""


# -- vocabulary ---------------------------------------------------------------------------------


class Attr:
    """llama_token_attr bits: what kind of token an id is. llama.cpp ORs CONTROL onto some tokens.
    (Plain ints, not an IntFlag: enum arithmetic costs half a second over a 262k vocabulary.)"""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# tokenizer.ggml.token_type values (llama_token_type) -> attribute; anything else is UNDEFINED.
TOKEN_TYPE_ATTR = {
    1: Attr.NORMAL,
    2: Attr.UNKNOWN,
    3: Attr.CONTROL,
    4: Attr.USER_DEFINED,
    5: Attr.UNUSED,
    6: Attr.BYTE,
}

# Tokens matched as whole pieces before the model runs (tokenizer_st_partition).
SPECIAL_ATTRS = Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN
# Of those, the ones matched only when the caller asks for parse_special.
PARSE_SPECIAL_ONLY = Attr.CONTROL | Attr.UNKNOWN

# Token texts that llama.cpp's load() recognises when the GGUF does not give the id.
EOT_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)
EOM_TEXTS = ("<|eom_id|>",)
FIM_TEXTS = {
    Keys.Tokenizer.FIM_PRE_ID: (
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ),
    Keys.Tokenizer.FIM_SUF_ID: (
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ),
    Keys.Tokenizer.FIM_MID_ID: (
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ),
    Keys.Tokenizer.FIM_PAD_ID: ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    Keys.Tokenizer.FIM_REP_ID: ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    Keys.Tokenizer.FIM_SEP_ID: ("<|file_sep|>",),
}
# Every token with one of these texts ends generation (the "special_eog_ids" loop of load()).
EOG_TEXTS = frozenset(
    (
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    )
)


# tokenizer.ggml.model -> the tokenizer llama.cpp runs, and the special ids it assumes
# when the GGUF has no key for them.
KINDS = {"llama": "spm", "gpt2": "bpe"}
DEFAULT_IDS = {
    "spm": {Keys.Tokenizer.BOS_ID: 1, Keys.Tokenizer.EOS_ID: 2, Keys.Tokenizer.UNK_ID: 0},
    "bpe": {Keys.Tokenizer.BOS_ID: 11, Keys.Tokenizer.EOS_ID: 11},
}
SPECIAL_ID_KEYS = (
    Keys.Tokenizer.BOS_ID,
    Keys.Tokenizer.EOS_ID,
    Keys.Tokenizer.EOT_ID,
    Keys.Tokenizer.EOM_ID,
    Keys.Tokenizer.UNK_ID,
    *FIM_TEXTS,
)


@dataclass(frozen=True)
class Pre:
    """A BPE pre-tokenizer: the regexes of llm_tokenizer_bpe's constructor and the flags load() sets."""

    regexes: tuple[str, ...]
    clean_spaces: bool = True  # detokenize's " ." -> "." clean-up
    ignore_merges: bool = False  # a word that is itself a token is taken whole
    add_bos: bool = False


GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's spelling of Llama 3's (?i:'s|...) and of Qwen2's, which differs only in \p{N}.
LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
DEEPSEEK3_REGEXES = (
    r"\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
DEFAULT_PRE = Pre((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"))

# tokenizer.ggml.pre -> pre-tokenizer, for the families we support (a subset of load()'s list).
PRE_TOKENIZERS: dict[str, Pre] = {
    "default": DEFAULT_PRE,
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        Pre((LLAMA3_REGEX,), ignore_merges=True, add_bos=True),
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), Pre((LLAMA3_REGEX,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), Pre((QWEN2_REGEX,), clean_spaces=False)),
    **dict.fromkeys(("stablelm2", "megrez"), Pre((QWEN2_REGEX,))),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense"), Pre(DEEPSEEK3_REGEXES, clean_spaces=False)),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "modern-bert"), Pre((GPT2_REGEX,))),
    **dict.fromkeys(("starcoder", "refact", "codeshell", "exaone", "minerva-7b"), Pre((r"\p{N}", GPT2_REGEX))),
    **dict.fromkeys(("smollm", "command-r"), Pre((r"\p{N}", GPT2_REGEX), clean_spaces=False)),
}


@dataclass
class Vocab:
    """The token table and special ids, as llama_vocab::impl::load leaves them."""

    kind: str  # "spm" or "bpe"
    texts: list[str]  # token text, decoded with surrogateescape
    index: dict[str, int]  # text -> id
    scores: Sequence[float]  # array of float32
    attrs: list[int]  # Attr bits
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    eog_ids: frozenset[int]
    pre: Pre | None = None  # BPE only
    merges: list[str] = field(default_factory=list)  # BPE only

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Vocab:
        model = field_of(metadata, Keys.Tokenizer.MODEL, "string")
        if model not in KINDS:
            raise TokenizerError(f"unsupported {Keys.Tokenizer.MODEL} {model!r} (supported: 'llama', 'gpt2')")
        kind = KINDS[model]
        pre = bpe_pre_tokenizer(metadata) if kind == "bpe" else None

        texts = read_token_texts(metadata)
        n = len(texts)
        scores = read_scores(metadata, n)
        attrs = read_attrs(metadata, n)
        check_byte_tokens(texts, attrs)
        index = {text: i for i, text in enumerate(texts)}
        ids = {key: special_id(metadata, key, DEFAULT_IDS[kind].get(key), n) for key in SPECIAL_ID_KEYS}
        detect_special_ids(ids, index, attrs)
        eog_ids = end_of_generation_ids(ids, index, attrs)

        add_bos = field_of(metadata, Keys.Tokenizer.ADD_BOS, "bool", kind == "spm" or pre.add_bos)
        add_eos = field_of(metadata, Keys.Tokenizer.ADD_EOS, "bool", False)
        for flag, value, key in (
            (Keys.Tokenizer.ADD_BOS, add_bos, Keys.Tokenizer.BOS_ID),
            (Keys.Tokenizer.ADD_EOS, add_eos, Keys.Tokenizer.EOS_ID),
        ):
            if value and ids[key] is None:
                raise TokenizerError(f"{flag} is true, but {key} is not set")
        return cls(
            kind=kind,
            texts=texts,
            index=index,
            scores=scores,
            attrs=attrs,
            bos_id=ids[Keys.Tokenizer.BOS_ID],
            eos_id=ids[Keys.Tokenizer.EOS_ID],
            eot_id=ids[Keys.Tokenizer.EOT_ID],
            unk_id=ids[Keys.Tokenizer.UNK_ID],
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=field_of(metadata, Keys.Tokenizer.ADD_PREFIX, "bool", kind == "spm"),
            eog_ids=eog_ids,
            pre=pre,
            merges=field_of(metadata, Keys.Tokenizer.MERGES, "strings", []) if kind == "bpe" else [],
        )


def bpe_pre_tokenizer(metadata: dict[str, Any]) -> Pre:
    name = field_of(metadata, Keys.Tokenizer.PRE, "string") or "default"  # llama.cpp warns and uses "default"
    if name not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise TokenizerError(f"unsupported {Keys.Tokenizer.PRE} {name!r} (supported: {known})")
    if Keys.Tokenizer.MERGES not in metadata:
        raise TokenizerError(f"{Keys.Tokenizer.MODEL} is 'gpt2' but {Keys.Tokenizer.MERGES} is missing")
    return PRE_TOKENIZERS[name]


def read_token_texts(metadata: dict[str, Any]) -> list[str]:
    texts = field_of(metadata, Keys.Tokenizer.LIST, "strings")
    if not texts:
        raise TokenizerError(f"{Keys.Tokenizer.LIST} is missing or empty")
    # llama.cpp renames empty tokens rather than give them a zero-length text.
    texts = [text or f"[EMPTY_{i}]" for i, text in enumerate(texts)]
    seen: set[str] = set()
    for text in texts:
        if text in seen:  # llama.cpp refuses these too: a text must name one id
            raise TokenizerError(f"{Keys.Tokenizer.LIST}: duplicate token {text!r}")
        seen.add(text)
    return texts


def read_scores(metadata: dict[str, Any], n: int) -> Sequence[float]:
    scores = field_of(metadata, Keys.Tokenizer.SCORES, "numbers")
    if scores is None:
        return array.array("f", bytes(4 * n))
    if len(scores) < n:
        raise TokenizerError(f"{Keys.Tokenizer.SCORES} has {len(scores)} entries for {n} tokens")
    # An array of float32 holds 262k scores in 1 MB where a list of Python floats takes 8 MB;
    # indexing it gives the same Python float.
    return array.array("f", np.asarray(scores[:n], dtype=np.float32).tobytes())


def read_attrs(metadata: dict[str, Any], n: int) -> list[int]:
    types = field_of(metadata, Keys.Tokenizer.TOKEN_TYPE, "integers")
    if types is None:
        return [Attr.NORMAL] * n
    if len(types) < n:
        raise TokenizerError(f"{Keys.Tokenizer.TOKEN_TYPE} has {len(types)} entries for {n} tokens")
    return [TOKEN_TYPE_ATTR.get(t, Attr.UNDEFINED) for t in types[:n].tolist()]


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def check_byte_tokens(texts: list[str], attrs: list[int]) -> None:
    """Every BYTE-typed token must read <0xXX>, the byte it stands for (llama.cpp's token_to_byte parses it)."""
    for i, attr in enumerate(attrs):
        if attr & Attr.BYTE and not BYTE_TOKEN.fullmatch(texts[i]):
            raise TokenizerError(
                f"{Keys.Tokenizer.TOKEN_TYPE}: token {i} is a byte token, but its text {texts[i][:40]!r} is not <0xXX>"
            )


# What field_of accepts for each kind of value, and how a message names it.
FIELD_KINDS = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "strings": (lambda v: isinstance(v, list), "an array of strings"),
    "numbers": (lambda v: isinstance(v, np.ndarray) and v.dtype.kind in "fiu", "an array of numbers"),
    "integers": (lambda v: isinstance(v, np.ndarray) and v.dtype.kind in "iu", "an array of integers"),
}


def field_of(metadata: dict[str, Any], key: str, kind: str, default: Any = None) -> Any:
    """metadata[key], which must be of `kind` (a key of FIELD_KINDS), or `default` when absent."""
    if key not in metadata:
        return default
    value = metadata[key]
    accepts, expected = FIELD_KINDS[kind]
    if not accepts(value):
        raise TokenizerError(f"{key} is {describe_value(value)}, expected {expected}")
    return value


def describe_value(value: Any) -> str:
    """What a metadata value is, for messages: "an array of 3 uint32", "a string", ..."""
    if isinstance(value, np.ndarray):
        return f"an array of {value.size} {value.dtype.name}"
    if isinstance(value, list):
        return f"an array of {len(value)} strings"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value), "a value")


def special_id(metadata: dict[str, Any], key: str, default: int | None, n: int) -> int | None:
    """A special token id from its key; llama.cpp keeps the default for an out-of-range id."""
    if default is not None and default >= n:
        default = None
    value = field_of(metadata, key, "int")
    return value if value is not None and 0 <= value < n else default


def detect_special_ids(ids: dict[str, int | None], index: dict[str, int], attrs: list[int]) -> None:
    """Find EOT, EOM and FIM ids by their text when the GGUF does not say, and make them CONTROL.

    llama.cpp walks an unordered_map, so when several texts match (SmolLM2 has
    both <|endoftext|> and <|im_end|>) its pick depends on hash order; we take the
    lowest id, which agrees with llama.cpp on both bundled models.
    """
    wanted = {Keys.Tokenizer.EOT_ID: EOT_TEXTS, Keys.Tokenizer.EOM_ID: EOM_TEXTS, **FIM_TEXTS}
    for key, candidates in wanted.items():
        found = [index[text] for text in candidates if text in index]
        if ids[key] is None and found:
            ids[key] = min(found)
            attrs[ids[key]] |= Attr.CONTROL


def end_of_generation_ids(ids: dict[str, int | None], index: dict[str, int], attrs: list[int]) -> frozenset[int]:
    """The tokens that end generation: FIM pad/repo/sep, every EOG-looking text, EOS, EOT, EOM.

    (llama.cpp's model-specific exceptions for gpt-oss, solar-open and gemma4 are not applied.)
    """
    eog = {ids[k] for k in (Keys.Tokenizer.FIM_PAD_ID, Keys.Tokenizer.FIM_REP_ID, Keys.Tokenizer.FIM_SEP_ID)}
    for text in EOG_TEXTS & index.keys():
        eog.add(index[text])
        attrs[index[text]] |= Attr.CONTROL  # e.g. gemma's user-defined "</s>": parsed only with parse_special
    eog |= {ids[k] for k in (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID)}
    eog.discard(None)
    return frozenset(eog)


def utf8(text: str) -> bytes:
    """A token's text as bytes; surrogateescape round-trips the invalid UTF-8 of byte-level vocabularies."""
    return text.encode("utf-8", "surrogateescape")


# -- special tokens: tokenizer_st_partition ----------------------------------------------------


def special_tokens(texts: list[str], attrs: list[int]) -> list[tuple[bytes, int, int]]:
    """(text, id, attr) of every token matched whole, longest text first.

    llama.cpp uses an unstable sort here; ties keep id order, which can only
    matter for two same-length special texts that overlap in the input.
    """
    specials = [(utf8(texts[i]), i, attr) for i, attr in enumerate(attrs) if attr & SPECIAL_ATTRS]
    specials.sort(key=lambda s: -len(s[0]))
    return specials


def split_special(data: bytes, specials: list[tuple[bytes, int, int]], parse_special: bool) -> list[bytes | int]:
    """Cut the text at each special token, longest token first: raw byte fragments and token ids.

    User-defined tokens (gemma's "\\n", runs of spaces, HTML tags) are cut out
    even without parse_special; control tokens such as <start_of_turn> only with it.
    (The LSTRIP/RSTRIP attributes llama.cpp gives a few models' tokens by name are not applied.)
    """
    fragments: list[bytes | int] = [data] if data else []
    for text, token_id, attr in specials:
        if not parse_special and attr & PARSE_SPECIAL_ONLY:
            continue
        if not any(isinstance(f, bytes) and text in f for f in fragments):
            continue
        cut: list[bytes | int] = []
        for fragment in fragments:
            if isinstance(fragment, int) or text not in fragment:
                cut.append(fragment)
                continue
            pieces = fragment.split(text)  # leftmost, non-overlapping: the same cuts as llama.cpp's find loop
            for k, piece in enumerate(pieces):
                if k:
                    cut.append(token_id)
                if piece:
                    cut.append(piece)
        fragments = cut
    return fragments


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
        prev = list(range(-1, len(spans) - 1))
        next_ = [*range(1, len(spans)), -1]
        queue: list[tuple[float, int, int, int]] = []

        def add_bigram(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            joined = size[left] + size[right]
            token = self.piece_id(text[start[left] : start[left] + joined])
            if token is not None:
                # Highest score first, then leftmost: llm_bigram_spm::comparator.
                heapq.heappush(queue, (-self.scores[token], left, right, joined))

        for i in range(1, len(spans)):
            add_bigram(i - 1, i)
        while queue:
            _, left, right, joined = heapq.heappop(queue)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != joined:
                continue  # one side was merged since this bigram was queued
            size[left], size[right] = joined, 0
            next_[left] = next_[right]
            if next_[right] >= 0:
                prev[next_[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, next_[left])

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


# -- BPE pre-tokenizer: unicode_regex_split ----------------------------------------------------

# Unicode White_Space: llama.cpp's unicode_set_whitespace.
WHITESPACE = frozenset(
    (
        0x09,
        0x0A,
        0x0B,
        0x0C,
        0x0D,
        0x20,
        0x85,
        0xA0,
        0x1680,
        *range(0x2000, 0x200B),
        0x2028,
        0x2029,
        0x202F,
        0x205F,
        0x3000,
    )
)
# Codepoints assigned in Unicode 15.0 and 15.1, by major category. llama.cpp's table is
# Unicode 15.1; Python 3.11's unicodedata is 14.0 and calls these unassigned. (Diffing
# the two tables finds exactly these ranges; format controls are left out, since an
# unassigned codepoint and a control one pre-tokenize alike.)
UNICODE_15_ADDITIONS = {
    "L": (
        (0x1123F, 0x11240),
        (0x11F02, 0x11F02),
        (0x11F04, 0x11F10),
        (0x11F12, 0x11F33),
        (0x1342F, 0x1342F),
        (0x13441, 0x13446),
        (0x1B132, 0x1B132),
        (0x1B155, 0x1B155),
        (0x1DF25, 0x1DF2A),
        (0x1E030, 0x1E06D),
        (0x1E4D0, 0x1E4EB),
        (0x2B739, 0x2B739),
        (0x2EBF0, 0x2EE5D),
        (0x31350, 0x323AF),
    ),
    "M": (
        (0x00CF3, 0x00CF3),
        (0x00ECE, 0x00ECE),
        (0x10EFD, 0x10EFF),
        (0x11241, 0x11241),
        (0x11F00, 0x11F01),
        (0x11F03, 0x11F03),
        (0x11F34, 0x11F3A),
        (0x11F3E, 0x11F42),
        (0x13440, 0x13440),
        (0x13447, 0x13455),
        (0x1E08F, 0x1E08F),
        (0x1E4EC, 0x1E4EF),
    ),
    "N": ((0x11F50, 0x11F59), (0x1D2C0, 0x1D2D3), (0x1E4F0, 0x1E4F9)),
    "P": ((0x11B00, 0x11B09), (0x11F43, 0x11F4F)),
    "S": (
        (0x02FFC, 0x02FFF),
        (0x031EF, 0x031EF),
        (0x1F6DC, 0x1F6DC),
        (0x1F774, 0x1F776),
        (0x1F77B, 0x1F77F),
        (0x1F7D9, 0x1F7D9),
        (0x1FA75, 0x1FA77),
        (0x1FA87, 0x1FA88),
        (0x1FAAD, 0x1FAAF),
        (0x1FABB, 0x1FABD),
        (0x1FABF, 0x1FABF),
        (0x1FACE, 0x1FACF),
        (0x1FADA, 0x1FADB),
        (0x1FAE8, 0x1FAE8),
        (0x1FAF7, 0x1FAF8),
    ),
}

# llama.cpp's "collapsed" text: each non-ASCII codepoint becomes one stand-in for its
# category, and \p{X} in a regex becomes a class of that stand-in plus X's ASCII members.
# Python's `re` then splits exactly as llama.cpp's std::regex does on the same strings.
COLLAPSED = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
OTHER, SPACE_STAND_IN = "\xd0", "\x0b"  # unassigned/control/format, and non-ASCII whitespace
CATEGORY_CLASSES = {
    r"\p{N}": "\xd1" + "0-9",
    r"\p{L}": "\xd2" + "A-Za-z",
    r"\p{P}": "\xd3" + r"!-#%-*,-/:-;?-@\[-\]_\{\}",
    r"\p{M}": "\xd4",
    r"\p{S}": "\xd5" + r"\$\+<->^`\|~",  # "~" since llama.cpp added it to its table
}


def major_category(codepoint: int) -> str:
    """ "L", "N", "P", ... as llama.cpp's unicode_cpt_flags_from_cpt sees the codepoint."""
    category = unicodedata.category(chr(codepoint))
    if category == "Cn":
        for major, ranges in UNICODE_15_ADDITIONS.items():
            if any(lo <= codepoint <= hi for lo, hi in ranges):
                return major
    return category[0]


class CollapseTable(dict):
    """A str.translate table, filled on first use: non-ASCII codepoint -> its category stand-in."""

    def __missing__(self, codepoint: int) -> str:
        if codepoint < 0x80:
            stand_in = chr(codepoint)
        elif codepoint in WHITESPACE:
            stand_in = SPACE_STAND_IN
        else:
            stand_in = COLLAPSED.get(major_category(codepoint), OTHER)
        self[codepoint] = stand_in
        return stand_in


class SpaceTable(dict):
    """For regexes without \\p{..}: only non-ASCII whitespace changes, as llama.cpp does for std::wregex."""

    def __missing__(self, codepoint: int) -> str:
        stand_in = SPACE_STAND_IN if codepoint >= 0x80 and codepoint in WHITESPACE else chr(codepoint)
        self[codepoint] = stand_in
        return stand_in


COLLAPSE, SPACES = CollapseTable(), SpaceTable()


def uses_categories(regex: str) -> bool:
    return any(name in regex for name in CATEGORY_CLASSES)


def collapse_regex(regex: str) -> str:
    r"""Each \p{X} becomes its stand-in class, inside [...] or as a new [...], as in unicode_regex_split."""
    out, inside, i = [], False, 0
    while i < len(regex):
        char = regex[i]
        if char == "[" and (i == 0 or regex[i - 1] != "\\"):
            inside = True
        elif char == "]" and inside and regex[i - 1] != "\\":
            inside = False
        elif regex.startswith(r"\p{", i) and regex[i : regex.find("}", i) + 1] in CATEGORY_CLASSES:
            name = regex[i : regex.find("}", i) + 1]
            out.append(CATEGORY_CLASSES[name] if inside else f"[{CATEGORY_CLASSES[name]}]")
            i += len(name)
            continue
        out.append(char)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Splitter:
    """One pre-tokenizer regex, compiled for the text form it runs on."""

    pattern: re.Pattern
    collapsed: bool

    @classmethod
    def compile(cls, regex: str) -> Splitter:
        # re.ASCII: \s and \S as in std::regex's "C" locale (no \x1c-\x1f).
        collapsed = uses_categories(regex)
        return cls(re.compile(collapse_regex(regex) if collapsed else regex, re.ASCII), collapsed)


def pre_tokenize(text: str, splitters: list[Splitter]) -> list[str]:
    """The words of `text`: each regex splits the pieces the previous one left.

    Like unicode_regex_split, text between matches is kept as words of its own.
    (llama.cpp runs hand-written equivalents of the GPT-2 and Llama 3 regexes;
    these follow the regexes themselves, which is what they reproduce.)
    """
    spans = [(0, len(text))]
    forms = {
        collapsed: text.translate(COLLAPSE if collapsed else SPACES) for collapsed in {s.collapsed for s in splitters}
    }
    for splitter in splitters:
        subject = forms[splitter.collapsed]
        spans = [piece for start, end in spans for piece in regex_spans(splitter.pattern, subject, start, end)]
    return [text[start:end] for start, end in spans]


def regex_spans(pattern: re.Pattern, subject: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, last = [], start
    for match in pattern.finditer(subject[start:end]):  # a slice: lookaheads see the piece's end
        m_start, m_end = start + match.start(), start + match.end()
        if m_start > last:
            spans.append((last, m_start))
        if m_end > m_start:
            spans.append((m_start, m_end))
        last = m_end
    if last < end:
        spans.append((last, end))
    return spans


def llama_codepoints(data: bytes) -> str:
    """unicode_cpts_from_utf8: UTF-8 to codepoints the lenient way llama.cpp does.

    Valid UTF-8 decodes as usual. Otherwise each bad byte becomes U+FFFD, while
    overlong forms and surrogates decode to their codepoint (b"\\xc0\\xaf" is "/").
    A codepoint past U+10FFFF (lead bytes F4-F7) makes llama.cpp abort; we use U+FFFD.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out, pos, end = [], 0, len(data)
    while pos < end:
        lead = data[pos]
        length = (
            1
            if lead < 0x80
            else 2
            if lead >> 5 == 0b110
            else 3
            if lead >> 4 == 0b1110
            else (4 if lead >> 3 == 0b11110 else 0)
        )
        tail = data[pos + 1 : pos + length]
        if length == 1:
            out.append(chr(lead))
        elif length and len(tail) == length - 1 and all(b >> 6 == 0b10 for b in tail):
            codepoint = lead & (0x7F >> length)
            for b in tail:
                codepoint = codepoint << 6 | b & 0x3F
            out.append(chr(codepoint) if codepoint <= 0x10FFFF else "\ufffd")
        else:
            out.append("\ufffd")
            length = 1
        pos += length
    return "".join(out)


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map (unicode_byte_to_utf8_map): bytes that print stand
    for themselves, the rest take the codepoints from 256 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = [], 256
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(extra))
            extra += 1
    return chars


BYTE_CHARS = gpt2_byte_chars()
CHAR_BYTES = {char: byte for byte, char in enumerate(BYTE_CHARS)}


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
            if x1 in b"sm":
                kept -= 1
            elif x1 not in b"td" and i + 2 < total and bytes((x1, b[i + 2])) in (b"re", b"ve"):
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
