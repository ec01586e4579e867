"""Q40 and Q80 blocks (``kernels.quants`` defines them) in jitted code, and the Q80 form of the
activations that the int8 matrix products read."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from dllama.kernels.jit.float16 import f16_table, f64_to_f16
from dllama.kernels.jit.simd import Q80_ACT_BYTES, Q80_CORR_LANES
from dllama.kernels.quants import BLOCK_SIZE, Q40_BLOCK, Q80_BLOCK


@njit(cache=True, parallel=True)
def _quantize_q40(x: np.ndarray, d_bits: np.ndarray, qs: np.ndarray) -> None:
    """x [blocks, 32] -> d_bits [blocks], qs [blocks, 16]; ggml's rounding, float64 inside."""
    for b in prange(x.shape[0]):
        gmax = -np.inf
        gmin = np.inf
        for j in range(BLOCK_SIZE):
            v = np.float64(x[b, j])
            gmax = max(gmax, v)
            gmin = min(gmin, v)
        d = (gmin if -gmin > gmax else gmax) / -8.0
        inv_d = 1.0 / d if d != 0 else 0.0
        d_bits[b] = f64_to_f16(d)
        for j in range(16):
            lo = np.uint8(np.int8(min(np.float64(x[b, j]) * inv_d + 8.5, 15.0)))
            hi = np.uint8(np.int8(min(np.float64(x[b, j + 16]) * inv_d + 8.5, 15.0)))
            qs[b, j] = (lo & 0xF) | ((hi & 0xF) << 4)


@njit(cache=True, inline="always")
def _q80_block(x: np.ndarray, q: np.ndarray) -> tuple[np.uint16, int]:
    """Quantize 32 values into q; returns the scale's float16 bits and the sum of q."""
    amax = 0.0
    for j in range(BLOCK_SIZE):
        amax = max(amax, abs(np.float64(x[j])))
    d = amax / 127.0
    inv_d = 1.0 / d if d != 0 else 0.0
    total = 0
    for j in range(BLOCK_SIZE):
        scaled = np.float64(x[j]) * inv_d
        v = int(math.trunc(scaled + math.copysign(0.5, scaled)))
        v = min(max(v, -127), 127)
        q[j] = v
        total += v
    return f64_to_f16(d), total


@njit(cache=True, parallel=True)
def _quantize_q80(x: np.ndarray, d_bits: np.ndarray, qs: np.ndarray) -> None:
    for b in prange(x.shape[0]):
        d_bits[b], _ = _q80_block(x[b], qs[b])



@njit(cache=True, parallel=True)
def _dequantize_q40(d_bits: np.ndarray, qs: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    for b in prange(qs.shape[0]):
        d = table[d_bits[b]]
        for j in range(16):
            out[b, j] = np.float32(np.int32(qs[b, j] & 0xF) - 8) * d
            out[b, j + 16] = np.float32(np.int32(qs[b, j] >> 4) - 8) * d


@njit(cache=True, parallel=True)
def _dequantize_q80(d_bits: np.ndarray, qs: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    for b in prange(qs.shape[0]):
        d = table[d_bits[b]]
        for j in range(BLOCK_SIZE):
            out[b, j] = np.float32(qs[b, j]) * d


def _blocks_of(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"the last axis must be a multiple of {BLOCK_SIZE}, got {x.shape[-1]}")
    return x.reshape(-1, BLOCK_SIZE)


def _quantize(x: np.ndarray, block: np.dtype, kernel) -> np.ndarray:
    groups = _blocks_of(x)
    d_bits = np.empty(groups.shape[0], dtype=np.uint16)
    qs = np.empty((groups.shape[0],) + block["qs"].shape, dtype=block["qs"].base)
    kernel(groups, d_bits, qs)
    out = np.empty(groups.shape[0], dtype=block)
    out["d"] = d_bits.view(np.float16)
    out["qs"] = qs
    return out.reshape(np.shape(x)[:-1] + (np.shape(x)[-1] // BLOCK_SIZE,))


def _dequantize(blocks: np.ndarray, kernel) -> np.ndarray:
    flat = np.ascontiguousarray(blocks).reshape(-1)
    out = np.empty((flat.shape[0], BLOCK_SIZE), dtype=np.float32)
    kernel(np.ascontiguousarray(flat["d"]).view(np.uint16), np.ascontiguousarray(flat["qs"]), f16_table(), out)
    return out.reshape(blocks.shape[:-1] + (blocks.shape[-1] * BLOCK_SIZE,))


def quantize_q40(x: np.ndarray) -> np.ndarray:
    return _quantize(x, Q40_BLOCK, _quantize_q40)


def quantize_q80(x: np.ndarray) -> np.ndarray:
    return _quantize(x, Q80_BLOCK, _quantize_q80)


def dequantize_q40(blocks: np.ndarray) -> np.ndarray:
    return _dequantize(blocks, _dequantize_q40)


def dequantize_q80(blocks: np.ndarray) -> np.ndarray:
    return _dequantize(blocks, _dequantize_q80)


def round_trip_q80(x: np.ndarray) -> np.ndarray:
    return dequantize_q80(quantize_q80(x))


@njit(cache=True, inline="always")
def _quantize_activation_row(x, xq, xd, xc, table):
    q = np.empty(BLOCK_SIZE, dtype=np.int8)
    for b in range(x.shape[0] // BLOCK_SIZE):
        bits, total = _q80_block(x[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE], q)
        base = b * Q80_ACT_BYTES
        for j in range(16):
            xq[base + j] = q[j]
            xq[base + 16 + j] = q[j]
            xq[base + 32 + j] = q[16 + j]
            xq[base + 48 + j] = q[16 + j]
        xd[b] = table[bits]
        for lane in range(Q80_CORR_LANES):
            xc[b * Q80_CORR_LANES + lane] = -8 * total if lane % 4 == 0 else 0


@njit(cache=True, parallel=True)
def _quantize_activation_rows(x, xq, xd, xc, table):
    for t in prange(x.shape[0]):
        _quantize_activation_row(x[t], xq[t], xd[t], xc[t], table)


@njit(cache=True, parallel=True)
def quantize_activation(x: np.ndarray, xq: np.ndarray, xd: np.ndarray, xc: np.ndarray,
                        table: np.ndarray) -> None:
    """x [T, n] to Q80 for the int8 products: values xq [T, n/32 * Q80_ACT_BYTES] (each half of
    a block twice, see simd), float32 scales xd [T, n/32] and correction lanes xc
    [T, n/32 * Q80_CORR_LANES] (-8 * sum of each block's values in lanes 0 and 4)."""
    if x.shape[0] == 1:  # decoding: not worth a thread launch
        _quantize_activation_row(x[0], xq[0], xd[0], xc[0], table)
    else:
        _quantize_activation_rows(x, xq, xd, xc, table)
