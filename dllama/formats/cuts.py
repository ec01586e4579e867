"""Parts of a stored tensor, in bytes: what a worker holds, keeps and asks for when slices move.

A tensor is seen as a 2-D byte array (its rows, each ``row_bytes`` long) and a node holds one
``TensorCut`` of it: a range of rows (axis 0) or of byte columns (axis 1, for weights cut by
input columns), or the whole tensor (axis 0, every row). When a cluster plans its slices again,
a worker keeps the overlap of what it held with what it now needs and receives only the rest
(``missing``): both are ranges on the same axis, so what is missing is at most two ranges.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np

Range = tuple[int, int]


class TensorCut(NamedTuple):
    name: str
    rows: int  # the whole tensor as rows x row_bytes
    row_bytes: int
    axis: int  # 0: a range of rows, 1: a range of byte columns
    lo: int
    hi: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hi - self.lo, self.row_bytes) if self.axis == 0 else (self.rows, self.hi - self.lo)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_json(self) -> list:
        return list(self)

    @classmethod
    def from_json(cls, value) -> "TensorCut":
        """A cut read back from a slice cache's metadata; ValueError when it is not one."""
        if not (isinstance(value, list) and len(value) == 6 and isinstance(value[0], str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:])):
            raise ValueError("not a tensor cut")
        cut = cls(*value)
        if cut.axis not in (0, 1) or not 0 <= cut.lo < cut.hi <= (cut.rows if cut.axis == 0 else cut.row_bytes):
            raise ValueError("tensor cut out of range")
        return cut

    def same_tensor(self, other: "TensorCut") -> bool:
        return other[:4] == self[:4]

    def region(self, whole: np.ndarray, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        """The bytes of [lo, hi) (default: this cut) of the whole tensor ``whole`` (rows x row_bytes)."""
        lo = self.lo if lo is None else lo
        hi = self.hi if hi is None else hi
        return whole[lo:hi] if self.axis == 0 else whole[:, lo:hi]

    def place(self, out: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Where [lo, hi) of the whole tensor sits in ``out``, this cut's bytes (shape ``shape``)."""
        a, b = lo - self.lo, hi - self.lo
        return out[a:b] if self.axis == 0 else out[:, a:b]


def missing(want: TensorCut, have: Iterable[TensorCut]) -> list[Range]:
    """The ranges of ``want`` that none of ``have`` (cuts of the same tensor) covers."""
    gaps = [(want.lo, want.hi)]
    for h in have:
        if not want.same_tensor(h):
            continue
        gaps = [piece for lo, hi in gaps for piece in ((lo, min(hi, h.lo)), (max(lo, h.hi), hi)) if piece[0] < piece[1]]
    return gaps


def overlap(want: TensorCut, have: TensorCut) -> Range | None:
    if not want.same_tensor(have):
        return None
    lo, hi = max(want.lo, have.lo), min(want.hi, have.hi)
    return (lo, hi) if lo < hi else None
