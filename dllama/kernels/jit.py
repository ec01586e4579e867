"""numba kernels for every operation of the forward pass, checked against ``reference``.

The public functions here take and return what the reference functions do, so either can be
swapped in; the ``*_into`` kernels below them are what the fused blocks call from jitted code.
Threads come from ``prange`` (numba's thread count, set by ``--nthreads``).

Float16 values travel as their uint16 bits: numba has no float16 type. Conversions are done in
software (exact, round-to-nearest-even) or, in the SIMD kernels, by the CPU.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from numba import njit, prange
from numba.core.errors import NumbaPerformanceWarning
from numba.extending import overload

from dllama.kernels.backend import configure_imported_numba

configure_imported_numba()  # before any kernel below is defined

from dllama.kernels import simd
from dllama.kernels.packing import padded_rows
from dllama.kernels.quants import BLOCK_SIZE, Q40_BLOCK, Q80_BLOCK, FloatType
from dllama.kernels.simd import (
    GROUP_ROWS,
    Q40_RECORD,
    Q80_ACT_BYTES,
    Q80_CORR_LANES,
    TOKEN_TILE,
)

# Functions that only call parallel kernels are marked parallel too: a cached non-parallel
# caller of a cached parallel function can crash when loaded from the cache (numba issue 4807).
# numba warns that such functions have no loop of their own to parallelize; that is intended.
warnings.filterwarnings("ignore", message="(?s).*parallel=True", category=NumbaPerformanceWarning)

# Reassociation lets LLVM vectorize reductions; no 'nnan'/'ninf': -inf must stay -inf.
FAST = {"nsz", "arcp", "contract", "reassoc"}


# -- float16 ------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def f16_to_f32(bits: int) -> np.float32:
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0:
        value = mantissa * 5.9604644775390625e-08  # 2^-24: subnormals and zero
    elif exponent == 31:
        value = np.inf if mantissa == 0 else np.nan
    else:
        value = (1024 + mantissa) * 2.0 ** (exponent - 25)
    return np.float32(-value if bits & 0x8000 else value)


@njit(cache=True, inline="always")
def f64_to_f16(value: float) -> np.uint16:
    """Round a float64 to the nearest float16 (ties to even), as NumPy's astype does."""
    sign = 0x8000 if (value < 0 or (value == 0 and math.copysign(1.0, value) < 0)) else 0
    a = abs(value)
    if math.isnan(a):
        return np.uint16(0x7E00 | sign)
    if a >= 65520.0:  # halfway between the largest half (65504) and 2^16 rounds up to inf
        return np.uint16(0x7C00 | sign)
    if a < 6.103515625e-05:  # below 2^-14: subnormal, in units of 2^-24 (the product is exact)
        return np.uint16(sign | int(np.rint(a * 16777216.0)))
    m, e = math.frexp(a)  # a = m * 2^e, 0.5 <= m < 1
    mantissa = int(np.rint((2.0 * m - 1.0) * 1024.0))
    # A mantissa that rounds up to 1024 carries into the exponent by the addition.
    return np.uint16(sign | (((e - 1 + 15) << 10) + mantissa))


@njit(cache=True)
def _f16_table() -> np.ndarray:
    table = np.empty(65536, dtype=np.float32)
    for bits in range(65536):
        table[bits] = f16_to_f32(bits)
    return table


F16_TABLE = None  # built on first use: one float32 per float16 pattern (256 KiB)


def f16_table() -> np.ndarray:
    global F16_TABLE
    if F16_TABLE is None:
        F16_TABLE = _f16_table()
    return F16_TABLE


@njit(cache=True, parallel=True)
def _f16_decode(bits: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    for i in prange(bits.size):
        out[i] = table[bits[i]]


@njit(cache=True, parallel=True)
def _f16_encode(x: np.ndarray, out: np.ndarray) -> None:
    for i in prange(x.size):
        out[i] = f64_to_f16(np.float64(x[i]))


def to_float16(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.float16)
    _f16_encode(x.reshape(-1), out.reshape(-1).view(np.uint16))
    return out


def from_float16(h: np.ndarray) -> np.ndarray:
    h = np.ascontiguousarray(h, dtype=np.float16)
    out = np.empty(h.shape, dtype=np.float32)
    _f16_decode(h.reshape(-1).view(np.uint16), f16_table(), out.reshape(-1))
    return out


# -- Q40 / Q80 blocks ---------------------------------------------------------------------------
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


@njit(cache=True)
def q80_wire_encode(x: np.ndarray, out: np.ndarray) -> None:
    """Flat float32 ``x`` (a multiple of 32 values) to Q80 blocks as bytes (``Q80_BLOCK``'s
    layout: little-endian float16 scale, 32 int8) in ``out``. Serial: activations are small."""
    q = np.empty(BLOCK_SIZE, dtype=np.int8)
    for b in range(x.shape[0] // BLOCK_SIZE):
        d, _ = _q80_block(x[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE], q)
        o = b * (BLOCK_SIZE + 2)
        out[o] = np.uint8(d & 0xFF)
        out[o + 1] = np.uint8(d >> 8)
        for j in range(BLOCK_SIZE):
            out[o + 2 + j] = np.uint8(q[j] & 0xFF)


@njit(cache=True)
def q80_wire_sum(data: np.ndarray, n_parts: int, table: np.ndarray, total: np.ndarray) -> None:
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


# -- activations for the matrix products --------------------------------------------------------
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
    """x @ W.T for a weight packed by ``packing.pack``: the JIT form of ``Linear.__call__``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    q80 = bool(q80_input and float_type.is_quantized)
    if q80 and x.shape[1] % BLOCK_SIZE:
        raise ValueError("q80 activations need a multiple of 32 features")
    return product(packed, padded_rows(rows, float_type), x, q80, path, f16_table())[:, :rows]


# -- element-wise and per-token operations ------------------------------------------------------
@njit(cache=True, fastmath=FAST, inline="always")
def _rms_norm_row(x, weight, eps, out):
    n = x.shape[0]
    ss = np.float32(0.0)
    for j in range(n):
        ss += x[j] * x[j]
    scale = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
    for j in range(n):
        out[j] = (x[j] * scale) * weight[j]


@njit(cache=True, parallel=True, fastmath=FAST)
def _rms_norm_rows(x, weight, eps, out):
    for t in prange(x.shape[0]):
        _rms_norm_row(x[t], weight, eps, out[t])


@njit(cache=True, parallel=True)
def rms_norm_into(x, weight, eps, out):
    if x.shape[0] == 1:
        _rms_norm_row(x[0], weight, eps, out[0])
    else:
        _rms_norm_rows(x, weight, eps, out)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    rms_norm_into(flat, np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out)
    return out.reshape(x.shape)


@njit(cache=True, inline="always")
def _pow2(n):
    """2^n as float32 for -126 <= n <= 127."""
    return simd.f32_from_bits(np.int32((n + 127) << 23))


@njit(cache=True, inline="always", fastmath={"nsz", "contract"})
def expf(x):
    """e^x in float32 within 2 ulp, without a library call, so that loops calling it vectorize.

    Cephes' expf: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so n ln2 is exact), a degree-6
    polynomial for e^r, then a scale by 2^n in two halves so that subnormal results round once.
    """
    if x != x:
        return x
    if x > np.float32(88.72284):
        return np.float32(np.inf)
    if x < np.float32(-103.97208):
        return np.float32(0.0)
    n = np.floor(x * np.float32(1.442695040888963) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * (r * r) + r + np.float32(1.0)
    k = np.int32(n)
    half = k // 2
    return y * _pow2(half) * _pow2(k - half)


@njit(cache=True, inline="always")
def _silu(v):
    return v / (np.float32(1.0) + expf(-v))


@njit(cache=True, inline="always")
def _gelu(v):
    return np.float32(0.5) * v * (np.float32(1.0) + np.tanh(
        np.float32(0.7978845608028654) * (v + np.float32(0.044715) * v * v * v)))


@njit(cache=True)
def _map_activation(x, use_gelu, out):
    for i in range(x.size):
        out[i] = _gelu(x[i]) if use_gelu else _silu(x[i])


def _activate(x: np.ndarray, use_gelu: bool) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _map_activation(x.reshape(-1), use_gelu, out.reshape(-1))
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return _activate(x, False)


def gelu(x: np.ndarray) -> np.ndarray:
    return _activate(x, True)


@njit(cache=True, inline="always")
def _gated_row(gate_up, hidden, use_gelu, out):
    for j in range(hidden):
        g = gate_up[j]
        a = _gelu(g) if use_gelu else _silu(g)
        out[j] = a * gate_up[hidden + j]


@njit(cache=True, parallel=True)
def _gated_rows(gate_up, hidden, use_gelu, out):
    for t in prange(gate_up.shape[0]):
        _gated_row(gate_up[t], hidden, use_gelu, out[t])


@njit(cache=True, parallel=True)
def gated_into(gate_up, hidden, use_gelu, out):
    """The feed-forward's gated product act(gate) * up; gate_up holds [gate | up] per token."""
    if gate_up.shape[0] == 1:
        _gated_row(gate_up[0], hidden, use_gelu, out[0])
    else:
        _gated_rows(gate_up, hidden, use_gelu, out)


def swiglu(gate: np.ndarray, up: np.ndarray, use_gelu: bool = False) -> np.ndarray:
    gate = np.ascontiguousarray(gate, dtype=np.float32)
    joined = np.concatenate([gate.reshape(-1, gate.shape[-1]), np.asarray(up, np.float32).reshape(-1, gate.shape[-1])],
                            axis=1)
    out = np.empty((joined.shape[0], gate.shape[-1]), dtype=np.float32)
    gated_into(joined, gate.shape[-1], use_gelu, out)
    return out.reshape(gate.shape)


@njit(cache=True, fastmath={"nsz", "arcp", "contract"})
def softmax_into(x, out):
    for t in range(x.shape[0]):
        m = np.float32(-np.inf)  # float32 like x: a float64 x - m would round differently
        for j in range(x.shape[1]):
            m = max(m, x[t, j])
        total = np.float32(0.0)
        for j in range(x.shape[1]):
            e = expf(x[t, j] - m)
            out[t, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(x.shape[1]):
            out[t, j] *= inv


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    softmax_into(flat, out)
    return np.moveaxis(out.reshape(x.shape), -1, axis)


@njit(cache=True)
def rope_into(x, cos, sin, falcon):
    """Rotate x [T, heads, head_dim] in place by the angles of each token's row of cos/sin."""
    half = x.shape[2] // 2
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(half):
                c = cos[t, i]
                s = sin[t, i]
                a = 2 * i if not falcon else i
                b = 2 * i + 1 if not falcon else i + half
                x0 = x[t, h, a]
                x1 = x[t, h, b]
                x[t, h, a] = x0 * c - x1 * s
                x[t, h, b] = x0 * s + x1 * c


def _rope(x, cos, sin, falcon):
    out = np.array(x, dtype=np.float32, order="C")
    rope_into(out, np.ascontiguousarray(cos, dtype=np.float32), np.ascontiguousarray(sin, dtype=np.float32), falcon)
    return out


def rope_llama(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    return _rope(x, cos, sin, False)


def rope_falcon(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    return _rope(x, cos, sin, True)


@njit(cache=True, fastmath=FAST)
def _attend(qs, k_cache, v_cache, kv, end, scale, scores, out):
    """The queries ``qs`` [group, D] of one token that share KV head ``kv``, against cache
    positions 0..end-1; ``out`` [group, D]. Each cache row is read once for the whole group,
    in passes that LLVM vectorizes (a function of its own: inside the parallel loop's body it
    does not)."""
    group, head_dim = qs.shape
    for s in range(end):
        kr = k_cache[s, kv]
        for g in range(group):
            dot = np.float32(0.0)
            for d in range(head_dim):
                dot += qs[g, d] * kr[d]
            scores[g, s] = dot * scale
    acc = np.zeros((group, head_dim), dtype=np.float32)  # local sums: stores to out block vectors
    totals = np.empty(group, dtype=np.float32)
    for g in range(group):
        m = np.float32(-np.inf)
        for s in range(end):
            m = max(m, scores[g, s])
        total = np.float32(0.0)
        for s in range(end):
            e = expf(scores[g, s] - m)
            scores[g, s] = e
            total += e
        totals[g] = total
    for s in range(end):
        vr = v_cache[s, kv]
        for g in range(group):
            e = scores[g, s]
            for d in range(head_dim):
                acc[g, d] += e * vr[d]
    for g in range(group):
        inv = np.float32(1.0) / totals[g]
        for d in range(head_dim):
            out[g, d] = acc[g, d] * inv


@njit(cache=True, parallel=True)
def attention_into(q, k_cache, v_cache, pos, out, group, head_offset):
    """Causal GQA over the cache; q [T, heads, D], caches [S, kv_heads, D], out [T, heads * D].
    Query head h reads KV head (h + head_offset) // group, as in the reference."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    # Scratch for every (token, KV head) item, allocated once rather than once per item.
    all_scores = np.empty((n_tokens * n_kv, group, pos + n_tokens), dtype=np.float32)
    heads_out = out.reshape(n_tokens, n_heads, head_dim)
    for item in prange(n_tokens * n_kv):
        t = item // n_kv
        kv = item % n_kv
        first = max(0, kv * group - head_offset)
        last = min(n_heads, (kv + 1) * group - head_offset)
        if first < last:
            _attend(q[t, first:last], k_cache, v_cache, kv, pos + t + 1, scale, all_scores[item],
                    heads_out[t, first:last])


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int,
              group: int = 0, head_offset: int = 0) -> np.ndarray:
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=np.float32)
    group = group or q.shape[1] // k_cache.shape[1]
    attention_into(q, np.ascontiguousarray(k_cache, dtype=np.float32), np.ascontiguousarray(v_cache, dtype=np.float32),
                   pos, out, group, head_offset)
    return out


@njit(cache=True)
def embedding_into(table, tokens, out):
    for t in range(tokens.shape[0]):
        out[t, :] = table[tokens[t], :]


def embedding(table: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    out = np.empty((tokens.shape[0], table.shape[1]), dtype=np.float32)
    embedding_into(table, tokens, out)
    return out


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w.T for dense float32 weights."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    _linear_f32(np.ascontiguousarray(w, dtype=np.float32), x, out)
    return out


# -- sampling helpers ---------------------------------------------------------------------------
@njit(cache=True)
def argmax(logits: np.ndarray) -> int:
    """Index of the largest value, the first one on ties (as np.argmax)."""
    best = 0
    for i in range(1, logits.shape[0]):
        if logits[i] > logits[best]:
            best = i
    return best


@njit(cache=True)
def sample_topp(logits: np.ndarray, temperature: float, topp: float, coin: float) -> int:
    """Temperature + nucleus sampling with a uniform ``coin`` in [0, 1); see sampler.sample_topp."""
    n = logits.shape[0]
    z_max = -np.inf
    for i in range(n):
        z_max = max(z_max, np.float64(logits[i]) / temperature)
    weights = np.empty(n, dtype=np.float64)
    for i in range(n):
        weights[i] = math.exp(np.float64(logits[i]) / temperature - z_max)
    total = 0.0
    for i in range(n):
        total += weights[i]
    if topp >= 1.0:
        target = coin * total
        acc = 0.0
        for i in range(n):
            acc += weights[i]
            if acc > target:
                return i
        return n - 1
    # Only tokens above this weight can belong to the nucleus: while at least one token is
    # heavier, the n - 1 or fewer lighter ones weigh less than (1 - topp) of the total together.
    cutoff = (1.0 - topp) / (n - 1) * total if n > 1 else 0.0
    count = 0
    for i in range(n):
        if weights[i] >= cutoff:
            count += 1
    if count == 0:  # near-uniform weights and topp < 1/n: no token passes, so all are candidates
        cutoff = 0.0
        count = n
    candidates = np.empty(count, dtype=np.int64)
    k = 0
    for i in range(n):
        if weights[i] >= cutoff:
            candidates[k] = i
            k += 1
    order = candidates[np.argsort(-weights[candidates], kind="mergesort")]
    cumulative = np.empty(count, dtype=np.float64)
    acc = 0.0
    for i in range(count):
        acc += weights[order[i]]
        cumulative[i] = acc
    keep = min(int(np.searchsorted(cumulative, topp * total, side="right")) + 1, count)
    chosen = int(np.searchsorted(cumulative[:keep], coin * cumulative[keep - 1], side="right"))
    return int(order[min(chosen, keep - 1)])
