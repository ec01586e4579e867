"""float32 copies of stored weights for the NumPy blocks, within a memory budget.

The NumPy products multiply float32 matrices. Dequantizing a Q40 matrix costs far more than
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
from dllama.machine import physical_memory
from dllama.model.weights import Weight

# Rows dequantized at once when a weight has no dense copy: bounds the temporary memory.
_CHUNK_ROWS = 4096


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


class DenseWeights:
    """``x @ W.T`` for stored weights, through float32 copies made on first use while the budget
    lasts (float32 weights are used as they are: no copy)."""

    def __init__(self, budget: DenseBudget):
        self.budget = budget
        self._dense: dict[Weight, np.ndarray | None] = {}

    def dense(self, w: Weight) -> np.ndarray | None:
        """The float32 matrix of ``w``, or None when the budget does not cover it."""
        if w not in self._dense:
            if w.float_type == FloatType.F32:
                self._dense[w] = w.stored  # the memory map itself
            else:
                nbytes = w.stored.shape[0] * w.stored.shape[1] * w.float_type.values_per_element * 4
                self._dense[w] = to_float32(w.stored, w.float_type) if self.budget.take(nbytes) else None
        return self._dense[w]

    def matmul(self, x: np.ndarray, w: Weight, q80_input: bool) -> np.ndarray:
        """``x @ W.T``; with ``q80_input``, quantized weights see x rounded through Q80 blocks, as
        the int8 products of ``--buffer-float-type q80`` do."""
        if q80_input and w.float_type.is_quantized:
            x = ref.round_trip_q80(x)
        dense = self.dense(w)
        if dense is not None:
            return ref.matmul(x, dense)
        out = np.empty((x.shape[0], w.rows), dtype=np.float32)
        for r in range(0, w.rows, _CHUNK_ROWS):
            chunk = to_float32(w.stored[r:r + _CHUNK_ROWS], w.float_type)
            out[:, r:r + chunk.shape[0]] = ref.matmul(x, chunk)
        return out
