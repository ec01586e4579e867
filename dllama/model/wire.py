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
        zero = np.zeros((1, BLOCK_SIZE), dtype=np.float32)
        self.add_into(self.encode(zero), zero)  # compiles (or loads) the kernels now

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

    def add_into(self, data: bytes | memoryview, total: np.ndarray) -> None:
        """``total`` [rows, dim] += an encoded part; ValueError when its size does not fit."""
        if len(data) != self.nbytes(*total.shape) or (self.q80 and total.shape[1] % BLOCK_SIZE):
            raise ValueError(f"a part of {len(data)} bytes does not hold {total.shape[0]} x {total.shape[1]} values")
        if not self.q80:
            total += np.frombuffer(data, dtype=np.float32).reshape(total.shape)
        elif self._jit is None:
            total += quants.dequantize_q80(np.frombuffer(data, dtype=Q80_BLOCK)).reshape(total.shape)
        else:
            self._jit.q80_wire_add(np.frombuffer(data, dtype=np.uint8), self._table, total.reshape(-1))
