"""`refengine quantize`: a float GGUF model to one of llama.cpp's quantization mixes (Q4_K_M, ...).

Two halves, both following llama.cpp's src/llama-quant.cpp (llama_model_quantize):

1. Which type each tensor gets. A mix names a default type (Q4_K for Q4_K_M);
   llama_tensor_get_type then moves some tensors up (output.weight to Q6_K,
   every few layers' attn_v and ffn_down to Q6_K in Q4_K_M, ...), keeps 1-D
   tensors, norms and a list of small tensors as they are, and falls back to a
   32-element type (Q4_K -> Q5_0, ...) for rows that are not whole 256-element
   blocks. Some rules count tensors as they come, so the walk goes in llama.cpp's
   order: tensors outside the blocks first, then block by block, by name within
   each. `tensor_steps` ports this without the parts our mixes never reach (IQ types,
   imatrix, user overrides, the MXFP4 mix).

2. The bytes. Tensors stream from the input's memory map to the output file a
   chunk of rows at a time (F16 and BF16 rows are widened to float32 first, as
   llama.cpp does), through kernels/quantize.py, byte-identical to ggml's
   quantizers. Memory stays at a few chunk buffers whatever the model's size.
   The output is written through refengine.files.atomic_output, so an interrupted
   run (Ctrl-C, SIGTERM, even SIGKILL) leaves nothing, and the input is never
   opened for writing.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType, Keys
from gguf import GGMLQuantizationType as T

from refengine.errors import RefengineError
from refengine.files import atomic_output
from refengine.gguf import DEFAULT_ALIGNMENT, GGUFFile, Tensor, open_gguf
from refengine.gguf_write import TensorInfo, pad, write_header
from refengine.hparams import HParams

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION, written as general.quantization_version
CHUNK_VALUES = 1 << 22  # float32 values quantized per kernel call: 16 MiB of input rows

_FLOATS = (T.F32, T.F16, T.BF16)  # what we read as input for tensors that change type


class QuantizeError(RefengineError):
    """An input that cannot be quantized as asked, or an output we refuse to write."""


@dataclass(frozen=True)
class Mix:
    """A quantization mix, as llama.cpp's llama_ftype."""

    name: str
    ftype: int  # LLAMA_FTYPE_MOSTLY_*, written as general.file_type
    default_type: T  # llama_ftype_get_default_type: what a tensor gets unless a rule says otherwise


MIXES = {
    m.name: m
    for m in (
        Mix("Q4_0", 2, T.Q4_0),
        Mix("Q4_1", 3, T.Q4_1),
        Mix("Q8_0", 7, T.Q8_0),
        Mix("Q5_0", 8, T.Q5_0),
        Mix("Q5_1", 9, T.Q5_1),
        Mix("Q2_K", 10, T.Q2_K),
        Mix("Q3_K_S", 11, T.Q3_K),
        Mix("Q3_K_M", 12, T.Q3_K),
        Mix("Q3_K_L", 13, T.Q3_K),
        Mix("Q4_K_S", 14, T.Q4_K),
        Mix("Q4_K_M", 15, T.Q4_K),
        Mix("Q5_K_S", 16, T.Q5_K),
        Mix("Q5_K_M", 17, T.Q5_K),
        Mix("Q6_K", 18, T.Q6_K),
    )
}


@dataclass(frozen=True)
class ModelFacts:
    """The hyperparameters llama.cpp's type rules read (llama_hparams, llama_model::type)."""

    arch: str
    n_layer: int  # {arch}.block_count
    n_expert: int  # {arch}.expert_count, 0 for a dense model
    n_head: int  # {arch}.attention.head_count, of layer 0
    n_head_kv: int  # {arch}.attention.head_count_kv, of layer 0 (head_count if absent)

    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile) -> ModelFacts:
        hp = HParams(gguf_file, QuantizeError)
        n_head = hp.int("attention.head_count", 0, per_layer="first")
        return cls(
            arch=hp.arch,
            n_layer=hp.int("block_count", 0, per_layer="first"),
            n_expert=hp.int("expert_count", 0, per_layer="first"),
            n_head=n_head,
            n_head_kv=hp.int("attention.head_count_kv", n_head, per_layer="first"),
        )

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B, for the architectures that have one we know of (llama, qwen2, deci)."""
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv
        return self.arch in ("qwen2", "deci") and self.n_layer == 80


# -- which type each tensor gets -------------------------------------------------------------------------

_LAYER = re.compile(r"blk\.([+-]?\d+)")  # sscanf matches without the dot after the number


def layer_of(name: str) -> int | None:
    """The N of a blk.N. tensor, read as llama.cpp's sscanf(name, "blk.%d.") does."""
    m = _LAYER.match(name)
    return int(m[1]) if m else None


def llama_order(name: str) -> tuple[int, bytes]:
    """llama.cpp's weight_name_comparer: by layer (-1 outside the blocks), then by name's bytes."""
    layer = layer_of(name)
    return (-1 if layer is None else layer, name.encode())


def category(name: str) -> str:
    """tensor_get_category: a broad role by substring, tested in llama.cpp's order."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for role in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight"):
        if role in name:
            return role.removesuffix(".weight")
    if "attn_output.weight" in name:
        return "attn_output"
    for role in ("ffn_up", "ffn_gate", "ffn_down"):
        if role in name:
            return role
    return "other"


# Substrings of names that tensor_allows_quantization keeps as they are: routers, tiny
# per-layer tensors, convolutions, RWKV's mixing weights, positional and multimodal tensors.
_KEEP = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    *(
        f"time_mix_{w}.weight"
        for w in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2", "decay_w1", "decay_w2")
    ),
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization: weights of 2 or more dimensions (ggml_n_dims, which does not count
    trailing ne of 1: a (1, n) tensor is 1-D), except norms and the _KEEP list."""
    n_dims = len(shape) - next((i for i, n in enumerate(shape) if n != 1), len(shape) - 1)
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(part in name for part in _KEEP)


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The first and last eighth of the layers, and every third one between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


# tensor_type_fallback: the type for rows that are not whole blocks of the chosen one. The k-quants
# fall back to a 32-element type; the 32-element types to F16 (what the llama.cpp in llama-cpp-python 0.3.36
# does, seen in its output: the llama-quant.cpp sources we read still refused them).
_FALLBACK = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
    **{legacy: T.F16 for legacy in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)},
}


def block_size(ggml_type: T) -> int:
    return GGML_QUANT_SIZES[ggml_type][0]


class _TypeChooser:
    """llama_tensor_get_type_impl for one model and mix. Its counters (i_attention_wv,
    i_ffn_down, ...) advance as tensors of that role are chosen for, as in quantize_state_impl,
    so `choose` must be called in llama_order."""

    def __init__(self, facts: ModelFacts, mix: Mix, names: list[str]):
        self.facts, self.mix = facts, mix
        self.n_attention_wv = sum(category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in names)
        self.tied_embeddings = "output.weight" not in names
        self.seen = Counter()  # i_attention_wv, i_ffn_down, i_ffn_gate, i_ffn_up

    def layer(self, role: str, name: str) -> tuple[int, int]:
        """(i_layer, n_layer) for an ffn tensor: its count so far, or with experts its blk number
        (Mixtral's expert tensors are not stored layer by layer)."""
        i_layer, n_layer = self.seen[role], self.facts.n_layer
        if self.facts.n_expert > 1:
            i_layer = layer_of(name)
            if i_layer is None:
                raise QuantizeError(f"tensor {name!r}: cannot tell its layer (expected a blk.N. name)")
            if not 0 <= i_layer < n_layer:
                raise QuantizeError(f"tensor {name!r}: layer {i_layer} is outside [0, {n_layer})")
        self.seen[role] += 1
        return i_layer, n_layer

    def choose(self, name: str, n_cols: int) -> T:
        facts, ftype, new = self.facts, self.mix.name, self.mix.default_type
        role = category(name)
        falcon = facts.arch == "falcon"
        if role == "output" or (self.tied_embeddings and role == "token_embd"):
            # the output projection (or the embedding standing in for it) keeps more bits
            if falcon or n_cols % block_size(new):
                new = T.Q8_0
            elif new != T.Q8_0:
                new = T.Q6_K
        elif role == "token_embd":
            pass
        elif role in ("attn_v", "attn_qkv", "attn_kv_b"):
            # category_is_attn_v: llama.cpp's later branch for attn_qkv alone is never reached
            i = self.seen["attn_v"]
            if ftype == "Q2_K":
                new = T.Q4_K if facts.n_gqa >= 4 else T.Q3_K
            elif ftype == "Q3_K_M":
                new = T.Q5_K if i < 2 else T.Q4_K
            elif ftype == "Q3_K_L":
                new = T.Q5_K
            elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, self.n_attention_wv):
                new = T.Q6_K
            elif ftype == "Q4_K_S" and i < 4:
                new = T.Q5_K
            if facts.is_70b and new in (T.Q3_K, T.Q4_K):
                new = T.Q5_K  # 8 heads share each attn_v: more bits cost little
            if facts.n_expert == 8:
                new = T.Q8_0
            self.seen["attn_v"] += 1
        elif role == "attn_k":
            if facts.n_expert == 8:
                new = T.Q8_0
        elif role == "ffn_down":
            i_layer, n_layer = self.layer(role, name)
            if ftype == "Q2_K":
                new = T.Q3_K
            elif ftype == "Q3_K_M":
                if i_layer < n_layer // 16:
                    new = T.Q5_K
                elif not falcon or use_more_bits(i_layer, n_layer):
                    new = T.Q4_K
                else:
                    new = T.Q3_K
            elif ftype == "Q3_K_L":
                new = T.Q4_K if falcon else T.Q5_K
            elif ftype == "Q4_K_M":
                if falcon:
                    new = T.Q6_K if i_layer < n_layer // 16 else T.Q5_K if use_more_bits(i_layer, n_layer) else T.Q4_K
                elif use_more_bits(i_layer, n_layer):
                    new = T.Q6_K
            elif ftype == "Q5_K_M" and use_more_bits(i_layer, n_layer):
                new = T.Q6_K
            elif ftype == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
                new = T.Q5_K
        elif role == "attn_output":
            if not falcon:
                if facts.n_expert == 8:
                    if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                        new = T.Q5_K
                else:
                    new = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(ftype, new)
            elif ftype == "Q3_K_L":
                new = T.Q4_K
        elif role in ("ffn_gate", "ffn_up"):
            self.layer(role, name)  # only the IQ3_XS mix changes these, but the count (and its checks) run
        return new


def fallback(name: str, n_cols: int, chosen: T) -> T:
    """tensor_type_fallback: when rows are not whole blocks of `chosen`, a 32-element type, else F16."""
    if n_cols % block_size(chosen) == 0:
        return chosen
    if chosen not in _FALLBACK:
        raise QuantizeError(
            f"tensor {name!r}: rows of {n_cols} are not whole {chosen.name} blocks of {block_size(chosen)}"
        )
    new = _FALLBACK[chosen]
    return new if n_cols % block_size(new) == 0 else T.F16


@dataclass(frozen=True)
class Step:
    """One tensor of the output: where it comes from and what it becomes."""

    tensor: Tensor
    new_type: T

    @property
    def converts(self) -> bool:
        return self.new_type != self.tensor.ggml_type


def tensor_steps(gguf_file: GGUFFile, mix: Mix) -> list[Step]:
    """Every tensor with its output type, in llama.cpp's order (which is also the output file's).

    Raises QuantizeError, naming the tensor, for one that would need requantizing
    (already quantized to another type) or is of a type we cannot read as floats."""
    facts = ModelFacts.from_gguf(gguf_file)
    names = sorted(gguf_file.tensors, key=llama_order)
    chooser = _TypeChooser(facts, mix, names)
    steps = []
    for name in names:
        t = gguf_file.tensors[name]
        new = t.ggml_type
        if allows_quantization(name, t.shape):
            new = fallback(name, t.n_cols, chooser.choose(name, t.n_cols))
        if new != t.ggml_type and t.ggml_type not in _FLOATS:
            raise QuantizeError(
                f"{gguf_file.path}: tensor {name!r} is {t.ggml_type.name}, and {mix.name} would make it {new.name}; "
                "requantizing is not supported (start from an F32, F16 or BF16 model)"
            )
        steps.append(Step(t, new))
    return steps


# -- writing -----------------------------------------------------------------------------------------


@dataclass
class Report:
    input: str
    output: str
    mix: str
    input_bytes: int  # tensor data read
    output_bytes: int  # the output file
    seconds: float
    types: dict[str, int] = field(default_factory=dict)  # output type -> tensor count

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "mb_per_s": round(self.mb_per_s, 1)}


def output_metadata(gguf_file: GGUFFile, mix: Mix) -> tuple[dict, dict]:
    """The input's metadata, with llama.cpp's changes: file type and quantization version set
    (moved to the end, as gguf_set_val does), split keys removed (the output is one file)."""
    split_keys = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    changed = {Keys.General.QUANTIZATION_VERSION: QUANTIZATION_VERSION, Keys.General.FILE_TYPE: mix.ftype}
    metadata = {k: v for k, v in gguf_file.metadata.items() if k not in changed and k not in split_keys}
    value_types = {k: gguf_file.value_types[k] for k in metadata}
    for key, value in changed.items():
        metadata[key], value_types[key] = value, GGUFValueType.UINT32
    return metadata, value_types


def check_output_path(output: Path, gguf_file: GGUFFile) -> None:
    if output.is_dir():
        raise QuantizeError(f"output {output} is a directory")
    if not output.parent.is_dir():
        raise QuantizeError(f"output {output}: directory {output.parent} does not exist")
    for part in gguf_file.splits:
        # samefile follows symlinks and sees hard links: any way of naming the input's inode
        if output.exists() and os.path.samefile(output, part):
            raise QuantizeError(f"output {output} is the input file {part}; refusing to overwrite it")


def quantize_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    mix_name: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Write the model at input_path as mix `mix_name` to output_path.

    on_progress(done, total) is called after each chunk with the input bytes done so far and in all."""
    if mix_name not in MIXES:
        raise QuantizeError(f"unknown mix {mix_name!r}; choose one of {', '.join(MIXES)}")
    mix = MIXES[mix_name]
    output = Path(output_path)
    start = time.perf_counter()
    with open_gguf(input_path) as gguf_file:
        check_output_path(output, gguf_file)
        steps = tensor_steps(gguf_file, mix)
        metadata, value_types = output_metadata(gguf_file, mix)
        alignment = metadata.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
        with atomic_output(output) as fh:  # Ctrl-C, or any error, leaves no half-written file behind
            infos = [TensorInfo(s.tensor.name, s.new_type, s.tensor.shape) for s in steps]
            write_header(fh, metadata, value_types, infos, alignment)
            done, total = 0, sum(s.tensor.nbytes for s in steps)
            for step in steps:
                for n_bytes in write_tensor(fh, step):
                    done += n_bytes
                    if on_progress is not None:
                        on_progress(done, total)
                pad(fh, alignment)
            output_bytes = fh.tell()
    return Report(
        input=str(input_path),
        output=str(output),
        mix=mix.name,
        input_bytes=total,
        output_bytes=output_bytes,
        seconds=time.perf_counter() - start,
        types=dict(Counter(s.new_type.name for s in steps)),
    )


def write_tensor(fh, step: Step) -> Iterator[int]:
    """Write one tensor's data a chunk of rows at a time, yielding the input bytes of each chunk.

    Rows are copied if the type stays; otherwise they are read as float32 and quantized (each
    row on its own, as ggml does, so the chunking does not change a byte)."""
    from refengine.kernels import quantize_rows  # numba loads only when quantizing

    t = step.tensor
    rows_per_chunk = max(1, min(t.n_rows, CHUNK_VALUES // max(t.n_cols, 1)))
    row_bytes_out = TensorInfo(t.name, step.new_type, (t.n_cols,)).nbytes
    if step.converts:
        x = np.empty((rows_per_chunk, t.n_cols), dtype=np.float32)  # (rows, n_cols) input rows as float32
        q = np.empty((rows_per_chunk, row_bytes_out), dtype=np.uint8)  # (rows, row_bytes) quantized rows
    for first in range(0, t.n_rows, rows_per_chunk):
        stop = min(first + rows_per_chunk, t.n_rows)
        n = stop - first
        if not step.converts:
            fh.write(t.data[first:stop])
        else:
            rows = x[:n]  # (n, n_cols) float32
            if t.ggml_type == T.F32:
                # copied rather than viewed: a read-only view of the mapping would compile every
                # kernel a second time, for read-only input
                rows[:] = t.data[first:stop].view(np.float32)
            else:
                t.dequantize(first, stop, out=rows)
            fh.write(quantize_rows(step.new_type, rows, out=q[:n]))  # (n, row_bytes)
        yield n * t.row_bytes
