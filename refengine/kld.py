"""llama.cpp's KL-divergence base files (`llama-perplexity --kl-divergence-base FILE`), written and read
exactly as tools/perplexity/perplexity.cpp does, and the statistics its `--kl-divergence` run reports.

The file:
    "_logits_"                              8 bytes
    n_ctx, n_vocab, n_chunk                 int32 each
    tokens                                  n_chunk * n_ctx int32: the text's tokens as tokenized (BOS
                                            first); each chunk's first token is replaced by BOS when run
    then per chunk, per scored position (n_ctx/2 .. n_ctx-2, n_ctx - 1 - n_ctx/2 rows), one row of
    nv = 2 * ((n_vocab + 1) / 2) + 4 uint16:
        scale, min_log_prob                 float32 each (4 uint16)
        q[n_vocab]                          log p[i] = scale * q[i] + min_log_prob; padding zeros to nv

The log-probs are quantized over a 16-nat window below the most likely token: min_logit =
max(min logit, max logit - 16), scale = (max - min_logit) / 65535, q = round((logit - min_logit) / scale),
and every logit at or below min_logit gets q = 0. A quantum is 16 / 65535 = 2.4e-4 nats, and the
KL-divergence sum skips the tokens below -16 nats, so a model measured against its own base file gives
a small positive KLD rather than 0: that is the format's precision floor (docs/oracle.md).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from refengine.errors import RefengineError

MAGIC = b"_logits_"
HEADER = np.dtype([("magic", "S8"), ("n_ctx", "<i4"), ("n_vocab", "<i4"), ("n_chunk", "<i4")])
WINDOW = 16.0  # nats of log-probability below the top one that are kept (perplexity.cpp's log_softmax)
LEVELS = 65535.0
SOFTMAX_ROWS = 16  # rows per step, to keep the (rows, n_vocab) temporaries small


class LogitsFileError(RefengineError):
    """A file that is not a llama.cpp logits file, is truncated, or does not fit the model."""


def row_width(n_vocab: int) -> int:
    """uint16 per row: the scale and min as two float32, then n_vocab values rounded up to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def rows_per_chunk(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


# -- writing --------------------------------------------------------------------------------------


def quantize_log_probs(logits: np.ndarray) -> np.ndarray:
    """Rows of the file for logits (n, n_vocab): (n, row_width) uint16, as perplexity.cpp's log_softmax,
    in float32 whatever the logits' precision (the file stores float32)."""
    n, n_vocab = logits.shape
    out = np.zeros((n, row_width(n_vocab)), dtype=np.uint16)
    for i in range(0, n, SOFTMAX_ROWS):
        x = np.asarray(logits[i : i + SOFTMAX_ROWS], dtype=np.float32)  # (rows, n_vocab)
        top = x.max(axis=-1)
        low = np.maximum(x.min(axis=-1), top - np.float32(WINDOW))
        log_sum_exp = np.log(np.exp(x - top[:, None]).sum(axis=-1, dtype=np.float64)).astype(np.float32)
        min_log_prob = (low - top) - log_sum_exp
        scale = (top - low) / np.float32(LEVELS)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(scale > 0, np.float32(1) / scale, np.float32(0))
        # nearest_int rounds half to even, as np.rint does
        q = np.rint(inv_scale[:, None] * (x - low[:, None]))
        q[x <= low[:, None]] = 0
        rows = out[i : i + SOFTMAX_ROWS]
        rows[:, :4] = np.stack([scale, min_log_prob], axis=-1).astype("<f4").view("<u2")
        rows[:, 4 : 4 + n_vocab] = q
    return out


class LogitsFileWriter:
    """Writes a base file as `llama-perplexity --kl-divergence-base` does, to a temporary file renamed
    into place by close(): an interrupted run leaves nothing behind."""

    def __init__(self, path: str | Path, n_ctx: int, n_vocab: int, n_chunk: int, tokens: np.ndarray):
        self.path = Path(path)
        self.n_vocab = n_vocab
        self.rows_left = n_chunk * rows_per_chunk(n_ctx)
        tokens = np.asarray(tokens[: n_chunk * n_ctx], dtype="<i4")
        if len(tokens) != n_chunk * n_ctx:
            raise LogitsFileError(f"{len(tokens)} tokens do not fill {n_chunk} chunks of {n_ctx}")
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise LogitsFileError(f"{self.path}: directory {folder} does not exist")
        fd, self.partial = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.", suffix=".partial")
        self.fh: BinaryIO = os.fdopen(fd, "wb")
        header = np.array([(MAGIC, n_ctx, n_vocab, n_chunk)], dtype=HEADER)
        self.fh.write(header.tobytes())
        self.fh.write(tokens.tobytes())

    def write(self, logits: np.ndarray) -> None:
        """The next scored rows, in order: (n, n_vocab) logits."""
        if logits.shape[1] != self.n_vocab:
            raise LogitsFileError(f"logits of {logits.shape[1]} columns for a file of n_vocab {self.n_vocab}")
        self.rows_left -= len(logits)
        self.fh.write(quantize_log_probs(logits).tobytes())

    def close(self) -> None:
        self.fh.close()
        if self.rows_left != 0:
            self.discard()
            raise LogitsFileError(f"{self.path}: {self.rows_left} rows were not written")
        os.chmod(self.partial, 0o644)  # as a file written by open(), not mkstemp's 0600
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        self.fh.close()
        Path(self.partial).unlink(missing_ok=True)


# -- reading --------------------------------------------------------------------------------------


@dataclass
class LogitsFile:
    """A base file, memory-mapped. rows is (n_chunk, rows_per_chunk, row_width) uint16."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # (n_chunk, n_ctx) int32
    rows: np.ndarray

    def log_probs(self, chunk: int) -> np.ndarray:
        """The dequantized log-probs of one chunk: (rows_per_chunk, n_vocab) float32."""
        return dequantize_rows(self.rows[chunk], self.n_vocab)


def open_logits_file(path: str | Path) -> LogitsFile:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise LogitsFileError(f"{path}: {e.strerror}") from None
    if size < HEADER.itemsize:
        raise LogitsFileError(f"{path}: {size} bytes is too short for a logits file")
    header = np.fromfile(path, dtype=HEADER, count=1)[0]
    if header["magic"] != MAGIC:
        raise LogitsFileError(f"{path}: does not look like a file of log-probabilities (no {MAGIC.decode()} magic)")
    n_ctx, n_vocab, n_chunk = int(header["n_ctx"]), int(header["n_vocab"]), int(header["n_chunk"])
    if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
        raise LogitsFileError(f"{path}: bad header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})")
    token_bytes = 4 * n_ctx * n_chunk
    row_bytes = 2 * row_width(n_vocab)
    need = HEADER.itemsize + token_bytes + n_chunk * rows_per_chunk(n_ctx) * row_bytes
    if size < need:
        raise LogitsFileError(
            f"{path}: truncated: n_ctx {n_ctx}, n_vocab {n_vocab} and {n_chunk} chunks need {need} bytes, "
            f"the file has {size}"
        )
    tokens = np.memmap(path, dtype="<i4", mode="r", offset=HEADER.itemsize, shape=(n_chunk, n_ctx))
    rows = np.memmap(
        path,
        dtype="<u2",
        mode="r",
        offset=HEADER.itemsize + token_bytes,
        shape=(n_chunk, rows_per_chunk(n_ctx), row_width(n_vocab)),
    )
    return LogitsFile(path, n_ctx, n_vocab, n_chunk, tokens, rows)


def dequantize_rows(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """(n, row_width) uint16 -> (n, n_vocab) float32 log-probs: scale * q + min_log_prob."""
    head = np.ascontiguousarray(rows[:, :4]).view("<f4")  # (n, 2): scale, min_log_prob
    return head[:, :1] * rows[:, 4 : 4 + n_vocab].astype(np.float32) + head[:, 1:2]


# -- KL divergence --------------------------------------------------------------------------------


@dataclass
class KLDStats:
    """Sums over scored positions, as perplexity.cpp's kl_divergence_result, and each position's KLD and
    delta-p for the percentiles."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    max_p_diff: float = 0.0
    n_same_top: int = 0
    count: int = 0
    kld_values: list[np.ndarray] = field(default_factory=list)  # (rows,) float32 per step
    p_diff_values: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, base_rows: np.ndarray, targets: np.ndarray) -> None:
        """Score rows of logits (n, n_vocab) against base rows (n, row_width) for next tokens (n,)."""
        n_vocab = logits.shape[1]
        for i in range(0, len(targets), SOFTMAX_ROWS):
            self._add(
                np.asarray(logits[i : i + SOFTMAX_ROWS], dtype=np.float32),
                base_rows[i : i + SOFTMAX_ROWS],
                targets[i : i + SOFTMAX_ROWS],
                n_vocab,
            )

    def _add(self, x: np.ndarray, base_rows: np.ndarray, targets: np.ndarray, n_vocab: int) -> None:
        # As perplexity.cpp's log_softmax(n_vocab, logits, base_log_prob, tok, kld), in float32
        # with float64 sums. x (rows, n_vocab) float32 logits; targets (rows,).
        rows = np.arange(len(targets))
        top_id = x.argmax(axis=-1)  # the first of equal maxima, as its strict > scan
        top = x[rows, top_id]
        log_sum_exp = np.log(np.exp(x - top[:, None]).sum(axis=-1, dtype=np.float64)).astype(np.float32)
        nll = (top + log_sum_exp) - x[rows, targets]  # (rows,) float32
        base = dequantize_rows(base_rows, n_vocab)  # (rows, n_vocab) base log-probs
        nll_base = -base[rows, targets]
        top_base = base.argmax(axis=-1)
        kept = base > np.float32(-WINDOW)
        terms = np.where(kept, np.exp(base) * ((base - x) + (top + log_sum_exp)[:, None]), np.float32(0))
        kld = terms.sum(axis=-1, dtype=np.float64)  # (rows,)
        p_diff = np.exp(-nll) - np.exp(-nll_base)  # (rows,) float32
        nll64, nll_base64, p_diff64 = nll.astype(np.float64), nll_base.astype(np.float64), p_diff.astype(np.float64)
        self.sum_nll += nll64.sum()
        self.sum_nll2 += np.square(nll64).sum()
        self.sum_nll_base += nll_base64.sum()
        self.sum_nll_base2 += np.square(nll_base64).sum()
        self.sum_nll_nll_base += (nll64 * nll_base64).sum()
        self.sum_kld += kld.sum()
        self.sum_kld2 += np.square(kld).sum()
        self.sum_p_diff += p_diff64.sum()
        self.sum_p_diff2 += np.square(p_diff64).sum()
        self.sum_p_diff4 += np.square(np.square(p_diff64)).sum()
        self.max_p_diff = max(self.max_p_diff, float(np.abs(p_diff).max()))
        self.n_same_top += int((top_id == top_base).sum())
        self.count += len(targets)
        self.kld_values.append(kld.astype(np.float32))
        self.p_diff_values.append(p_diff)

    def report(self) -> KLDReport:
        return KLDReport.from_stats(self)


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """Mean and its standard error, as perplexity.cpp's lambda (0 error for 10 values or fewer)."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total2 / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0


def covariance(sum_a: float, sum_b: float, sum_ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sum_ab / count - (sum_a / count) * (sum_b / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between neighbours, as perplexity.cpp's percentile lambda."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, len(sorted_values) - 1)])


def median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    return float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]) if n % 2 == 0 else sorted_values[n // 2])


KLD_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001)
P_DIFF_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001)


@dataclass
class KLDReport:
    """Everything `llama-perplexity --kl-divergence` prints at the end, as numbers (pairs are value, error)."""

    count: int
    ppl: tuple[float, float]  # Mean PPL(Q)
    ppl_base: tuple[float, float]  # Mean PPL(base)
    ln_ppl_correlation: float  # Cor(ln(PPL(Q)), ln(PPL(base)))
    ln_ppl_ratio: tuple[float, float]  # Mean ln(PPL(Q)/PPL(base))
    ppl_ratio: tuple[float, float]
    ppl_diff: tuple[float, float]
    kld: tuple[float, float]  # Mean KLD
    kld_max: float
    kld_median: float
    kld_min: float
    kld_percentiles: dict[str, float]  # "99.9" -> value
    p_diff: tuple[float, float]  # Mean delta-p, as a fraction (llama.cpp prints percent)
    p_diff_max: float
    p_diff_median: float
    p_diff_min: float
    p_diff_percentiles: dict[str, float]
    p_diff_rms: tuple[float, float]
    same_top: tuple[float, float]  # share of positions with the same most likely token

    @classmethod
    def from_stats(cls, s: KLDStats) -> KLDReport:
        if s.count < 2:
            raise LogitsFileError(f"{s.count} scored positions are too few for statistics")
        kld = np.sort(np.concatenate(s.kld_values))
        p_diff = np.sort(np.concatenate(s.p_diff_values))
        log_ppl = mean_and_uncertainty(s.sum_nll, s.sum_nll2, s.count)
        log_ppl_base = mean_and_uncertainty(s.sum_nll_base, s.sum_nll_base2, s.count)
        ppl = math.exp(log_ppl[0])
        ppl_base = math.exp(log_ppl_base[0])
        cov = covariance(s.sum_nll, s.sum_nll_base, s.sum_nll_nll_base, s.count)
        errors = log_ppl[1] * log_ppl_base[1]
        ratio = log_ppl[0] - log_ppl_base[0]
        ratio_err = math.sqrt(max(0.0, log_ppl[1] ** 2 + log_ppl_base[1] ** 2 - 2.0 * cov))
        ppl_err, ppl_base_err = ppl * log_ppl[1], ppl_base * log_ppl_base[1]
        diff_err = math.sqrt(max(0.0, ppl_err**2 + ppl_base_err**2 - 2.0 * ppl * ppl_base * cov))
        mse = mean_and_uncertainty(s.sum_p_diff2, s.sum_p_diff4, s.count)
        rms = math.sqrt(mse[0])
        same = s.n_same_top / s.count
        return cls(
            count=s.count,
            ppl=(ppl, ppl_err),
            ppl_base=(ppl_base, ppl_base_err),
            ln_ppl_correlation=cov / errors if errors else 0.0,
            ln_ppl_ratio=(ratio, ratio_err),
            ppl_ratio=(math.exp(ratio), math.exp(ratio) * ratio_err),
            ppl_diff=(ppl - ppl_base, diff_err),
            kld=mean_and_uncertainty(s.sum_kld, s.sum_kld2, s.count),
            kld_max=float(kld[-1]),
            kld_median=median(kld),
            kld_min=float(kld[0]),
            kld_percentiles={f"{100 * f:.1f}": percentile(kld, f) for f in KLD_PERCENTILES},
            p_diff=mean_and_uncertainty(s.sum_p_diff, s.sum_p_diff2, s.count),
            p_diff_max=float(p_diff[-1]),
            p_diff_median=median(p_diff),
            p_diff_min=float(p_diff[0]),
            p_diff_percentiles={f"{100 * f:.1f}": percentile(p_diff, f) for f in P_DIFF_PERCENTILES},
            p_diff_rms=(rms, 0.5 / rms * mse[1] if rms else 0.0),
            same_top=(same, math.sqrt(same * (1 - same) / (s.count - 1))),
        )

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    def render(self) -> str:
        """The closing block of llama-perplexity --kl-divergence, line for line."""

        def pm(pair, width=10, digits=6):
            return f"{pair[0]:{width}.{digits}f} ± {pair[1]:{width}.{digits}f}"

        lines = [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {pm(self.ppl)}",
            f"Mean PPL(base)                : {pm(self.ppl_base)}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * self.ln_ppl_correlation:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {pm(self.ln_ppl_ratio)}",
            f"Mean PPL(Q)/PPL(base)         : {pm(self.ppl_ratio)}",
            f"Mean PPL(Q)-PPL(base)         : {pm(self.ppl_diff)}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {pm(self.kld)}",
            f"Maximum KLD: {self.kld_max:10.6f}",
        ]
        kp = self.kld_percentiles
        lines += [f"{k:>4}%   KLD: {kp[k]:10.6f}" for k in ("99.9", "99.0", "95.0", "90.0")]
        lines.append(f"Median  KLD: {self.kld_median:10.6f}")
        lines += [f"{k:>4}%   KLD: {kp[k]:10.6f}" for k in ("10.0", "5.0", "1.0", "0.1")]
        lines += [f"Minimum KLD: {self.kld_min:10.6f}", "", "====== Token probability statistics ======"]
        lines.append(f"Mean    Δp: {100 * self.p_diff[0]:6.3f} ± {100 * self.p_diff[1]:5.3f} %")
        pp = self.p_diff_percentiles
        lines.append(f"Maximum Δp: {100 * self.p_diff_max:6.3f}%")
        lines += [f"{k:>4}%   Δp: {100 * pp[k]:6.3f}%" for k in ("99.9", "99.0", "95.0", "90.0", "75.0")]
        lines.append(f"Median  Δp: {100 * self.p_diff_median:6.3f}%")
        lines += [f"{k:>4}%   Δp: {100 * pp[k]:6.3f}%" for k in ("25.0", "10.0", "5.0", "1.0", "0.1")]
        lines.append(f"Minimum Δp: {100 * self.p_diff_min:6.3f}%")
        lines.append(f"RMS Δp    : {100 * self.p_diff_rms[0]:6.3f} ± {100 * self.p_diff_rms[1]:5.3f} %")
        lines.append(f"Same top p: {100 * self.same_top[0]:6.3f} ± {100 * self.same_top[1]:5.3f} %")
        return "\n".join(lines)


def kl_divergence(session, base: LogitsFile, n_chunks: int | None = None, on_chunk=None) -> KLDStats:
    """Score a refengine Session against a base file, as `llama-perplexity --kl-divergence`: the file's
    tokens, each chunk's first replaced by BOS, the file's n_ctx. on_chunk(i, stats) after each chunk."""
    from refengine.perplexity import chunk_input, scored_logits

    n_vocab = session.model.config.n_vocab
    if base.n_vocab != n_vocab:
        raise LogitsFileError(f"{base.path}: written for a vocabulary of {base.n_vocab}, the model has {n_vocab}")
    n_chunk = base.n_chunk if n_chunks is None else min(n_chunks, base.n_chunk)
    first = base.n_ctx // 2
    bos = session.tokenizer.bos_id if session.tokenizer.vocab.add_bos else None
    stats = KLDStats()
    for i in range(n_chunk):
        chunk = np.asarray(base.tokens[i], dtype=np.int64)  # (n_ctx,)
        bad = (chunk < 0) | (chunk >= n_vocab)
        if bad.any():
            raise LogitsFileError(f"{base.path}: token id {int(chunk[bad][0])} in chunk {i} is outside the vocabulary")
        for start, logits in scored_logits(session, chunk_input(chunk, bos), first):
            n = len(logits)
            stats.add(logits, base.rows[i, start - first : start - first + n], chunk[start + 1 : start + 1 + n])
        if on_chunk is not None:
            on_chunk(i, stats)
    return stats
