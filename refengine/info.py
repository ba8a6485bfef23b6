"""What `refengine info` reports about a model, gathered from its header alone."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from gguf import Keys, LlamaFileType

from refengine.errors import printable
from refengine.gguf import GGUFFile
from refengine.tokenizer import describe_value

TOKENIZER_KINDS = {
    "llama": "SentencePiece",
    "gpt2": "byte-level BPE",
    "bert": "WordPiece",
    "t5": "Unigram",
    "rwkv": "RWKV",
    "none": "none",
}


def file_type_name(value: Any) -> str | None:
    """general.file_type as llama.cpp names it: 15 -> "Q4_K_M"."""
    if not isinstance(value, int):
        return None
    try:
        name = LlamaFileType(value).name
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


# The keys `info` shows, with the Python type each must have; a value of another type is reported
# as a problem (info describes broken files too) and shown as missing.
EXPECTED = {str: "a string", int: "an integer", list: "an array of strings"}


def summarize(model: GGUFFile, with_tensors: bool = False) -> dict[str, Any]:
    """Everything `info` prints, as plain JSON-ready values."""
    problems: list[str] = []

    def value(key: str, kind: type) -> Any:
        found = model.get(key)
        if found is None or (isinstance(found, kind) and not isinstance(found, bool)):
            return found
        problems.append(f"{key} is {describe_value(found)}, expected {EXPECTED[kind]}")
        return None

    arch = value(Keys.General.ARCHITECTURE, str)
    tokens = value(Keys.Tokenizer.LIST, list)
    tokenizer_model = value(Keys.Tokenizer.MODEL, str)
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "params": 0})
    for t in model.tensors.values():
        row = by_type[t.ggml_type.name]
        row["tensors"] += 1
        row["bytes"] += t.nbytes
        row["params"] += t.n_elements
    summary: dict[str, Any] = {
        "path": str(model.path),
        "splits": [str(p) for p in model.splits],
        "gguf_version": model.version,
        "architecture": arch,
        "name": value(Keys.General.NAME, str),
        "parameters": model.n_params,
        "file_type": file_type_name(value(Keys.General.FILE_TYPE, int)),
        "file_size": model.file_size,
        "context_length": value(f"{arch}.context_length", int) if arch else None,
        "n_tensors": len(model.tensors),
        "types": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "tokenizer": {
            "model": tokenizer_model,
            "kind": TOKENIZER_KINDS.get(tokenizer_model, "unknown") if tokenizer_model else None,
            "pre": value(Keys.Tokenizer.PRE, str),
            "vocab_size": len(tokens) if tokens is not None else None,
            "n_merges": len(value(Keys.Tokenizer.MERGES, list) or ()),
        },
        "chat_template": value(Keys.Tokenizer.CHAT_TEMPLATE, str) is not None,
    }
    summary["problems"] = problems
    if with_tensors:
        summary["tensors"] = [
            {
                "name": t.name,
                "type": t.ggml_type.name,
                "shape": list(t.shape),
                "bytes": t.nbytes,
                "offset": t.offset,
                "file": str(t.path),
            }
            for t in model.tensors.values()
        ]
    return summary


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def render(summary: dict[str, Any]) -> str:
    """The human-readable form of `summarize`."""
    tok = summary["tokenizer"]
    tokenizer = "none"
    if tok["model"]:
        tokenizer = f"{tok['model']} ({tok['kind']}), {tok['vocab_size']} tokens"
        if tok["pre"]:
            tokenizer += f", pre-tokenizer {tok['pre']!r}"
        if tok["n_merges"]:
            tokenizer += f", {tok['n_merges']} merges"
    rows = [
        ("model", summary["path"]),
        ("architecture", summary["architecture"] or "(missing general.architecture)"),
        ("name", summary["name"] or "-"),
        ("parameters", f"{format_count(summary['parameters'])} ({summary['parameters']:,})"),
        ("file type", summary["file_type"] or "-"),
        ("file size", f"{format_bytes(summary['file_size'])} ({summary['file_size']:,} bytes)"),
        ("context", summary["context_length"] or "-"),
        ("gguf version", summary["gguf_version"]),
        ("tensors", summary["n_tensors"]),
        ("tokenizer", tokenizer),
        ("chat template", "yes" if summary["chat_template"] else "no"),
    ]
    if len(summary["splits"]) > 1:
        rows.insert(1, ("splits", len(summary["splits"])))
    rows += [("problem", problem) for problem in summary.get("problems", ())]
    lines = [f"{k:<14}{printable(str(v))}" for k, v in rows]
    lines += ["", f"{'type':<10}{'tensors':>8}{'params':>14}{'bytes':>14}"]
    for name, row in summary["types"].items():
        lines.append(f"{name:<10}{row['tensors']:>8}{format_count(row['params']):>14}{format_bytes(row['bytes']):>14}")
    if "tensors" in summary:
        width = max((len(t["name"]) for t in summary["tensors"]), default=4)
        lines += ["", f"{'name':<{width}}  {'type':<8}{'shape':<24}{'bytes':>12}{'offset':>14}"]
        for t in summary["tensors"]:
            shape = " x ".join(map(str, t["shape"]))
            name = printable(t["name"])
            lines.append(f"{name:<{width}}  {t['type']:<8}{shape:<24}{t['bytes']:>12}{t['offset']:>14}")
    return "\n".join(lines)
