"""Weights as the forward pass uses them: memory-mapped stored elements, made dense on demand.

The NumPy path multiplies by float32 matrices. Dequantizing a Q40 matrix costs far more than
the product itself, so dense copies are kept for as many weights as the dense budget allows
(``DLLAMA_DENSE_BUDGET_MB``, default 40 % of physical memory); the rest are dequantized again in
row chunks at every use, which keeps models larger than memory/4 runnable.
"""
from __future__ import annotations

import os

import numpy as np

from dllama.errors import DllamaError
from dllama.kernels import reference as ref
from dllama.kernels.quants import FloatType, to_float32

# Rows dequantized at once when a weight has no dense copy: bounds the temporary memory.
_CHUNK_ROWS = 4096


def physical_memory() -> int:
    """Bytes of RAM on this machine (8 GiB when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _default_budget() -> int:
    env = os.environ.get("DLLAMA_DENSE_BUDGET_MB")
    if env is not None:
        try:
            return max(0, int(float(env) * (1 << 20)))
        except (ValueError, OverflowError):
            raise DllamaError(f"DLLAMA_DENSE_BUDGET_MB must be a number of megabytes, got {env!r}") from None
    return int(physical_memory() * 0.4)


class DenseBudget:
    """Bytes of float32 copies that weights may still keep."""

    def __init__(self, nbytes: int | None = None):
        self.left = _default_budget() if nbytes is None else nbytes

    def take(self, nbytes: int) -> bool:
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


class Linear:
    """A weight matrix ``[out, in]`` in its stored type; ``__call__`` computes ``x @ W.T``."""

    def __init__(self, stored: np.ndarray, float_type: FloatType, budget: DenseBudget):
        self.stored = stored
        self.float_type = float_type
        self.budget = budget
        self._dense: np.ndarray | None = None
        if float_type == FloatType.F32:
            self._dense = stored  # the memory map itself: no copy
        self._tried = self._dense is not None

    @property
    def out_features(self) -> int:
        return self.stored.shape[0]

    def dense(self) -> np.ndarray | None:
        if not self._tried:
            self._tried = True
            nbytes = self.stored.shape[0] * self.stored.shape[1] * self.float_type.values_per_element * 4
            if self.budget.take(nbytes):
                self._dense = to_float32(self.stored, self.float_type)
        return self._dense

    def __call__(self, x: np.ndarray, q80_input: bool = False) -> np.ndarray:
        if q80_input and self.float_type.is_quantized:
            x = ref.round_trip_q80(x)
        w = self.dense()
        if w is not None:
            return ref.matmul(x, w)
        out = np.empty((x.shape[0], self.out_features), dtype=np.float32)
        for r in range(0, self.out_features, _CHUNK_ROWS):
            chunk = to_float32(self.stored[r:r + _CHUNK_ROWS], self.float_type)
            out[:, r:r + chunk.shape[0]] = ref.matmul(x, chunk)
        return out
