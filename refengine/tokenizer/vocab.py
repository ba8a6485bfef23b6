"""The vocabulary of a GGUF model: token texts, scores and attributes, special ids, and the
split of text around special tokens (llama.cpp's llama_vocab::impl::load, tokenizer_st_partition)."""

from __future__ import annotations

import array
import re
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
