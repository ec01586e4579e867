"""Q40 and Q80 blocks (``kernels.quants`` defines them) in jitted code, and the Q80 form of the
activations that the int8 matrix products read."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from dllama.kernels.jit.float16 import f16_table, f64_to_f16
from dllama.kernels.jit.simd import Q80_ACT_BYTES, Q80_CORR_LANES
from dllama.kernels.quants import BLOCK_SIZE, Q40_BLOCK, Q40_SEARCH_LEVELS, Q80_BLOCK, q40_block_importance


@njit(cache=True, nogil=True, inline="always")
def _q40_max_abs_block(x: np.ndarray, qs: np.ndarray) -> np.uint16:
    """ggml's rounding of 32 values into qs [16], float64 inside; returns the scale's float16 bits."""
    gmax = -np.inf
    gmin = np.inf
    for j in range(BLOCK_SIZE):
        v = np.float64(x[j])
        gmax = max(gmax, v)
        gmin = min(gmin, v)
    d = (gmin if -gmin > gmax else gmax) / -8.0
    inv_d = 1.0 / d if d != 0 else 0.0
    for j in range(16):
        lo = np.uint8(np.int8(min(np.float64(x[j]) * inv_d + 8.5, 15.0)))
        hi = np.uint8(np.int8(min(np.float64(x[j + 16]) * inv_d + 8.5, 15.0)))
        qs[j] = (lo & 0xF) | ((hi & 0xF) << 4)
    return f64_to_f16(d)


@njit(cache=True, nogil=True, inline="always")
def _q40_block_error(x: np.ndarray, w: np.ndarray, bits: int, qs: np.ndarray, table: np.ndarray) -> float:
    """quants.q40_block_errors for one block."""
    d = np.float64(table[bits])
    err = 0.0
    for j in range(BLOCK_SIZE):
        nibble = qs[j] & 0xF if j < 16 else qs[j - 16] >> 4
        diff = np.float64(x[j]) - d * (np.float64(nibble) - 8.0)
        err += w[j] * (diff * diff)
    return err


@njit(cache=True, nogil=True, inline="always")
def _q40_search_block(x: np.ndarray, bits: int, qs: np.ndarray, importance: np.ndarray, w: np.ndarray,
                      candidate: np.ndarray, table: np.ndarray, levels: np.ndarray) -> int:
    """quants._search_q40 for one max-abs block (bits, qs) and its columns' importance [32]:
    the better block's scale bits, its levels written into qs, or the old bits with qs
    untouched. w and candidate are scratch."""
    gmax = -np.inf
    gmin = np.inf
    sumx2 = 0.0
    for j in range(BLOCK_SIZE):
        v = np.float64(x[j])
        gmax = max(gmax, v)
        gmin = min(gmin, v)
        sumx2 += v * v
    vmax = gmin if -gmin > gmax else gmax
    sigma2 = sumx2 / BLOCK_SIZE
    swx2 = 0.0
    for j in range(BLOCK_SIZE):
        v = np.float64(x[j])
        w[j] = importance[j] * math.sqrt(sigma2 + v * v)
        swx2 += w[j] * v * v
    if vmax == 0 or not math.isfinite(swx2):
        return bits
    best = np.inf
    best_d = 0.0
    for c in range(levels.shape[0]):
        iscale = levels[c] / vmax
        sumlx = 0.0
        suml2 = 0.0
        for j in range(BLOCK_SIZE):
            v = np.float64(x[j])
            level = min(max(np.floor(iscale * v + 0.5), -8.0), 7.0)
            sumlx += w[j] * v * level
            suml2 += w[j] * level * level
        if suml2 == 0:
            continue
        d = np.float64(table[f64_to_f16(sumlx / suml2)])
        err = swx2 - 2.0 * d * sumlx + d * d * suml2
        if d != 0 and err < best:
            best = err
            best_d = d
    if best == np.inf:
        return bits
    inv = 1.0 / best_d
    for j in range(16):
        lo = min(max(np.floor(np.float64(x[j]) * inv + 8.5), 0.0), 15.0)
        hi = min(max(np.floor(np.float64(x[j + 16]) * inv + 8.5), 0.0), 15.0)
        candidate[j] = np.uint8(lo) | (np.uint8(hi) << 4)
    new_bits = f64_to_f16(best_d)
    if _q40_block_error(x, w, new_bits, candidate, table) < _q40_block_error(x, w, bits, qs, table):
        qs[:] = candidate
        return new_bits
    return bits


_Q40_CHUNK = 256  # blocks per parallel task: their scratch is allocated once


@njit(cache=True, nogil=True, parallel=True)
def _quantize_q40(x: np.ndarray, d_bits: np.ndarray, qs: np.ndarray, table: np.ndarray,
                  levels: np.ndarray, importance: np.ndarray) -> None:
    """x [blocks, 32] -> d_bits [blocks], qs [blocks, 16]: quants.quantize_q40, byte for byte.
    Block b's columns weigh importance[b % len(importance)] ([blocks per row, 32]; all ones is
    the unweighted search: multiplying by 1.0 changes no bit)."""
    n = x.shape[0]
    per_row = importance.shape[0]
    for chunk in prange((n + _Q40_CHUNK - 1) // _Q40_CHUNK):
        w = np.empty(BLOCK_SIZE)
        candidate = np.empty(16, dtype=np.uint8)
        for b in range(chunk * _Q40_CHUNK, min(n, (chunk + 1) * _Q40_CHUNK)):
            bits = _q40_max_abs_block(x[b], qs[b])
            d_bits[b] = _q40_search_block(x[b], bits, qs[b], importance[b % per_row], w, candidate, table, levels)


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True, parallel=True)
def _quantize_q80(x: np.ndarray, d_bits: np.ndarray, qs: np.ndarray) -> None:
    for b in prange(x.shape[0]):
        d_bits[b], _ = _q80_block(x[b], qs[b])



@njit(cache=True, nogil=True, parallel=True)
def _dequantize_q40(d_bits: np.ndarray, qs: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    for b in prange(qs.shape[0]):
        d = table[d_bits[b]]
        for j in range(16):
            out[b, j] = np.float32(np.int32(qs[b, j] & 0xF) - 8) * d
            out[b, j + 16] = np.float32(np.int32(qs[b, j] >> 4) - 8) * d


@njit(cache=True, nogil=True, parallel=True)
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


def quantize_q40(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """quants.quantize_q40 (the scale search, weighted by ``importance`` per column), byte for
    byte, on numba's threads."""
    table = f16_table()
    imp = q40_block_importance(importance, np.shape(x)[-1])
    imp = np.ones((1, BLOCK_SIZE)) if imp is None else np.ascontiguousarray(imp)
    return _quantize(x, Q40_BLOCK,
                     lambda g, d_bits, qs: _quantize_q40(g, d_bits, qs, table, Q40_SEARCH_LEVELS, imp))


def quantize_q80(x: np.ndarray) -> np.ndarray:
    return _quantize(x, Q80_BLOCK, _quantize_q80)


def dequantize_q40(blocks: np.ndarray) -> np.ndarray:
    return _dequantize(blocks, _dequantize_q40)


def dequantize_q80(blocks: np.ndarray) -> np.ndarray:
    return _dequantize(blocks, _dequantize_q80)


def round_trip_q80(x: np.ndarray) -> np.ndarray:
    return dequantize_q80(quantize_q80(x))


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True, parallel=True)
def _quantize_activation_rows(x, xq, xd, xc, table):
    for t in prange(x.shape[0]):
        _quantize_activation_row(x[t], xq[t], xd[t], xc[t], table)


@njit(cache=True, nogil=True, parallel=True)
def quantize_activation(x: np.ndarray, xq: np.ndarray, xd: np.ndarray, xc: np.ndarray,
                        table: np.ndarray) -> None:
    """x [T, n] to Q80 for the int8 products: values xq [T, n/32 * Q80_ACT_BYTES] (each half of
    a block twice, see simd), float32 scales xd [T, n/32] and correction lanes xc
    [T, n/32 * Q80_CORR_LANES] (-8 * sum of each block's values in lanes 0 and 4)."""
    if x.shape[0] == 1:  # decoding: not worth a thread launch
        _quantize_activation_row(x[0], xq[0], xd[0], xc[0], table)
    else:
        _quantize_activation_rows(x, xq, xd, xc, table)
