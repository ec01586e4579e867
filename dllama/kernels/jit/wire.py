"""Activations on the wire between nodes as Q80 blocks (``--buffer-float-type q80``): the
jitted form of ``reference.q80_wire_encode``/``q80_wire_sum``. Serial: a node's part of one
block is a few kB, less than a thread launch costs."""
from __future__ import annotations

import numpy as np
from numba import njit

from dllama.kernels.jit.float16 import f16_table
from dllama.kernels.jit.quantize import _q80_block
from dllama.kernels.quants import BLOCK_SIZE, Q80_BLOCK


@njit(cache=True)
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


@njit(cache=True)
def _sum_into(data: np.ndarray, n_parts: int, table: np.ndarray, total: np.ndarray) -> None:
    """``total`` (flat float32) = the sum, in order, of ``n_parts`` parts of Q80 block bytes
    laid end to end in ``data``: one call for the whole all-gather."""
    n = total.shape[0]
    part_bytes = n // BLOCK_SIZE * (BLOCK_SIZE + 2)
    total[:] = 0.0
    for p in range(n_parts):
        base = p * part_bytes
        for b in range(n // BLOCK_SIZE):
            o = base + b * (BLOCK_SIZE + 2)
            d = table[np.uint16(data[o]) | (np.uint16(data[o + 1]) << 8)]
            for j in range(BLOCK_SIZE):
                total[b * BLOCK_SIZE + j] += np.float32(np.int8(data[o + 2 + j])) * d


def q80_wire_encode(x: np.ndarray) -> memoryview:
    """float32 values (a multiple of 32 per row) to their Q80 blocks' bytes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.size // BLOCK_SIZE * Q80_BLOCK.itemsize, dtype=np.uint8)
    _encode_into(x.reshape(-1), out)
    return out.data


def q80_wire_sum(parts: list, rows: int, dim: int) -> np.ndarray:
    """The sum, in the given order, of Q80 parts of ``rows x dim`` values (sizes already checked)."""
    total = np.empty((rows, dim), dtype=np.float32)
    _sum_into(np.frombuffer(b"".join(parts), dtype=np.uint8), len(parts), f16_table(), total.reshape(-1))
    return total
