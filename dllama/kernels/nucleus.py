"""Next-token draws that a cluster can make from each node's summary of its slice of the logits.

The draw, defined on the whole vocabulary (``draw_full``), for temperature t > 0, top-p p and a
uniform ``coin`` in [0, 1):

- z_j = float64(logit_j) / t, w_j = exp(z_j - max z) in float64 (``weights``);
- the order: by w descending, ties by id ascending; C_k = the exact (real) sum of the first k
  weights in that order, T = the exact sum of all;
- the nucleus: the first ``keep`` tokens, keep = the least k with C_k > p T (all of them when
  none is, as with p = 1);
- the token: the i-th of the order for the least i with C_i > coin * C_keep.

Sums are exact reals, not float64 sums in some order, so the result does not depend on how the
vocabulary is cut into slices: a node sends its largest z, the float64 sum of its weights
relative to it, and its heaviest tokens (``summarize``, at most ``k``); the root merges them
(``draw``). Float64 sums with proven error bounds decide nearly every draw; the few that fall
within those bounds of a boundary are decided in exact rational arithmetic. Where the merged
candidates cannot be shown to reach the drawn token, or an exact total is needed, ``draw``
returns None and the root asks for the full rows (a second round).

Temperature 0 is argmax, the first of ties: a node sends its best (logit, id).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

U = 2.0 ** -53  # float64 unit roundoff
# Candidates a node lists for a sampled row (8 bytes each): on SmolLM2 at temperature 0.8 and
# top-p 0.9, 64 left 2-13 % of the draws to a second round, 512 none of 300.
CANDIDATES = 512
# A summary on the wire: size, z_max, z_min, total, rest, count; then count int32 ids and
# count float32 logits.
_SUMMARY = struct.Struct("<qdddfi")


@dataclass(frozen=True)
class Summary:
    """What a slice of one row of logits contributes to a draw.

    ``ids`` (global) and ``logits`` list the slice's heaviest tokens in draw order, ``rest``
    is the largest logit of the others (-inf when all are listed). Greedy summaries
    (temperature 0) list the slice's first largest logit only; their other fields are unused.
    """

    size: int  # tokens in the slice
    z_max: float
    z_min: float
    total: float  # float64 sum of exp(z - z_max) over the slice
    ids: np.ndarray  # int64
    logits: np.ndarray  # float32
    rest: float = -np.inf

    @property
    def complete(self) -> bool:
        return len(self.ids) == self.size


def weights(logits: np.ndarray, temperature: float, z_max: float) -> np.ndarray:
    """exp(float64(logit) / temperature - z_max): the one formula every node and the root use."""
    return np.exp(np.asarray(logits, dtype=np.float32).astype(np.float64) / temperature - z_max)


def _order(ids: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Draw order: by weight descending, ties by id (a stable sort of the ids' order; lexsort
    is several times slower on a whole vocabulary)."""
    by_id = np.argsort(ids, kind="stable")
    return by_id[np.argsort(-w[by_id], kind="stable")]


def summarize(logits: np.ndarray, offset: int, temperature: float, topp: float, n_total: int,
              k: int = CANDIDATES) -> Summary:
    """The summary of a slice ``logits`` (float32) of ``n_total`` tokens' row, whose first token
    has id ``offset``: at most ``k`` candidates, only those that can be in the nucleus."""
    logits = np.asarray(logits, dtype=np.float32)
    n = len(logits)
    if n == 0:
        raise ValueError("an empty slice of logits")
    if temperature == 0:  # the best alone: a greedy draw reads nothing else
        best = int(np.argmax(logits))
        return Summary(n, 0.0, 0.0, 0.0, np.array([offset + best], np.int64), logits[best:best + 1].copy())
    return _listed(logits, offset, *_weigh(logits, temperature), topp, n_total, k)


def _weigh(logits: np.ndarray, temperature: float) -> tuple[np.ndarray, float, float]:
    """Every token's weight (``weights``' formula, z computed once), the largest z and the smallest."""
    z = logits.astype(np.float64) / temperature
    z_max = float(z.max())
    return np.exp(z - z_max), z_max, float(z.min())


def _listed(logits: np.ndarray, offset: int, w: np.ndarray, z_max: float, z_min: float, topp: float, n_total: int,
            k: int) -> Summary:
    """``summarize`` once the weights are known."""
    n = len(logits)
    total = float(np.sum(w))
    ids = np.arange(n, dtype=np.int64)
    if topp < 1 and n_total > 1:
        # Lighter than (1 - p) T / (n_total - 1), a token cannot be in the nucleus (together
        # the lighter ones weigh less than (1 - p) T); this slice's own total is a lower bound
        # of T, shrunk by far more than its rounding.
        # (That needs one token at least as heavy; near-uniform rows may have none.)
        heavy = np.flatnonzero(w >= (1 - topp) / (n_total - 1) * total * (1 - 1e-6))
        ids = heavy if len(heavy) else ids
    if len(ids) > k:
        ids = ids[np.argpartition(-w[ids], k - 1)[:k]]
    ids = ids[_order(ids, w[ids])]
    unlisted = np.ones(n, dtype=bool)
    unlisted[ids] = False
    rest = float(np.max(logits[unlisted], initial=-np.inf))
    return Summary(n, z_max, z_min, total, ids + offset, logits[ids].copy(), rest)


def _exact(values: np.ndarray) -> Fraction:
    """The exact sum of non-negative float64 values."""
    mantissa, exponent = np.frexp(np.asarray(values, dtype=np.float64))
    m = (mantissa * 2.0 ** 53).astype(np.int64)  # exact: values = m * 2^(exponent - 53)
    total = 0
    for e in np.unique(exponent[m > 0]):
        sel = m[exponent == e]
        hi, lo = int(np.sum(sel >> 26)), int(np.sum(sel & ((1 << 26) - 1)))  # no int64 overflow
        total += ((hi << 26) + lo) << int(e - 53 + 1074)
    return Fraction(total, 1 << 1074)


def _first_above(prefix: np.ndarray, error: np.ndarray, lo: float, hi: float, limit: int) -> int | None:
    """The least k (1-based, k <= limit) with C_k > the threshold, for prefix sums C_k within
    ``error`` of ``prefix`` and a threshold in [lo, hi]; 0 when the bounds cannot tell, None
    when no C_k with k <= limit can be above."""
    above = np.flatnonzero(prefix[:limit] - error[:limit] > hi)
    if len(above) == 0:
        return 0 if limit and prefix[limit - 1] + error[limit - 1] > lo else None
    k = int(above[0]) + 1
    if k > 1 and prefix[k - 2] + error[k - 2] > lo:
        return 0  # C_{k-1} may be above too
    return k


def _exact_first_above(w_sorted: np.ndarray, threshold: Fraction, limit: int) -> int | None:
    running = Fraction(0)
    for k in range(1, limit + 1):
        running += Fraction(float(w_sorted[k - 1]))
        if running > threshold:
            return k
    return None


def draw(parts: list[Summary], temperature: float, topp: float, coin: float,
         all_weights: np.ndarray | None = None) -> int | None:
    """The token ``draw_full`` gives for the row the summaries ``parts`` (one per slice, any
    order) describe, or None where they cannot decide it. ``all_weights`` (every token's
    weight, where the caller holds the whole row) settles what needs the exact total."""
    parts = [p for p in parts if p.size]  # slices past the draw's tokens
    if temperature == 0:
        best = min(range(len(parts)), key=lambda i: (-float(parts[i].logits[0]), int(parts[i].ids[0])))
        return int(parts[best].ids[0])
    z_max = max(p.z_max for p in parts)
    ids = np.concatenate([p.ids for p in parts])
    w = weights(np.concatenate([p.logits for p in parts]), temperature, z_max)
    if len(parts) > 1:  # one summary is in draw order already
        order = _order(ids, w)
        ids, w = ids[order], w[order]
    # Listed tokens heavier than every slice's unlisted ones come first in the whole order.
    bounds = [float(weights(np.array([p.rest]), temperature, z_max)[0]) for p in parts if not p.complete]
    certain = int(np.sum(w > max(bounds))) if bounds else len(w)
    n_total = sum(p.size for p in parts)
    # T from the slices' totals: each slice's weights relative to its own maximum differ from
    # the global ones by the rounding of a subtraction (relative u |z - z_max|), of exp (a few
    # u) and of the slice's sum (u per token); underflow adds at most 2^-1000 a token.
    spread = max(z_max - p.z_min for p in parts)
    delta = 4 * U * (n_total + 2 * spread + 16)
    estimate = sum(float(np.exp(p.z_max - z_max)) * p.total for p in parts)
    t_lo, t_hi = estimate * (1 - delta) - n_total * 2.0 ** -1000, estimate * (1 + delta) + n_total * 2.0 ** -1000
    prefix = np.cumsum(w)
    error = 2 * U * np.arange(1, len(w) + 1) * prefix + 2.0 ** -1000
    exact_total = None

    def total() -> Fraction | None:
        nonlocal exact_total
        if exact_total is None and all_weights is not None:
            exact_total = _exact(all_weights)
        return exact_total

    if topp >= 1:
        keep = None  # all: C_keep is T
    else:
        keep = _first_above(prefix, error, topp * t_lo * (1 - U), topp * t_hi * (1 + U), certain)
        if keep == 0:
            if total() is None:
                return None
            keep = _exact_first_above(w, Fraction(topp) * exact_total, certain)
        if keep is None:
            return None  # the nucleus reaches past what the slices listed
    if keep is None:
        lo, hi = coin * t_lo * (1 - U), coin * t_hi * (1 + U)
        limit = certain
    else:
        c_lo, c_hi = prefix[keep - 1] - error[keep - 1], prefix[keep - 1] + error[keep - 1]
        lo, hi = coin * c_lo * (1 - U), coin * c_hi * (1 + U)
        limit = keep
    i = _first_above(prefix, error, lo, hi, limit)
    if i == 0 or (i is None and keep is not None):
        # Between bounds: decide exactly (C_keep is known exactly from the listed weights).
        c_keep = _exact(w[:keep]) if keep is not None else total()
        if c_keep is None:
            return None
        i = _exact_first_above(w, Fraction(coin) * c_keep, limit)
    if i is None:
        return None
    return int(ids[i - 1])


def draw_full(logits: np.ndarray, temperature: float, topp: float, coin: float) -> int:
    """The draw on a whole row (see the module's definition); for temperature 0, argmax."""
    logits = np.asarray(logits, dtype=np.float32)
    n = len(logits)
    if temperature == 0:
        return int(np.argmax(logits))
    w, z_max, z_min = _weigh(logits, temperature)
    for k in (CANDIDATES * 4, n):  # the heaviest first (peaked rows), else every token sorted
        part = _listed(logits, 0, w, z_max, z_min, topp if k < n else 1.0, n, k)  # the last lists all
        token = draw([part], temperature, topp, coin, w if part.complete else None)
        if token is not None:
            return token
    raise AssertionError("a draw over every token always decides")


def summarize_rows(logits: np.ndarray, offset: int, draws: list) -> list:
    """A node's reply for a forward's logit rows ``logits`` [rows, its slice]: the whole slice
    of each row whose draw is None (or of every row when ``draws`` is empty), else the
    summary of the part of the slice below the draw's ``tokens`` (a ``model.batch.Draw``)."""
    if not draws:
        return list(logits)
    out = []
    for row, d in zip(logits, draws):
        if d is None:
            out.append(row)
            continue
        temperature, topp, tokens = d
        part = row[:max(0, min(len(row), tokens - offset))]
        out.append(summarize(part, offset, temperature, topp, tokens) if len(part) else
                   Summary(0, 0.0, 0.0, 0.0, np.zeros(0, np.int64), np.zeros(0, np.float32)))
    return out


def encode(parts: list) -> bytes:
    """Rows (float32 arrays) and summaries as one blob (``decode`` reads it back)."""
    chunks = []
    for p in parts:
        if isinstance(p, Summary):
            chunks.append(_SUMMARY.pack(p.size, p.z_max, p.z_min, p.total, p.rest, len(p.ids)))
            chunks.append(np.asarray(p.ids, dtype="<i4").tobytes())
            chunks.append(np.asarray(p.logits, dtype="<f4").tobytes())
        else:
            chunks.append(np.asarray(p, dtype="<f4").tobytes())
    return b"".join(chunks)


def decode(blob, draws: list, n_rows: int, size: int, offset: int) -> list:
    """The ``n_rows`` rows and summaries of a node whose slice holds ``size`` tokens from
    ``offset``; ValueError where the blob does not hold what ``draws`` asked for."""
    data = memoryview(blob).cast("B")
    out, at = [], 0
    for r in range(n_rows):
        if not draws or draws[r] is None:
            end = at + 4 * size
            if end > len(data):
                raise ValueError("a row of logits cut short")
            out.append(np.frombuffer(data[at:end], dtype="<f4"))
            at = end
            continue
        if at + _SUMMARY.size > len(data):
            raise ValueError("a summary cut short")
        n, z_max, z_min, total, rest, count = _SUMMARY.unpack_from(data, at)
        at += _SUMMARY.size
        end = at + 8 * count
        if not (0 <= count <= n <= size) or end > len(data):
            raise ValueError("a summary of the wrong size")
        if not all(np.isfinite(v) for v in (z_max, z_min, total)) or np.isnan(rest):
            raise ValueError("a summary with a value that is not a number")
        ids = np.frombuffer(data[at:at + 4 * count], dtype="<i4").astype(np.int64)
        values = np.frombuffer(data[at + 4 * count:end], dtype="<f4")
        at = end
        if count and (ids.min() < offset or ids.max() >= offset + n or len(np.unique(ids)) != count):
            raise ValueError("a summary lists tokens outside its slice")
        if n and not count:
            raise ValueError("a summary lists no token")
        out.append(Summary(n, z_max, z_min, total, ids, values, rest))
    if at != len(data):
        raise ValueError("logits longer than asked for")
    return out
