"""Where two engines part ways: tensor-by-tensor comparison of two traces, two logits files, or a trace
and a `llama-eval-callback` log, naming the first tensor in forward order that differs.

Per tensor (B is the reference):
    nmse      sum((a - b)^2) / sum(b^2), as llama.cpp's model-conversion check-nmse.py; below 1e-6
              it calls two tensors "essentially identical"
    max_diff  the largest |a - b| and where: (position, index within the position, flattened)
    cosine    sum(a b) / sqrt(sum(a^2) sum(b^2))
    rel_diff  1 - 2 sum(a b) / sum(a^2 + b^2), as SGLang's comparator
For logits (result_output, or two .npy files), also per position: KL(softmax(b) || softmax(a)) and
whether both pick the same most likely token (vLLM's check_logprobs_close asks the same).

A llama-eval-callback log prints, per graph node, its shape and the sum of its values; each named
node's last print (llama.cpp names a tensor again after each reshape and rope) is compared with the
sum of ours over the positions it covers: llama.cpp keeps only the output rows in the last layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from refengine.errors import RefengineError
from refengine.trace import Trace, TraceError

DEFAULT_NMSE = 1e-6  # check-nmse.py's "essentially identical"
DEFAULT_SUM_REL = 1e-3  # a printed sum, relative (see sum_rel_diff)
LOGITS = "result_output"
# Our name -> llama.cpp's names for the same values, the first the log has being used: gemma3 scales the
# embeddings (inp_scaled) and this llama.cpp names the plain ones embd.
LLAMA_NAMES = {"inp_embd": ("inp_scaled", "inp_embd", "embd")}


def llama_candidates(name: str, theirs) -> tuple[str, ...]:
    """llama.cpp's names that may hold the values of our `name`, most specific first."""
    stem, sep, layer = name.rpartition("-")
    if not layer.isdigit():
        stem, sep, layer = name, "", ""
    return tuple(f"{n}{sep}{layer}" for n in LLAMA_NAMES.get(stem, (stem,)))


class CompareError(RefengineError):
    """Inputs that cannot be compared: unknown kinds, shapes that differ, nothing in common."""


@dataclass
class TensorDiff:
    name: str
    shape: list[int]
    nmse: float
    max_diff: float
    max_at: tuple[int, int]  # (position, flat index within the position)
    cosine: float
    rel_diff: float
    kl_mean: float | None = None  # logits only
    kl_max: float | None = None
    top1: float | None = None  # share of positions with the same argmax

    def diverges(self, threshold: float) -> bool:
        return not self.nmse <= threshold  # NaN diverges


@dataclass
class SumDiff:
    """One tensor against a llama-eval-callback print: the sums only."""

    name: str
    n_positions: int  # positions llama.cpp printed (the last ones of ours)
    ours: float
    theirs: float
    rel: float

    def diverges(self, threshold: float) -> bool:
        return not self.rel <= threshold


@dataclass
class Comparison:
    kind: str  # "trace", "logits" or "eval-callback"
    threshold: float
    diffs: list = field(default_factory=list)  # TensorDiff or SumDiff, in forward order
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def first_divergence(self):
        return next((d for d in self.diffs if d.diverges(self.threshold)), None)

    def verdict(self) -> str:
        """The one line: where the two part ways, or that they do not."""
        d = self.first_divergence
        measure = "NMSE" if self.kind != "eval-callback" else "sum rel. diff"
        if d is None:
            return f"no divergence: all {len(self.diffs)} tensors within {measure} {self.threshold:g}"
        value = d.nmse if isinstance(d, TensorDiff) else d.rel
        return f"first divergence: {d.name} ({measure} {value:.3g} > {self.threshold:g})"

    def as_dict(self) -> dict:
        first = self.first_divergence
        return {
            "kind": self.kind,
            "threshold": self.threshold,
            "first_divergence": None if first is None else first.name,
            "verdict": self.verdict(),
            "tensors": [asdict(d) for d in self.diffs],
            "only_a": self.only_a,
            "only_b": self.only_b,
        }

    def render(self) -> str:
        lines = [self.verdict()]
        if self.kind == "eval-callback":
            lines.append(f"{'tensor':24} {'pos':>4} {'ours':>16} {'llama.cpp':>16} {'rel diff':>10}")
            lines += [
                f"{d.name:24} {d.n_positions:4d} {d.ours:16.6f} {d.theirs:16.6f} {d.rel:10.2e}" for d in self.diffs
            ]
        else:
            lines.append(f"{'tensor':24} {'NMSE':>10} {'max |diff|':>11} {'at (pos, i)':>14} {'cosine':>10}  logits")
            for d in self.diffs:
                extra = "" if d.kl_mean is None else f"  KL {d.kl_mean:.3g} (max {d.kl_max:.3g}), top-1 {d.top1:.1%}"
                at = f"({d.max_at[0]}, {d.max_at[1]})"
                lines.append(f"{d.name:24} {d.nmse:10.3e} {d.max_diff:11.4g} {at:>14} {d.cosine:10.7f}{extra}")
        if self.only_a:
            lines.append(f"only in A: {', '.join(self.only_a)}")
        if self.only_b:
            lines.append(f"only in B: {', '.join(self.only_b)}")
        return "\n".join(lines)


# -- metrics --------------------------------------------------------------------------------------


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def tensor_diff(name: str, a: np.ndarray, b: np.ndarray) -> TensorDiff:
    """a against the reference b, both (n_positions, ...)."""
    if a.shape != b.shape:
        raise CompareError(f"{name}: shapes differ, {a.shape} and {b.shape}")
    a64 = np.asarray(a, dtype=np.float64).reshape(max(a.shape[0], 1) if a.ndim else 1, -1)  # (n_pos, per position)
    b64 = np.asarray(b, dtype=np.float64).reshape(a64.shape)
    diff = a64 - b64
    ref_energy = float(np.sum(b64 * b64))
    err_energy = float(np.sum(diff * diff))
    nmse = err_energy / ref_energy if ref_energy else (0.0 if err_energy == 0 else math.inf)
    flat = int(np.argmax(np.abs(diff))) if diff.size else 0
    at = divmod(flat, a64.shape[1]) if diff.size else (0, 0)
    aa, bb, ab = float(np.sum(a64 * a64)), ref_energy, float(np.sum(a64 * b64))
    cosine = ab / math.sqrt(aa * bb) if aa and bb else float(aa == bb)
    rel_diff = 1 - 2 * ab / (aa + bb) if aa + bb else 0.0
    result = TensorDiff(
        name, list(a.shape), nmse, float(np.abs(diff).max()) if diff.size else 0.0, at, cosine, rel_diff
    )
    if name == LOGITS and a.ndim == 2:
        kl = logits_kl(a, b)
        result.kl_mean, result.kl_max = float(kl.mean()), float(kl.max())
        result.top1 = float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))
    return result


def logits_kl(a: np.ndarray, b: np.ndarray, rows: int = 16) -> np.ndarray:
    """KL(softmax(b) || softmax(a)) per position, a few rows at a time: (n_pos,) nats."""
    kl = np.empty(len(a))
    for i in range(0, len(a), rows):
        lp, lq = log_softmax(b[i : i + rows]), log_softmax(a[i : i + rows])
        kl[i : i + rows] = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return kl


def sum_rel_diff(ours: np.ndarray, theirs_sum: float) -> tuple[float, float]:
    """(our sum, |our sum - theirs| / max(|theirs|, ||ours||_2)). A sum that cancels to near zero is
    measured against the tensor's L2 norm, the scale of the rounding a sum of n float32 values carries."""
    x = np.asarray(ours, dtype=np.float64)
    ours_sum = float(x.sum())
    scale = max(abs(theirs_sum), float(np.sqrt(np.sum(x * x))))
    return ours_sum, abs(ours_sum - theirs_sum) / scale if scale else float(ours_sum != theirs_sum)


# -- inputs ---------------------------------------------------------------------------------------


@dataclass
class CallbackTensor:
    """One named node of a llama-eval-callback log, as last printed."""

    name: str
    op: str
    ne: tuple[int, ...]  # ggml's order: innermost first
    sum: float

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)


HEADER_LINE = re.compile(r"^\w+:\s+(?P<name>.+?) = \((?P<type>\w+)\)\s+(?P<op>\w+)\(.*\) = \{(?P<ne>[\d, ]+)\}\s*$")
SUM_LINE = re.compile(r"^\s*sum\s*=\s*(?P<sum>[-+\w.]+)\s*$")
PLAIN_NAME = re.compile(r"^[A-Za-z_][\w.]*(-\d+)?$")  # not "Kcur-0 (view)", "node_12" is kept but never ours


def parse_eval_callback(text: str) -> dict[str, CallbackTensor]:
    """Named nodes of a llama-eval-callback log (its stdout), each by its last print, in first-seen order."""
    found: dict[str, CallbackTensor] = {}
    current = None
    for line in text.splitlines():
        header = HEADER_LINE.match(line)
        if header:
            name = header["name"].strip()
            ne = tuple(int(v) for v in header["ne"].split(","))
            current = (name, header["op"], ne) if PLAIN_NAME.match(name) else None
            continue
        total = SUM_LINE.match(line)
        if total and current is not None:
            name, op, ne = current
            found[name] = CallbackTensor(name, op, ne, float(total["sum"]))
            current = None
    return found


def load_input(path: str | Path) -> tuple[str, object]:
    """('trace', Trace) | ('logits', ndarray) | ('eval-callback', {name: CallbackTensor}), by content."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise CompareError(f"{path}: {e.strerror}") from None
    if head.startswith(b"\x93NUMPY"):
        try:
            return "logits", np.load(path, allow_pickle=False)
        except ValueError as e:
            raise CompareError(f"{path}: cannot read the .npy ({e})") from None
    if head.startswith(b"PK"):
        return "trace", Trace.load(path)
    text = path.read_text(errors="replace")
    nodes = parse_eval_callback(text)
    if not nodes:
        raise CompareError(f"{path}: not a trace (.npz), logits (.npy) or llama-eval-callback log")
    return "eval-callback", nodes


# -- comparisons ----------------------------------------------------------------------------------


def compare_traces(a: Trace, b: Trace, threshold: float = DEFAULT_NMSE) -> Comparison:
    result = Comparison("trace", threshold)
    if len(a.tokens) != len(b.tokens) or (a.tokens != b.tokens).any():
        raise CompareError("the two traces ran different tokens; trace the same ids on both sides")
    for name in a:
        if name in b:
            result.diffs.append(tensor_diff(name, a[name], b[name]))
        else:
            result.only_a.append(name)
    result.only_b = [n for n in b if n not in a]
    if not result.diffs:
        raise CompareError("the two traces have no tensor name in common")
    return result


def compare_logits(a: np.ndarray, b: np.ndarray, threshold: float = DEFAULT_NMSE) -> Comparison:
    if a.ndim != 2:
        raise CompareError(f"logits must be (n_positions, n_vocab), got shape {a.shape}")
    return Comparison("logits", threshold, [tensor_diff(LOGITS, a, b)])


def compare_eval_callback(ours: Trace, theirs: dict[str, CallbackTensor], threshold: float = DEFAULT_SUM_REL):
    """Our trace against llama-eval-callback's sums, for every tensor both have (names as llama_candidates)."""
    result = Comparison("eval-callback", threshold)
    matched = set()
    for name in ours:
        match = next((n for n in llama_candidates(name, theirs) if n in theirs), None)
        if match is None:
            result.only_a.append(name)
            continue
        node, x = theirs[match], ours[name]
        per_position = math.prod(x.shape[1:])
        n_pos, rest = divmod(node.n_elements, per_position) if per_position else (0, 1)
        if rest or not 0 < n_pos <= x.shape[0]:
            raise CompareError(f"{name}: llama.cpp's {node.ne} does not cover whole positions of ours {x.shape}")
        ours_sum, rel = sum_rel_diff(x[-n_pos:], node.sum)
        result.diffs.append(SumDiff(name, n_pos, ours_sum, node.sum, rel))
        matched.add(match)
    result.only_b = [n for n in theirs if n not in matched and not n.startswith("node_")]
    if not result.diffs:
        raise CompareError("the trace and the log have no tensor name in common")
    return result


def compare_files(path_a: str | Path, path_b: str | Path, threshold: float | None = None) -> Comparison:
    """A against the reference B: any two of trace / logits, or a trace and an eval-callback log."""
    (kind_a, a), (kind_b, b) = load_input(path_a), load_input(path_b)
    kinds = {kind_a, kind_b}
    if kinds == {"trace"}:
        return compare_traces(a, b, threshold or DEFAULT_NMSE)
    if kinds <= {"trace", "logits"}:
        a = a[LOGITS] if kind_a == "trace" else a
        b = b[LOGITS] if kind_b == "trace" else b
        return compare_logits(np.asarray(a), np.asarray(b), threshold or DEFAULT_NMSE)
    if kinds == {"trace", "eval-callback"}:
        trace, log = (a, b) if kind_a == "trace" else (b, a)
        return compare_eval_callback(trace, log, threshold or DEFAULT_SUM_REL)
    raise CompareError(f"cannot compare {kind_a} with {kind_b}: a log is compared with a trace")


__all__ = [
    "Comparison",
    "CompareError",
    "TraceError",
    "compare_eval_callback",
    "compare_files",
    "compare_logits",
    "compare_traces",
    "parse_eval_callback",
    "tensor_diff",
]
