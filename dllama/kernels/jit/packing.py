"""Weight layouts for the JIT kernels, made once at load time from the stored blocks.

- Q40: ``GROUP_ROWS`` rows interleaved block by block (see ``simd``), rows padded with zero
  blocks up to a whole group, so a kernel reads one contiguous run per row group and never
  needs a tail case. The output of a product therefore has ``padded_rows`` entries.
- Q80: ``GROUP_ROWS`` rows interleaved block by block likewise (the record is in ``simd``), in
  an int8 array: its type tells it from Q40's uint8.
- F16: the stored bits as uint16, F32: the stored floats; no copy.

A packed weight is a tuple of one array, so jitted code can tell the layouts apart by type.
"""
from __future__ import annotations

import numpy as np

from dllama.kernels.quants import BLOCK_SIZE, Q40_BLOCK, Q80_BLOCK, FloatType
from dllama.kernels.jit.simd import GROUP_ROWS, Q40_RECORD, Q80_RECORD


def padded_rows(rows: int, float_type: FloatType) -> int:
    """Entries of a product's output: quantized rows come in whole groups."""
    if float_type.is_quantized:
        return -(-rows // GROUP_ROWS) * GROUP_ROWS
    return rows


def pack_q40(blocks: np.ndarray) -> np.ndarray:
    """Q40 blocks ``[rows, blocks]`` to ``[row groups, blocks, Q40_RECORD]`` bytes."""
    rows, nb = blocks.shape
    groups = -(-rows // GROUP_ROWS)
    padded = np.zeros((groups * GROUP_ROWS, nb), dtype=Q40_BLOCK)
    padded[:rows] = blocks
    by_block = padded.reshape(groups, GROUP_ROWS, nb).transpose(0, 2, 1)  # [groups, blocks, rows]
    out = np.empty((groups, nb, Q40_RECORD), dtype=np.uint8)
    out[:, :, :2 * GROUP_ROWS] = np.ascontiguousarray(by_block["d"]).view(np.uint8).reshape(groups, nb, -1)
    out[:, :, 2 * GROUP_ROWS:] = np.ascontiguousarray(by_block["qs"]).reshape(groups, nb, -1)
    return out


def pack_q80(blocks: np.ndarray) -> np.ndarray:
    """Q80 blocks ``[rows, blocks]`` to ``[row groups, blocks, Q80_RECORD]`` int8 bytes."""
    rows, nb = blocks.shape
    groups = -(-rows // GROUP_ROWS)
    padded = np.zeros((groups * GROUP_ROWS, nb), dtype=Q80_BLOCK)
    padded[:rows] = blocks
    by_block = padded.reshape(groups, GROUP_ROWS, nb).transpose(0, 2, 1)  # [groups, blocks, rows]
    out = np.empty((groups, nb, Q80_RECORD), dtype=np.int8)
    out[:, :, :2 * GROUP_ROWS] = np.ascontiguousarray(by_block["d"]).view(np.int8).reshape(groups, nb, -1)
    # [groups, blocks, rows, half, 16] -> [groups, blocks, half, rows, 16]: values 0-15, then 16-31
    qs = by_block["qs"].reshape(groups, nb, GROUP_ROWS, 2, BLOCK_SIZE // 2).transpose(0, 1, 3, 2, 4)
    out[:, :, 2 * GROUP_ROWS:] = qs.reshape(groups, nb, -1)
    return out


def pack(stored: np.ndarray, float_type: FloatType) -> tuple[np.ndarray, ...]:
    """Stored elements ``[rows, elements]`` of a weight to its kernel layout."""
    if float_type == FloatType.Q40:
        return (pack_q40(np.asarray(stored)),)
    if float_type == FloatType.Q80:
        return (pack_q80(np.asarray(stored)),)
    if float_type == FloatType.F16:
        return (np.ascontiguousarray(stored).view(np.uint16),)
    return (np.ascontiguousarray(stored, dtype=np.float32),)


def pack_rows(parts: list[np.ndarray], float_type: FloatType) -> tuple[np.ndarray, ...]:
    """Several weights with the same input width stacked by rows (q, k and v; w1 and w3) and
    packed as one, so one kernel launch computes them all. One part is packed as it is (for F32
    and F16 weights: the memory map itself, no copy)."""
    if len(parts) == 1:
        return pack(parts[0], float_type)
    return pack(np.concatenate([np.asarray(p) for p in parts], axis=0), float_type)

