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

from typing import Callable

import numpy as np

from dllama.kernels.quants import BLOCK_SIZE, Q40_BLOCK, Q80_BLOCK, FloatType
from dllama.kernels.jit.simd import GROUP_ROWS, Q40_RECORD, Q80_RECORD


def padded_rows(rows: int, float_type: FloatType) -> int:
    """Entries of a product's output: quantized rows come in whole groups."""
    if float_type.is_quantized:
        return -(-rows // GROUP_ROWS) * GROUP_ROWS
    return rows


# Rows repacked at a time: the temporaries stay a few MB whatever the weight's size, so that
# packing adds one layer's worth of memory at most to the stored copy it replaces.
CHUNK_ROWS = 1024


def _grouped(blocks: np.ndarray, record: int, dtype: str) -> np.ndarray:
    """A group of ``GROUP_ROWS`` rows of blocks ``[4 k, blocks]`` to its records, in ``dtype``."""
    groups, nb = blocks.shape[0] // GROUP_ROWS, blocks.shape[1]
    by_block = blocks.reshape(groups, GROUP_ROWS, nb).transpose(0, 2, 1)  # [groups, blocks, rows]
    out = np.empty((groups, nb, record), dtype=dtype)
    out[:, :, :2 * GROUP_ROWS] = np.ascontiguousarray(by_block["d"]).view(dtype).reshape(groups, nb, -1)
    qs = by_block["qs"]
    if qs.shape[-1] == BLOCK_SIZE:  # Q80: [.., rows, half, 16] -> [.., half, rows, 16]
        qs = qs.reshape(groups, nb, GROUP_ROWS, 2, BLOCK_SIZE // 2).transpose(0, 1, 3, 2, 4)
    out[:, :, 2 * GROUP_ROWS:] = qs.reshape(groups, nb, -1)
    return out


def _rows_of(parts: list[np.ndarray], lo: int, hi: int) -> list[np.ndarray]:
    """Rows lo..hi-1 of the parts stacked by rows, as views of the parts."""
    pieces, start = [], 0
    for p in parts:
        a, b = max(lo, start), min(hi, start + p.shape[0])
        if a < b:
            pieces.append(p[a - start:b - start])
        start += p.shape[0]
    return pieces


def pack_grouped(parts: list[np.ndarray], float_type: FloatType,
                 consumed: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Q40 or Q80 blocks ``[rows, blocks]`` (several weights stacked by rows) to
    ``[row groups, blocks, record]``, rows padded with zero blocks to whole groups.
    ``consumed`` is called with each run of stored rows once it is packed."""
    q40 = float_type == FloatType.Q40
    record, dtype, block = (Q40_RECORD, "u1", Q40_BLOCK) if q40 else (Q80_RECORD, "i1", Q80_BLOCK)
    rows, nb = sum(p.shape[0] for p in parts), parts[0].shape[1]
    groups = -(-rows // GROUP_ROWS)
    out = np.empty((groups, nb, record), dtype=dtype)
    for lo in range(0, rows, CHUNK_ROWS):
        hi = min(rows, lo + CHUNK_ROWS)
        chunk = np.zeros((-(-(hi - lo) // GROUP_ROWS) * GROUP_ROWS, nb), dtype=block)
        pieces = _rows_of(parts, lo, hi)
        chunk[:hi - lo] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
        out[lo // GROUP_ROWS:lo // GROUP_ROWS + chunk.shape[0] // GROUP_ROWS] = _grouped(chunk, record, dtype)
        if consumed is not None:
            for piece in pieces:
                consumed(piece)
    return out


def pack(stored: np.ndarray, float_type: FloatType) -> tuple[np.ndarray, ...]:
    """Stored elements ``[rows, elements]`` of a weight to its kernel layout."""
    return pack_rows([stored], float_type)


def pack_rows(parts: list[np.ndarray], float_type: FloatType,
              consumed: Callable[[np.ndarray], None] | None = None) -> tuple[np.ndarray, ...]:
    """Several weights with the same input width stacked by rows (q, k and v; w1 and w3) and
    packed as one, so one kernel launch computes them all. One F32 or F16 part is used as it
    is (for a memory-mapped file: the map itself, no copy). Stored rows that were copied are
    then passed to ``consumed``: quantized ones a chunk at a time, stacked float parts whole."""
    if float_type.is_quantized:
        return (pack_grouped(parts, float_type, consumed),)
    stacked = parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts], axis=0)
    if consumed is not None and len(parts) > 1:
        for p in parts:
            consumed(p)
    if float_type == FloatType.F16:
        return (np.ascontiguousarray(stacked).view(np.uint16),)
    return (np.ascontiguousarray(stacked, dtype=np.float32),)
