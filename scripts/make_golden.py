#!/usr/bin/env python3
"""Write tests/golden/tokenize_<model>.json: llama.cpp's token ids for a varied corpus.

Run once, by hand, with llama-cpp-python installed (`pip install -e '.[oracle]'`);
the files are committed and tests/test_tokenizer.py checks refengine against them.
Each case records, for one text and one pair of flags:
  ids      Llama(model, vocab_only=True).tokenize(text, add_bos=add_special, special=parse_special)
  decoded  llama_detokenize(ids, remove_special=False, unparse_special=parse_special)
Texts and decoded strings are stored as str decoded with "surrogateescape", so bytes
that are not UTF-8 survive the JSON (as \\udcXX escapes) and encode back exactly.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import click

from refengine.models import BUNDLED, resolve_model

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"

CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b  # tuple swap
    return a
'''
C_CODE = 'int main(void) {\n\tprintf("%d\\n", 42);\n\treturn 0;\n}\n'

CORPUS = [
    # plain text, punctuation, contractions (the BPE regexes special-case 's 't 're ...)
    "",
    "Hello world",
    "Hello, world! How's it going? I'm fine; you'd've thought so...",
    "I'M SHOUTING, YOU'RE LATE, HE'LL SEE, WE'VE GONE, THEY'D KNOW, IT'S 'QUOTED'",
    "don 't  ' lone apostrophe ' s and x 's y 'm",
    "a , b . c ! d ? e",
    "The quick brown fox jumps over the lazy dog. " * 3,
    # leading, trailing and single whitespace
    " ",
    "  leading spaces",
    "trailing spaces   ",
    " both ",
    "\n",
    "\r\n",
    # whitespace runs: spaces, tabs, newlines, mixed
    "a  b   c    d     e",
    "x" + " " * 40 + "y",
    "tabs\there\t\tand\t\t\tthere",
    "new\nline\n\nand\n\n\nmore\n\n\n\n",
    "mixed \t\n \r\n\t end \n\t ",
    "\u00a0no-break\u2009thin\u3000ideographic\u2028line\u0085next",
    # numbers
    "1234567890123456789012345",
    "3.14159 2,718 1e-10 -42 0x1F 1_000_000",
    "０１２３ fullwidth, Ⅻ roman, ½ fraction, ² superscript, ٣ arabic-indic",
    # code
    CODE,
    C_CODE,
    '{"key": [1, 2, {"nested": null}], "url": "https://example.com/a?b=c&d=e"}',
    '<div class="x"><b>bold</b> <i>it</i></div><table><tr><td>1</td></tr></table>',
    "SELECT * FROM t WHERE a <> b AND c >= 10; -- comment\n$x = ~$y | $z ^ `cmd`;",
    # Chinese, Japanese, Korean, RTL
    "我爱自然语言处理。今天天气很好！",
    "こんにちは、世界。カタカナとひらがな、そして漢字。",
    "안녕하세요, 세계!",
    "שלום עולם, مرحبا بالعالم",
    # emoji: single, ZWJ family, flag, skin tone, newer (Unicode 15) emoji
    "👋🌍 family: 👨\u200d👩\u200d👧\u200d👦 flag: 🇯🇵 skin: 👍🏽 new: 🫨🩷",
    # special-token text, parsed or not depending on the case's flags
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>",
    "<bos>text<eos> </s> <s> <unk> <pad>",
    "<|endoftext|><|im_end|><reponame>",
    "[multimodal]<unused0><start_of_image><end_of_image>",
    "<<|im_end|>> <start_of_turn <|im_start|",
    "<0x41> <0xFF>",
    # odd Unicode: combining marks, zero-width, controls, replacement, noncharacters, private use
    "e\u0301 a\u0300\u0316 Z\u0324\u0354\u0367\u0311\u0313 a\u0308\u0356\u032d\u0308\u0307",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "\x00\x01\x1c\x1f\x7f controls",
    "\ufffd replacement, \uffff\U0010ffff noncharacters, \ue000 private use",
    "\u2581 sentencepiece space\u2581and a\u2581b",
    "\U00031350's CJK Ext H, ſ's long s, İstanbul, ǅ titlecase",
    # invalid UTF-8 (surrogate-escaped bytes): stray bytes, truncated 中, overlong "/", a surrogate
    "\udcff\udcfeabc",
    "a\udce4\udcb8",
    "\udcc0\udcaf",
    "a\udced\udca0\udc80b",
    "\udc80 lone continuation byte",
]

FLAGS = [(add_special, parse_special) for add_special in (True, False) for parse_special in (False, True)]


def utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def detokenize(llama_cpp, vocab, ids: list[int], special: bool) -> bytes:
    tokens = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 64 + 256 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, size, False, special)
    if n < 0:
        raise RuntimeError(f"llama_detokenize needs {-n} bytes, had {size}")
    return buf.raw[:n]


def special_tokens(llama_cpp, vocab) -> dict:
    """The special ids and flags llama.cpp derived from the vocabulary."""
    n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)

    def token(value: int) -> int | None:
        return None if value < 0 else value

    return {
        "vocab_size": n_tokens,
        "bos": token(llama_cpp.llama_vocab_bos(vocab)),
        "eos": token(llama_cpp.llama_vocab_eos(vocab)),
        "eot": token(llama_cpp.llama_vocab_eot(vocab)),
        "eog": [i for i in range(n_tokens) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
    }


def golden(model: str) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(str(resolve_model(model)), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    cases = []
    for text in CORPUS:
        for add_special, parse_special in FLAGS:
            ids = llm.tokenize(utf8(text), add_bos=add_special, special=parse_special)
            decoded = detokenize(llama_cpp, vocab, ids, parse_special)
            cases.append(
                {
                    "text": text,
                    "add_special": add_special,
                    "parse_special": parse_special,
                    "ids": ids,
                    "decoded": decoded.decode("utf-8", "surrogateescape"),
                }
            )
    return {
        "model": model,
        "llama_cpp_python": llama_cpp.__version__,
        "special": special_tokens(llama_cpp, vocab),
        "cases": cases,
    }


def write(data: dict, path: Path) -> None:
    """JSON with one case per line, so a changed id shows as a one-line diff."""
    head = {k: v for k, v in data.items() if k != "cases"}
    lines = [json.dumps(head)[:-1] + ', "cases": [']
    lines += [json.dumps(case) + "," for case in data["cases"]]
    lines[-1] = lines[-1].rstrip(",")
    lines.append("]}")
    path.write_text("\n".join(lines) + "\n")
    json.loads(path.read_text())  # what we wrote must read back


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1, metavar="[MODEL]...")
def main(models: tuple[str, ...]) -> None:
    """Regenerate the tokenizer goldens for MODELs (default: every bundled model)."""
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for model in models or BUNDLED:
        data = golden(model)
        path = GOLDEN_DIR / f"tokenize_{model}.json"
        write(data, path)
        click.echo(f"{path}: {len(data['cases'])} cases, llama-cpp-python {data['llama_cpp_python']}")


if __name__ == "__main__":
    main()
