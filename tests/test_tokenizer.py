"""The tokenizer against llama.cpp: committed goldens, stream decoding, the CLI, and a live oracle.

The goldens (tests/golden/tokenize_<model>.json) come from scripts/make_golden.py,
which ran llama-cpp-python once. The `oracle` tests run llama-cpp-python itself
when it is importable, on the same corpus, on generated strings, and on copies of
the models' vocabularies with other pre-tokenizers and flags.
"""

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refengine.cli import EXIT_ERROR, main
from refengine.errors import RefengineError
from refengine.gguf import open_gguf
from refengine.tokenizer import StreamDecoder, Tokenizer, Vocab

GOLDEN_DIR = Path(__file__).parent / "golden"
MODELS = ["gemma3-270m", "smollm2-135m"]
PATH_FIXTURES = {"gemma3-270m": "gemma_path", "smollm2-135m": "smollm_path"}  # from conftest.py


def utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@cache
def golden(model: str) -> dict:
    return json.loads((GOLDEN_DIR / f"tokenize_{model}.json").read_text())


@pytest.fixture(scope="session")
def tokenizers(request) -> dict[str, Tokenizer]:
    return {
        name: Tokenizer.from_gguf(open_gguf(request.getfixturevalue(fixture)))
        for name, fixture in PATH_FIXTURES.items()
    }


def encode_like_llama(tokenizer: Tokenizer, text: str | bytes, add_special: bool, parse_special: bool) -> list[int]:
    """llama_tokenize's add_special is "BOS and EOS as the model says", or neither."""
    default = None if add_special else False
    return tokenizer.encode(text, add_bos=default, add_eos=default, parse_special=parse_special)


def describe(case: dict) -> str:
    return f"{case['text'][:40]!r} add_special={case['add_special']} parse_special={case['parse_special']}"


# -- goldens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_ids_equal_llama_cpp_goldens(tokenizers, model):
    tokenizer = tokenizers[model]
    wrong = []
    for case in golden(model)["cases"]:
        ids = encode_like_llama(tokenizer, case["text"], case["add_special"], case["parse_special"])
        if ids != case["ids"]:
            wrong.append(f"{describe(case)}: got {ids}, llama.cpp {case['ids']}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("model", MODELS)
def test_decode_equals_llama_detokenize(tokenizers, model):
    tokenizer = tokenizers[model]
    wrong = [
        describe(case)
        for case in golden(model)["cases"]
        if tokenizer.decode_bytes(case["ids"], special=case["parse_special"]) != utf8(case["decoded"])
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_where_llama_cpp_round_trips(tokenizers, model):
    tokenizer = tokenizers[model]
    cases = [c for c in golden(model)["cases"] if c["decoded"] == c["text"] and c["text"].isprintable()]
    assert len(cases) > 50  # most of the corpus round-trips; a golden that stopped doing so is suspect
    for case in cases:
        ids = encode_like_llama(tokenizer, case["text"], case["add_special"], case["parse_special"])
        assert tokenizer.decode(ids, special=case["parse_special"]) == case["text"], describe(case)


@pytest.mark.parametrize("model", MODELS)
def test_special_ids_equal_llama_cpp(tokenizers, model):
    tokenizer, expected = tokenizers[model], golden(model)["special"]
    assert tokenizer.vocab_size == expected["vocab_size"]
    assert tokenizer.bos_id == expected["bos"] and tokenizer.eos_id == expected["eos"]
    assert tokenizer.eot_id == expected["eot"]
    assert sorted(tokenizer.eog_ids) == expected["eog"]
    assert (tokenizer.vocab.add_bos, tokenizer.vocab.add_eos) == (expected["add_bos"], expected["add_eos"])


def test_golden_corpus_covers_every_kind_of_text():
    """Every special-token flag pair, empty text, edge spaces, code, CJK, emoji sequences, runs of tabs and
    newlines, digits, chat markers, combining marks, right-to-left text and a lone surrogate."""
    texts = [c["text"] for c in golden("gemma3-270m")["cases"]]
    flags = {(c["add_special"], c["parse_special"]) for c in golden("gemma3-270m")["cases"]}
    assert flags == {(True, True), (True, False), (False, True), (False, False)}
    assert "" in texts and any(t.startswith(" ") for t in texts) and any(t.endswith(" ") for t in texts)
    for needle in (
        "def ",
        "我爱",
        "こんにちは",
        "👨\u200d👩",
        "\t\t",
        "\n\n",
        "1234567890",
        "<start_of_turn>user\nhi",
        "<|im_start|>",
        "\u0301",
        "שלום",
        "\udcff",
    ):
        assert any(needle in t for t in texts), needle


# -- behaviour, on the real models ---------------------------------------------------------------


def test_special_token_text_is_one_token_only_when_asked(tokenizers):
    gemma = tokenizers["gemma3-270m"]
    text = "<start_of_turn>user\nhi<end_of_turn>"
    assert gemma.encode(text, add_bos=False, parse_special=True) == [105, 2364, 107, 2202, 106]
    plain = gemma.encode(text, add_bos=False)
    assert 105 not in plain and 106 not in plain and gemma.decode(plain) == text
    smollm = tokenizers["smollm2-135m"]
    assert smollm.encode("<|im_start|>", parse_special=True) == [1]
    assert len(smollm.encode("<|im_start|>")) > 1


def test_bos_follows_the_model_unless_overridden(tokenizers):
    gemma, smollm = tokenizers["gemma3-270m"], tokenizers["smollm2-135m"]
    assert gemma.encode("hi")[0] == gemma.bos_id == 2  # tokenizer.ggml.add_bos_token is true
    assert gemma.encode("hi", add_bos=False)[0] != 2
    assert smollm.encode("hi") == smollm.encode("hi", add_bos=False)  # add_bos_token is false
    assert smollm.encode("hi", add_bos=True) == [smollm.bos_id, *smollm.encode("hi")]
    assert gemma.encode("hi", add_eos=True)[-1] == gemma.eos_id


def test_byte_fallback_spells_unknown_bytes(tokenizers):
    gemma = tokenizers["gemma3-270m"]
    ids = gemma.encode(b"\xff", add_bos=False)
    assert [gemma.token_to_piece(i) for i in ids] == [b"\xff"]


def test_token_to_piece(tokenizers):
    gemma = tokenizers["gemma3-270m"]
    assert gemma.token_to_piece(1902) == b" world"  # "▁world"
    assert gemma.token_to_piece(105) == b"<start_of_turn>"
    assert gemma.token_to_piece(105, special=False) == b""
    with pytest.raises(RefengineError, match="outside the vocabulary"):
        gemma.token_to_piece(gemma.vocab_size)


@pytest.mark.parametrize("model", MODELS)
def test_stream_decoder_holds_back_split_characters(tokenizers, model):
    tokenizer = tokenizers[model]
    text = "a 👋 b 🫨 c 漢字"
    ids = tokenizer.encode(text, add_bos=False)
    stream = tokenizer.stream()
    outputs = [stream.feed(i) for i in ids]
    assert "".join(outputs) + stream.flush() == tokenizer.decode(ids) == text
    assert all("\ufffd" not in out for out in outputs)


def test_stream_decoder_on_byte_tokens(tokenizers):
    gemma = tokenizers["gemma3-270m"]
    byte_ids = [gemma.model.byte_ids[b] for b in "👋".encode()]  # <0xF0> <0x9F> <0x91> <0x8B>
    stream = StreamDecoder(gemma)
    assert [stream.feed(i) for i in byte_ids] == ["", "", "", "👋"]
    stream.feed(byte_ids[0])
    assert stream.flush() == "\ufffd"  # an unfinished character is not silently dropped


@pytest.mark.slow
def test_encoding_speed(tokenizers):
    import time

    words = " ".join(f"word{i}x{i * 7919 % 1000}" for i in range(3000))
    start = time.perf_counter()
    ids = tokenizers["gemma3-270m"].encode(words)
    assert len(ids) / (time.perf_counter() - start) > 3000  # tokens per second; we measure ~100k


# -- errors ---------------------------------------------------------------------------------------


def small_spm_metadata(**overrides) -> dict:
    texts = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "a", "b", "▁a", "ab"]
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": texts,
        "tokenizer.ggml.scores": np.array([0.0] * 259 + [-1.0, -2.0, -2.0, -0.5, -0.1], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([2, 3, 3] + [6] * 256 + [1] * 5, dtype=np.int32),
    }
    metadata.update(overrides)
    return metadata


def test_small_spm_vocabulary():
    """The SentencePiece defaults a GGUF can leave out (BOS 1, EOS 2, a space prefix, BOS added),
    highest-score-first merging ("ab" at -0.1 beats "▁a" at -0.5) and byte fallback for "é"."""
    tokenizer = Tokenizer(Vocab.from_metadata(small_spm_metadata()))
    ids = tokenizer.encode("ab a\u00e9")
    assert ids[0] == 1 and tokenizer.eos_id == 2
    assert [tokenizer.token_to_piece(i) for i in ids[1:]] == [b" ", b"ab", b" a", b"\xc3", b"\xa9"]
    assert tokenizer.decode(ids[1:]) == "ab a\u00e9"  # the prefixed space is dropped again...
    assert tokenizer.decode(ids) == " ab a\u00e9"  # ...but, as in llama_detokenize, not after a BOS


def test_unknown_tokenizer_model_names_key_and_value():
    with pytest.raises(RefengineError, match=r"tokenizer\.ggml\.model 'rwkv'"):
        Vocab.from_metadata(small_spm_metadata(**{"tokenizer.ggml.model": "rwkv"}))


def test_unknown_pre_tokenizer_names_key_and_value():
    metadata = small_spm_metadata(
        **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "klingon", "tokenizer.ggml.merges": []}
    )
    with pytest.raises(RefengineError, match=r"tokenizer\.ggml\.pre 'klingon'"):
        Vocab.from_metadata(metadata)


def test_missing_vocabulary_is_an_error():
    with pytest.raises(RefengineError, match=r"tokenizer\.ggml\.tokens"):
        Vocab.from_metadata({"tokenizer.ggml.model": "llama"})


# -- CLI ------------------------------------------------------------------------------------------


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_tokenize_default_model(capsys, gemma_path):
    code, out, _ = run(capsys, "tokenize", "Hello world")
    assert (code, out) == (0, "2 9259 1902\n")


def test_cli_tokenize_flags(capsys, gemma_path):
    code, out, _ = run(capsys, "tokenize", "--no-bos", "--parse-special", "--json", "<start_of_turn>user\nhi")
    assert code == 0 and json.loads(out) == {"tokens": [105, 2364, 107, 2202]}


def test_cli_tokenize_smollm(capsys, smollm_path):
    code, out, _ = run(capsys, "tokenize", "-m", "smollm2-135m", "Hello world")
    assert (code, out) == (0, "19556 905\n")


def test_cli_tokenize_unknown_model_is_one_line(capsys):
    code, _, err = run(capsys, "tokenize", "-m", "no-such-model", "x")
    assert code == EXIT_ERROR and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "no-such-model" in err


# -- live oracle: llama-cpp-python ---------------------------------------------------------------


@pytest.fixture(scope="session")
def llama():
    """llama-cpp-python's Llama for a path, vocabulary only, loaded once and closed at the end."""
    llama_cpp = pytest.importorskip("llama_cpp")
    loaded = {}

    def load(path) -> "llama_cpp.Llama":
        if str(path) not in loaded:
            loaded[str(path)] = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        return loaded[str(path)]

    yield load
    for llm in loaded.values():
        llm.close()


def llama_detokenize(llm, ids: list[int], special: bool) -> bytes:
    """The C llama_detokenize (llama-cpp-python's Llama.detokenize skips its space clean-up)."""
    import ctypes

    import llama_cpp

    tokens = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 64 + 256 * len(ids)
    buf = ctypes.create_string_buffer(size)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, size, False, special)
    assert n >= 0
    return buf.raw[:n]


def assert_same_as_llama(llm, tokenizer: Tokenizer, text: str | bytes) -> None:
    data = text if isinstance(text, bytes) else utf8(text)
    for add_special in (True, False):
        for parse_special in (False, True):
            expected = llm.tokenize(data, add_bos=add_special, special=parse_special)
            got = encode_like_llama(tokenizer, data, add_special, parse_special)
            assert got == expected, f"{data!r} add_special={add_special} parse_special={parse_special}"
            decoded = llama_detokenize(llm, got, parse_special)
            assert tokenizer.decode_bytes(got, parse_special) == decoded, data


@pytest.mark.oracle
@pytest.mark.parametrize("model", MODELS)
def test_oracle_corpus(tokenizers, llama, model, request):
    llm = llama(request.getfixturevalue(PATH_FIXTURES[model]))
    for text in dict.fromkeys(c["text"] for c in golden(model)["cases"]):
        assert_same_as_llama(llm, tokenizers[model], text)


# Text that stresses the pre-tokenizers: letters of several scripts, digits, marks,
# apostrophes, whitespace of every kind, special-token fragments, emoji.
ALPHABET = st.sampled_from(
    list("aZé漢かカ한ß0٣½'sStT.,!?$~|<>_-/ \t\n\r")
    + [
        "\u00a0",
        "\u2028",
        "\u0085",
        "\x1c",
        "\u0301",
        "\u200d",
        "👋",
        "🫨",
        "▁",
        "<start_of_turn>",
        "<|im_end|>",
        "\n\n",
    ]
)
ORACLE_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.oracle
@pytest.mark.parametrize("model", MODELS)
@ORACLE_SETTINGS
@given(text=st.lists(ALPHABET, max_size=40).map("".join))
def test_oracle_generated_text(tokenizers, llama, model, request, text):
    assert_same_as_llama(llama(request.getfixturevalue(PATH_FIXTURES[model])), tokenizers[model], text)


@pytest.mark.oracle
@pytest.mark.parametrize("model", MODELS)
@ORACLE_SETTINGS
@given(data=st.binary(max_size=24).filter(lambda b: not any(0xF4 <= x <= 0xF7 for x in b)))
def test_oracle_generated_bytes(tokenizers, llama, model, request, data):
    # Lead bytes F4-F7 can decode past U+10FFFF, which makes llama.cpp abort the process.
    assert_same_as_llama(llama(request.getfixturevalue(PATH_FIXTURES[model])), tokenizers[model], data)


def write_variant(source: Path, target: Path, overrides: dict, drop: tuple[str, ...] = ()) -> Path:
    """A vocabulary-only copy of `source` with some tokenizer keys changed or removed."""
    from gguf import GGUFValueType, GGUFWriter

    model = open_gguf(source)
    writer = GGUFWriter(target, model.architecture)
    for key, value in model.metadata.items():
        if key == "general.architecture" or key in drop or key in overrides:
            continue
        if model.value_types[key] == GGUFValueType.ARRAY:
            writer.add_array(key, value if isinstance(value, list) else value.tolist())
        else:
            writer.add_key_value(key, value, model.value_types[key])
    for key, value in overrides.items():
        value_type = GGUFValueType.STRING if isinstance(value, str) else GGUFValueType.BOOL
        writer.add_key_value(key, value, value_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return target


@pytest.mark.oracle
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "deepseek-v3", "default", "gpt-2"])
def test_oracle_other_pre_tokenizers(llama, smollm_path, tmp_path, pre):
    """SmolLM2's vocabulary under the other pre-tokenizers we support (and their BOS and clean-up rules)."""
    path = write_variant(
        smollm_path, tmp_path / f"{pre}.gguf", {"tokenizer.ggml.pre": pre}, drop=("tokenizer.ggml.add_bos_token",)
    )
    llm, tokenizer = llama(path), Tokenizer.from_gguf(open_gguf(path))
    texts = [c["text"] for c in golden("smollm2-135m")["cases"]]
    texts += ["I'M YOU'RE he'll we've", "hello ' world", "x 's y 'm z 're", "12345678 1.5", "a\r\n\r\nb  ", "!/~|:"]
    for text in dict.fromkeys(texts):
        assert_same_as_llama(llm, tokenizer, text)


@pytest.mark.oracle
def test_oracle_spm_space_prefix(llama, gemma_path, tmp_path):
    """Gemma's vocabulary with SentencePiece's default space prefix, which gemma itself turns off."""
    path = write_variant(gemma_path, tmp_path / "prefix.gguf", {"tokenizer.ggml.add_space_prefix": True})
    llm, tokenizer = llama(path), Tokenizer.from_gguf(open_gguf(path))
    assert tokenizer.vocab.add_space_prefix
    for text in dict.fromkeys(c["text"] for c in golden("gemma3-270m")["cases"]):
        assert_same_as_llama(llm, tokenizer, text)
