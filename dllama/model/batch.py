"""The rows of one forward: which KV cache slot and position each row evaluates, and which rows'
logits are wanted. One forward may carry several sequences (continuous batching: each decode
step runs the next token of every running sequence, plus a chunk of a new prompt), each in its
own slot of the KV cache; a row attends to positions 0..its own of its slot."""
from __future__ import annotations

from dataclasses import dataclass
from math import isfinite
from typing import NamedTuple

import numpy as np

from dllama.errors import DllamaError

# Rows per forward: weights are read once per forward, whatever it carries.
MAX_BATCH = 32


class Draw(NamedTuple):
    """What a draw from a row of logits needs to know before the row is computed."""

    temperature: float  # 0: argmax
    topp: float
    tokens: int  # the row's first ``tokens`` logits take part (the ids the tokenizer can spell)


@dataclass(frozen=True)
class Batch:
    slots: np.ndarray  # int64 [rows]: the KV cache slot of each row
    positions: np.ndarray  # int64 [rows]: its position in that slot's sequence
    logit_rows: np.ndarray  # int64 [k], ascending: the rows whose logits the forward returns (maybe none)
    # (src, dst, length): before the forward, slot dst gets slot src's positions 0..length-1
    # (the choices of one request share its prompt, evaluated once)
    copies: tuple[tuple[int, int, int], ...] = ()
    # Per logit row (or empty: none): (temperature, top-p, tokens) where only a draw from the
    # row's first ``tokens`` logits is wanted, so a cluster's nodes may send summaries
    # (``kernels.nucleus``); None where the whole row is (log-probabilities, echo).
    draws: tuple[Draw | None, ...] = ()

    @classmethod
    def of(cls, slots, positions, logit_rows, copies=(), draws=()) -> Batch:
        return cls(np.asarray(slots, dtype=np.int64).reshape(-1), np.asarray(positions, dtype=np.int64).reshape(-1),
                   np.asarray(logit_rows, dtype=np.int64).reshape(-1), tuple(tuple(c) for c in copies),
                   tuple(None if d is None else Draw(*d) for d in draws))

    @classmethod
    def run(cls, n: int, pos: int, slot: int = 0, all_logits: bool = False, draw: Draw | None = None) -> Batch:
        """``n`` consecutive positions of one slot from ``pos``; logits of the last (or of all),
        of the last for a ``draw`` only."""
        draws = (draw,) if draw is not None and not all_logits else ()
        return cls.of(np.full(n, slot), np.arange(pos, pos + n), np.arange(n) if all_logits else [n - 1], (), draws)

    @property
    def rows(self) -> int:
        return len(self.slots)

    def check(self, n_slots: int, seq_len: int) -> None:
        """DllamaError unless every row fits the KV cache, no two rows of a slot share a position,
        and the logit rows are distinct rows of the batch."""
        n = self.rows
        if not 0 < n <= MAX_BATCH or len(self.positions) != n:
            raise DllamaError(f"a forward takes 1 to {MAX_BATCH} rows, got {n}")
        if self.slots.min() < 0 or self.slots.max() >= n_slots:
            raise DllamaError(f"KV cache slot out of range 0..{n_slots - 1}")
        if self.positions.min() < 0 or self.positions.max() >= seq_len:
            raise DllamaError(f"context is full: position {int(self.positions.max())} exceeds the sequence "
                              f"length {seq_len} (raise --max-seq-len)")
        if len(np.unique(self.slots * seq_len + self.positions)) != n:
            raise DllamaError("two rows of a forward evaluate the same position of a slot")
        k = self.logit_rows
        if len(k) and (k.min() < 0 or k.max() >= n or np.any(np.diff(k) <= 0)):
            raise DllamaError("the logit rows must be distinct rows of the forward, in order")
        for src, dst, length in self.copies:
            if not (0 <= src < n_slots and 0 <= dst < n_slots and 0 < length <= seq_len):
                raise DllamaError(f"a KV cache copy out of range: slot {src} to {dst}, {length} positions")
        if self.draws and len(self.draws) != len(k):
            raise DllamaError(f"{len(self.draws)} draws for {len(k)} logit rows")
        for d in self.draws:
            if d is not None and not (isfinite(d.temperature) and d.temperature >= 0 and 0 < d.topp <= 1
                                      and d.tokens >= 1):
                raise DllamaError(f"a draw out of range: {tuple(d)}")

    def to_json(self) -> dict:
        return {"slots": self.slots.tolist(), "positions": self.positions.tolist(),
                "logits": self.logit_rows.tolist(), "copies": [list(c) for c in self.copies],
                "draws": [None if d is None else list(d) for d in self.draws]}

    @classmethod
    def from_json(cls, meta: dict) -> Batch:
        """A batch from a message (untrusted: ValueError when malformed; ``check`` the rest)."""
        fields = [meta.get(name) for name in ("slots", "positions", "logits")]
        for f in fields:
            if not isinstance(f, list) or len(f) > MAX_BATCH or not all(type(v) is int for v in f):
                raise ValueError("a forward's slots, positions and logits must be lists of integers")
        copies = meta.get("copies", [])
        if not isinstance(copies, list) or len(copies) > MAX_BATCH or not all(
                isinstance(c, list) and len(c) == 3 and all(type(v) is int for v in c) for c in copies):
            raise ValueError("a forward's copies must be a list of [source, destination, length]")
        draws = meta.get("draws", [])
        if not isinstance(draws, list) or len(draws) > MAX_BATCH or not all(
                d is None or (isinstance(d, list) and len(d) == 3 and all(type(v) in (int, float) for v in d[:2])
                              and type(d[2]) is int) for d in draws):
            raise ValueError("a forward's draws must be a list of null or [temperature, top-p, tokens]")
        try:
            return cls.of(*fields, copies, [None if d is None else (float(d[0]), float(d[1]), d[2]) for d in draws])
        except OverflowError:
            raise ValueError("a forward's slots, positions and logits must fit 64 bits") from None
