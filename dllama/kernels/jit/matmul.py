"""Matrix products ``x @ W.T`` with weights in their packed layouts (``packing``), for every
weight type: int8 dot products (Q40 and Q80 weights against Q80 activations) or float ones, all
in vector code that takes the SIMD ``path`` (``simd``, ``simd_float``)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from dllama.kernels.backend import cpu_path
from dllama.kernels.jit import FAST, simd, simd_float
from dllama.kernels.jit.float16 import f16_table
from dllama.kernels.jit.packing import padded_rows
from dllama.kernels.jit.quantize import quantize_activation
from dllama.kernels.jit.simd import GROUP_ROWS, Q80_ACT_BYTES, Q80_CORR_LANES, TOKEN_TILE
from dllama.kernels.quants import BLOCK_SIZE, FloatType

# Weight bytes a thread multiplies by one tile of tokens before moving on: the chunk and the
# tile's activations (~7 KB for 4 tokens of 576 values) then stay in the 32-48 KB L1 cache.
CHUNK_BYTES = 16384


@njit(cache=True, nogil=True, parallel=True)
def _linear_int8(w, xq, xd, xc, out, path):
    """Packed Q40 or Q80 weights [groups, blocks, record] against Q80 activations."""
    groups, nb, record = w.shape
    n_tokens = xq.shape[0]
    flat = w.reshape(-1)
    chunk = max(1, CHUNK_BYTES // (nb * record))
    for c in prange((groups + chunk - 1) // chunk):
        g_end = min(groups, (c + 1) * chunk)
        # Tiles of tokens share each load of a group's weights (prefill, batched decode).
        t = 0
        if path == simd.PATH_AVX512:
            while t + 8 <= n_tokens:
                for g in range(c * chunk, g_end):
                    simd.int8_tile8(flat, g * nb * record, xq, xd, xc, t, nb, out, g * GROUP_ROWS, path)
                t += 8
        while t + TOKEN_TILE <= n_tokens:
            for g in range(c * chunk, g_end):
                simd.int8_tile4(flat, g * nb * record, xq, xd, xc, t, nb, out, g * GROUP_ROWS, path)
            t += TOKEN_TILE
        # The last 1 to 3 tokens (2 or 3 requests decoding together) in one pass too.
        if n_tokens - t == 3:
            for g in range(c * chunk, g_end):
                simd.int8_tile3(flat, g * nb * record, xq, xd, xc, t, nb, out, g * GROUP_ROWS, path)
        elif n_tokens - t == 2:
            for g in range(c * chunk, g_end):
                simd.int8_tile2(flat, g * nb * record, xq, xd, xc, t, nb, out, g * GROUP_ROWS, path)
        elif n_tokens - t == 1:
            for g in range(c * chunk, g_end):
                simd.int8_tile1(flat, g * nb * record, xq, xd, xc, t, nb, out, g * GROUP_ROWS, path)


@njit(cache=True, nogil=True, parallel=True)
def _linear_grouped_f32(w, x, out, path):
    """Packed Q40 or Q80 weights against float32 activations."""
    groups, nb, record = w.shape
    n_tokens = x.shape[0]
    flat = w.reshape(-1)
    chunk = max(1, CHUNK_BYTES // (nb * record))
    for c in prange((groups + chunk - 1) // chunk):
        g_end = min(groups, (c + 1) * chunk)
        t = 0
        while t + simd.F32_TOKEN_TILE <= n_tokens:
            for g in range(c * chunk, g_end):
                simd.grouped_f32_tile2(flat, g * nb * record, x, t, nb, out, g * GROUP_ROWS, path)
            t += simd.F32_TOKEN_TILE
        while t < n_tokens:
            for g in range(c * chunk, g_end):
                simd.grouped_f32_tile1(flat, g * nb * record, x, t, nb, out, g * GROUP_ROWS, path)
            t += 1


def _weight_value(w, r, j, table):
    """The float32 value of w[r, j], for F16 bits (through ``table``) or F32 weights."""


@overload(_weight_value, jit_options={"cache": True})
def _weight_value_impl(w, r, j, table):
    if str(w.dtype) == "uint16":
        return lambda w, r, j, table: table[w[r, j]]
    return lambda w, r, j, table: w[r, j]


@njit(cache=True, nogil=True, fastmath=FAST, inline="always")
def _float_tail(w, r, x, t, start, table):
    """The last values of a row past its whole blocks (weights whose width is no multiple of 32)."""
    s = np.float32(0.0)
    for j in range(start, w.shape[1]):
        s += _weight_value(w, r, j, table) * x[t, j]
    return s


@njit(cache=True, nogil=True, parallel=True)
def _linear_float(w, x, out, path, table):
    """F16 (uint16 bits) or F32 weights in their stored rows."""
    rows, n = w.shape
    n_tokens = x.shape[0]
    nblocks = n // simd_float.BLOCK
    tail = nblocks * simd_float.BLOCK
    chunk = max(2, CHUNK_BYTES // (n * w.itemsize) // 2 * 2)  # whole pairs of rows
    for c in prange((rows + chunk - 1) // chunk):
        r_end = min(rows, (c + 1) * chunk)
        t = 0
        while t + 4 <= n_tokens:
            for r in range(c * chunk, r_end):
                simd_float.float_row_tile4(w, r, x, t, nblocks, out, path)
            t += 4
        while t < n_tokens:  # two rows at a time; a row's sums are the same either way
            r = c * chunk
            while r + 2 <= r_end:
                simd_float.float_rows2_tile1(w, r, x, t, nblocks, out, path)
                r += 2
            if r < r_end:
                simd_float.float_row_tile1(w, r, x, t, nblocks, out, path)
            t += 1
        if tail < n:
            for t in range(n_tokens):
                for r in range(c * chunk, r_end):
                    out[t, r] += _float_tail(w, r, x, t, tail, table)


def linear_into(w, x, xq, xd, xc, table, q80, out, path):
    """out[T, padded rows] = x @ W.T for a packed weight ``w`` (a tuple, see ``packing``).

    With ``q80`` true, quantized weights use the Q80 activation ``xq, xd, xc`` (prepared once
    by ``quantize_activation`` for every product that shares the input), else the float32 ``x``.
    """


@overload(linear_into, jit_options={"cache": True, "parallel": True})
def _linear_into(w, x, xq, xd, xc, table, q80, out, path):
    first = w.types[0] if hasattr(w, "types") else w.dtype
    if first.ndim == 3:  # Q40 (uint8 records) or Q80 (int8)
        def impl(w, x, xq, xd, xc, table, q80, out, path):
            if q80:
                _linear_int8(w[0], xq, xd, xc, out, path)
            else:
                _linear_grouped_f32(w[0], x, out, path)
        return impl

    def impl(w, x, xq, xd, xc, table, q80, out, path):  # F16, F32
        _linear_float(w[0], x, out, path, table)
    return impl


@njit(cache=True, nogil=True, parallel=True)
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


@njit(cache=True, nogil=True, parallel=True)
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
    _linear_float(np.ascontiguousarray(w, dtype=np.float32), x, out, cpu_path(), f16_table())
    return out
