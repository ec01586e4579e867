"""Activations on the wire between nodes: float32, or Q80 blocks when ``--buffer-float-type q80``.

Every node sums the parts of a block in node order from their *decoded* wire form, its own
part included, so all nodes hold bit-identical activations after each sync.
"""
from __future__ import annotations

import numpy as np

from dllama.kernels import quants
from dllama.kernels.backend import NUMBA
from dllama.kernels.quants import BLOCK_SIZE, Q80_BLOCK


class WireCodec:
    def __init__(self, q80: bool, backend: str):
        self.q80 = q80
        self._jit = None
        if q80 and backend == NUMBA:
            from dllama.kernels import jit

            self._jit = jit
            self._table = jit.f16_table()
        self.sum_parts([self.encode(np.zeros((1, BLOCK_SIZE), dtype=np.float32))], 1, BLOCK_SIZE)  # compile now

    def nbytes(self, rows: int, dim: int) -> int:
        if self.q80:
            return rows * (dim // BLOCK_SIZE) * Q80_BLOCK.itemsize
        return rows * dim * 4

    def encode(self, x: np.ndarray) -> bytes:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.q80 and x.shape[-1] % BLOCK_SIZE:
            raise ValueError(f"Q80 needs rows of a multiple of {BLOCK_SIZE} values, got {x.shape[-1]}")
        if not self.q80:
            return x.tobytes()
        if self._jit is None:
            return quants.quantize_q80(x).tobytes()
        out = np.empty(self.nbytes(*x.shape), dtype=np.uint8)
        self._jit.q80_wire_encode(x.reshape(-1), out)
        return out.data

    def sum_parts(self, parts: list, rows: int, dim: int) -> np.ndarray:
        """The sum, in the given order, of encoded parts of ``rows x dim`` values (starting from
        zero, so every node that sums the same parts gets the same bits); ValueError when a
        part's size does not fit."""
        size = self.nbytes(rows, dim)
        for part in parts:
            if len(part) != size or (self.q80 and dim % BLOCK_SIZE):
                raise ValueError(f"a part of {len(part)} bytes does not hold {rows} x {dim} values")
        total = np.zeros((rows, dim), dtype=np.float32)
        if not self.q80:
            for part in parts:
                total += np.frombuffer(part, dtype=np.float32).reshape(rows, dim)
        elif self._jit is None:
            for part in parts:
                total += quants.dequantize_q80(np.frombuffer(part, dtype=Q80_BLOCK)).reshape(rows, dim)
        else:
            data = np.frombuffer(b"".join(parts), dtype=np.uint8)
            self._jit.q80_wire_sum(data, len(parts), self._table, total.reshape(-1))
        return total
