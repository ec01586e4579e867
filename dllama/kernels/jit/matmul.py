"""Matrix products ``x @ W.T`` with weights in their packed layouts (``packing``), for every
weight type: int8 dot products (Q40 and Q80 weights against Q80 activations) or float ones.
Q40 products take the SIMD ``path`` (``simd``); the others are plain loops that LLVM vectorizes."""
from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from dllama.kernels.jit import FAST, simd
from dllama.kernels.jit.float16 import f16_table
from dllama.kernels.jit.packing import padded_rows
from dllama.kernels.jit.quantize import quantize_activation
from dllama.kernels.jit.simd import GROUP_ROWS, Q40_RECORD, Q80_ACT_BYTES, Q80_CORR_LANES, TOKEN_TILE
from dllama.kernels.quants import BLOCK_SIZE, FloatType

# Weight bytes a thread multiplies by one tile of tokens before moving on: the chunk and the
# tile's activations (~7 KB for 4 tokens of 576 values) then stay in the 32-48 KB L1 cache.
CHUNK_BYTES = 16384


@njit(cache=True, parallel=True)
def _linear_q40_q80(w, xq, xd, xc, out, path):
    groups, nb = w.shape[0], w.shape[1]
    n_tokens = xq.shape[0]
    flat = w.reshape(-1)
    chunk = max(1, CHUNK_BYTES // (nb * Q40_RECORD))
    for c in prange((groups + chunk - 1) // chunk):
        g_end = min(groups, (c + 1) * chunk)
        # Tiles of tokens share each load of a group's weights (prefill); the rest one by one.
        t = 0
        if path == simd.PATH_AVX512:
            while t + 8 <= n_tokens:
                for g in range(c * chunk, g_end):
                    simd.q40_q80_tile8(flat, g * nb * Q40_RECORD, xq, xd, xc, t, nb, out, g * GROUP_ROWS, path)
                t += 8
        while t + TOKEN_TILE <= n_tokens:
            for g in range(c * chunk, g_end):
                simd.q40_q80_tile4(flat, g * nb * Q40_RECORD, xq, xd, xc, t, nb, out, g * GROUP_ROWS, path)
            t += TOKEN_TILE
        while t < n_tokens:
            for g in range(c * chunk, g_end):
                simd.q40_q80_tile1(flat, g * nb * Q40_RECORD, xq, xd, xc, t, nb, out, g * GROUP_ROWS, path)
            t += 1


@njit(cache=True, parallel=True)
def _linear_q40_f32(w, x, out, path):
    groups, nb = w.shape[0], w.shape[1]
    n_tokens = x.shape[0]
    flat = w.reshape(-1)
    chunk = max(1, CHUNK_BYTES // (nb * Q40_RECORD))
    for c in prange((groups + chunk - 1) // chunk):
        g_end = min(groups, (c + 1) * chunk)
        t = 0
        while t + simd.F32_TOKEN_TILE <= n_tokens:
            for g in range(c * chunk, g_end):
                simd.q40_f32_tile2(flat, g * nb * Q40_RECORD, x, t, nb, out, g * GROUP_ROWS, path)
            t += simd.F32_TOKEN_TILE
        while t < n_tokens:
            for g in range(c * chunk, g_end):
                simd.q40_f32_tile1(flat, g * nb * Q40_RECORD, x, t, nb, out, g * GROUP_ROWS, path)
            t += 1


@njit(cache=True, parallel=True, fastmath=FAST)
def _linear_q80_q80(qs, d, xq, xd, out):
    nb = d.shape[1]
    for r in prange(qs.shape[0]):
        for t in range(xq.shape[0]):
            acc = np.float32(0.0)
            for b in range(nb):
                isum = np.int32(0)
                for j in range(16):
                    isum += np.int32(qs[r, b * BLOCK_SIZE + j]) * np.int32(xq[t, b * Q80_ACT_BYTES + j])
                    isum += np.int32(qs[r, b * BLOCK_SIZE + 16 + j]) * np.int32(xq[t, b * Q80_ACT_BYTES + 32 + j])
                acc += np.float32(isum) * (d[r, b] * xd[t, b])
            out[t, r] = acc


@njit(cache=True, parallel=True, fastmath=FAST)
def _linear_q80_f32(qs, d, x, out):
    nb = d.shape[1]
    for r in prange(qs.shape[0]):
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            for b in range(nb):
                s = np.float32(0.0)
                for j in range(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE):
                    s += np.float32(qs[r, j]) * x[t, j]
                acc += s * d[r, b]
            out[t, r] = acc


@njit(cache=True, parallel=True, fastmath=FAST)
def _linear_f16(w, table, x, out):
    for r in prange(w.shape[0]):
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            for j in range(w.shape[1]):
                acc += table[w[r, j]] * x[t, j]
            out[t, r] = acc


@njit(cache=True, parallel=True, fastmath=FAST)
def _linear_f32(w, x, out):
    for r in prange(w.shape[0]):
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            for j in range(w.shape[1]):
                acc += w[r, j] * x[t, j]
            out[t, r] = acc


def linear_into(w, x, xq, xd, xc, table, q80, out, path):
    """out[T, padded rows] = x @ W.T for a packed weight ``w`` (a tuple, see ``packing``).

    With ``q80`` true, quantized weights use the Q80 activation ``xq, xd, xc`` (prepared once
    by ``quantize_activation`` for every product that shares the input), else the float32 ``x``.
    """


@overload(linear_into, jit_options={"cache": True, "parallel": True})
def _linear_into(w, x, xq, xd, xc, table, q80, out, path):
    first = w.types[0] if hasattr(w, "types") else w.dtype
    if len(w) == 1 and first.ndim == 3:  # Q40
        def impl(w, x, xq, xd, xc, table, q80, out, path):
            if q80:
                _linear_q40_q80(w[0], xq, xd, xc, out, path)
            else:
                _linear_q40_f32(w[0], x, out, path)
        return impl
    if len(w) == 2:  # Q80
        def impl(w, x, xq, xd, xc, table, q80, out, path):
            if q80:
                _linear_q80_q80(w[0], w[1], xq, xd, out)
            else:
                _linear_q80_f32(w[0], w[1], x, out)
        return impl
    if str(first.dtype) == "uint16":  # F16
        def impl(w, x, xq, xd, xc, table, q80, out, path):
            _linear_f16(w[0], table, x, out)
        return impl

    def impl(w, x, xq, xd, xc, table, q80, out, path):  # F32
        _linear_f32(w[0], x, out)
    return impl


@njit(cache=True, parallel=True)
def activation(x, q80, table):
    """x's Q80 form for the int8 products (empty arrays when the products take float32)."""
    n_tokens, n = x.shape
    nb = n // BLOCK_SIZE if q80 else 0
    xq = np.empty((n_tokens, nb * Q80_ACT_BYTES), dtype=np.int8)
    xd = np.empty((n_tokens, nb), dtype=np.float32)
    xc = np.empty((n_tokens, nb * Q80_CORR_LANES), dtype=np.int32)
    if q80:
        quantize_activation(x, xq, xd, xc, table)
    return xq, xd, xc


@njit(cache=True, parallel=True)
def product(w, width, x, q80, path, table):
    """x @ W.T into a new [T, width] array (width: the weight's padded rows)."""
    xq, xd, xc = activation(x, q80, table)
    out = np.empty((x.shape[0], width), dtype=np.float32)
    linear_into(w, x, xq, xd, xc, table, q80, out, path)
    return out


def linear(x: np.ndarray, packed: tuple[np.ndarray, ...], rows: int, float_type: FloatType, q80_input: bool,
           path: int) -> np.ndarray:
    """x @ W.T for a weight packed by ``packing.pack``: the JIT form of ``DenseWeights.matmul``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    q80 = bool(q80_input and float_type.is_quantized)
    if q80 and x.shape[1] % BLOCK_SIZE:
        raise ValueError("q80 activations need a multiple of 32 features")
    return product(packed, padded_rows(rows, float_type), x, q80, path, f16_table())[:, :rows]


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w.T for dense float32 weights."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    _linear_f32(np.ascontiguousarray(w, dtype=np.float32), x, out)
    return out
