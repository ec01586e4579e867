"""Activations on the wire between nodes: float32, or Q80 blocks when ``--buffer-float-type q80``.

Every node sums the parts of a block in node order from their *decoded* wire form, its own
part included, so all nodes hold bit-identical activations after each sync.
"""
from __future__ import annotations

import numpy as np

from dllama.kernels.backend import ops
from dllama.kernels.quants import BLOCK_SIZE, Q80_BLOCK


class WireCodec:
    def __init__(self, q80: bool, backend: str | None = None):
        self.q80 = q80
        self._ops = ops(backend)
        self.sum_parts([self.encode(np.zeros((1, BLOCK_SIZE), dtype=np.float32))], 1, BLOCK_SIZE)  # compile now

    def nbytes(self, rows: int, dim: int) -> int:
        if self.q80:
            return rows * (dim // BLOCK_SIZE) * Q80_BLOCK.itemsize
        return rows * dim * 4

    def encode(self, x: np.ndarray) -> bytes | memoryview:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not self.q80:
            return x.tobytes()
        if x.shape[-1] % BLOCK_SIZE:
            raise ValueError(f"Q80 needs rows of a multiple of {BLOCK_SIZE} values, got {x.shape[-1]}")
        return self._ops.q80_wire_encode(x)

    def sum_parts(self, parts: list, rows: int, dim: int) -> np.ndarray:
        """The sum, in the given order, of encoded parts of ``rows x dim`` values (starting from
        zero, so every node that sums the same parts gets the same bits); ValueError when a
        part's size does not fit."""
        size = self.nbytes(rows, dim)
        for part in parts:
            if len(part) != size or (self.q80 and dim % BLOCK_SIZE):
                raise ValueError(f"a part of {len(part)} bytes does not hold {rows} x {dim} values")
        if self.q80:
            return self._ops.q80_wire_sum(parts, rows, dim)
        total = np.zeros((rows, dim), dtype=np.float32)
        for part in parts:
            total += np.frombuffer(part, dtype=np.float32).reshape(rows, dim)
        return total
