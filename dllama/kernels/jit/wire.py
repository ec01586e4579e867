"""Activations on the wire between nodes as Q80 blocks (``--buffer-float-type q80``): the
jitted form of ``reference.q80_wire_encode``/``q80_wire_sum``. Serial: a node's part of one
block is a few kB, less than a thread launch costs."""
from __future__ import annotations

import numpy as np
from numba import njit

from dllama.kernels.jit.float16 import f16_table
from dllama.kernels.jit.quantize import _q80_block
from dllama.kernels.quants import BLOCK_SIZE


@njit(cache=True, nogil=True)
def _encode_into(x: np.ndarray, out: np.ndarray) -> None:
    """Flat float32 ``x`` (a multiple of 32 values) to Q80 blocks as bytes (``Q80_BLOCK``'s
    layout: little-endian float16 scale, 32 int8) in ``out``."""
    q = np.empty(BLOCK_SIZE, dtype=np.int8)
    for b in range(x.shape[0] // BLOCK_SIZE):
        d, _ = _q80_block(x[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE], q)
        o = b * (BLOCK_SIZE + 2)
        out[o] = np.uint8(d & 0xFF)
        out[o + 1] = np.uint8(d >> 8)
        for j in range(BLOCK_SIZE):
            out[o + 2 + j] = np.uint8(q[j] & 0xFF)


@njit(cache=True, nogil=True)
def _sum_rows(frames: np.ndarray, order: np.ndarray, offset: int, table: np.ndarray, total: np.ndarray) -> None:
    """``total`` (flat float32) = the sum, in ``order``, of the Q80 parts that those rows of
    ``frames`` hold from byte ``offset`` on: one call for the whole all-gather."""
    n = total.shape[0]
    total[:] = 0.0
    for p in range(order.shape[0]):
        row = order[p]
        for b in range(n // BLOCK_SIZE):
            o = offset + b * (BLOCK_SIZE + 2)
            d = table[np.uint16(frames[row, o]) | (np.uint16(frames[row, o + 1]) << 8)]
            for j in range(BLOCK_SIZE):
                total[b * BLOCK_SIZE + j] += np.float32(np.int8(frames[row, o + 2 + j])) * d


def q80_wire_encode_into(x: np.ndarray, out: np.ndarray) -> None:
    """float32 values (a multiple of 32 per row) to their Q80 blocks' bytes, in the uint8 array
    ``out`` of exactly their size."""
    _encode_into(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), out)


def q80_wire_sum(frames: np.ndarray, order: np.ndarray, offset: int, rows: int, dim: int) -> np.ndarray:
    """The sum, in ``order``, of the Q80 parts of ``rows x dim`` values in those rows of
    ``frames`` from byte ``offset`` on (sizes already checked)."""
    total = np.empty((rows, dim), dtype=np.float32)
    _sum_rows(frames, order, offset, f16_table(), total.reshape(-1))
    return total
