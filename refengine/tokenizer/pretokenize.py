"""The BPE pre-tokenizer: llama.cpp's unicode_regex_split, with Unicode categories from unicodedata."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

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
