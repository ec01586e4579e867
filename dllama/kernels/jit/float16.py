"""Float16 in jitted code. numba has no float16 type, so float16 values travel as their uint16
bits; conversions are done in software (exact, round-to-nearest-even) or, in the SIMD kernels,
by the CPU."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True, parallel=True)
def _f16_decode(bits: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    for i in prange(bits.size):
        out[i] = table[bits[i]]


@njit(cache=True, nogil=True, parallel=True)
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
