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

    def encode_into(self, x: np.ndarray, out: np.ndarray) -> None:
        """``x`` (rows x dim float32) in its wire form, into the uint8 array ``out`` of
        ``nbytes(rows, dim)`` bytes (a frame's payload, sent from where it is)."""
        if not self.q80:
            out.view(np.float32)[:] = x.reshape(-1)
            return
        if x.shape[-1] % BLOCK_SIZE:
            raise ValueError(f"Q80 needs rows of a multiple of {BLOCK_SIZE} values, got {x.shape[-1]}")
        self._ops.q80_wire_encode_into(x, out)

    def sum_rows(self, frames: np.ndarray, order: np.ndarray, offset: int, rows: int, dim: int) -> np.ndarray:
        """The sum, in ``order`` and starting from zero (so every node that sums the same parts
        gets the same bits), of the parts that those rows of the uint8 array ``frames`` hold
        from byte ``offset`` on; their sizes are the caller's to check."""
        if self.q80:
            return self._ops.q80_wire_sum(frames, order, offset, rows, dim)
        size = rows * dim * 4
        total = np.zeros((rows, dim), dtype=np.float32)
        for row in order:
            total += frames[row, offset:offset + size].view(np.float32).reshape(rows, dim)
        return total

    def encode(self, x: np.ndarray) -> bytes:
        """``x`` (rows x dim) in its wire form, as bytes."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        out = np.empty(self.nbytes(*x.shape), dtype=np.uint8)
        self.encode_into(x, out)
        return out.tobytes()

    def sum_parts(self, parts: list, rows: int, dim: int) -> np.ndarray:
        """``sum_rows`` of encoded parts given one by one; ValueError when a part's size does not fit."""
        size = self.nbytes(rows, dim)
        for part in parts:
            if len(part) != size or (self.q80 and dim % BLOCK_SIZE):
                raise ValueError(f"a part of {len(part)} bytes does not hold {rows} x {dim} values")
        frames = np.frombuffer(b"".join(parts), dtype=np.uint8).reshape(len(parts), size)
        return self.sum_rows(frames, np.arange(len(parts)), 0, rows, dim)
