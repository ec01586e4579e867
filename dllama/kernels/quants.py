"""Weight and activation formats: each block format is defined here once and used everywhere.

All quantized formats work on blocks of 32 consecutive values of a row (ggml's layout):

- ``Q40`` (ggml Q4_0), 18 bytes: float16 scale ``d``, then 16 bytes where byte ``j`` holds
  value ``j`` in its low nibble and value ``j + 16`` in its high nibble; value = (nibble - 8) * d.
- ``Q80`` (ggml Q8_0), 34 bytes: float16 scale ``d``, then 32 int8 ``q``; value = q * d.
- ``F16`` and ``F32``: plain little-endian IEEE floats.

Quantizers follow ggml's reference rounding so files match the ones distributed-llama writes.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

BLOCK_SIZE = 32

Q40_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK_SIZE // 2,))])
Q80_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK_SIZE,))])


class FloatType(IntEnum):
    """The weight/buffer type codes of distributed-llama's model header (key 13)."""

    F32 = 0
    F16 = 1
    Q40 = 2
    Q80 = 3

    @classmethod
    def parse(cls, name: str) -> "FloatType":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown float type {name!r} (use f32, f16, q40 or q80)") from None

    @property
    def is_quantized(self) -> bool:
        return self in (FloatType.Q40, FloatType.Q80)

    @property
    def element_dtype(self) -> np.dtype:
        """The numpy dtype of one stored element: a float, or a whole block of 32 values."""
        return {
            FloatType.F32: np.dtype("<f4"),
            FloatType.F16: np.dtype("<f2"),
            FloatType.Q40: Q40_BLOCK,
            FloatType.Q80: Q80_BLOCK,
        }[self]

    @property
    def values_per_element(self) -> int:
        return BLOCK_SIZE if self.is_quantized else 1

    def nbytes(self, n_values: int) -> int:
        """Bytes taken by ``n_values`` values; quantized types need whole blocks."""
        if self.is_quantized and n_values % BLOCK_SIZE:
            raise ValueError(f"{self.name} needs a multiple of {BLOCK_SIZE} values, got {n_values}")
        return n_values // self.values_per_element * self.element_dtype.itemsize


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """Quantize a float array whose last axis is a multiple of 32 into Q40 blocks.

    The result has the shape of ``x`` with the last axis divided by 32, dtype ``Q40_BLOCK``.
    """
    x = np.asarray(x, dtype=np.float32)
    # float64 inside: 1/d of a subnormal float32 scale would overflow to inf.
    groups = x.reshape(-1, BLOCK_SIZE).astype(np.float64)
    gmax = groups.max(axis=1)
    gmin = groups.min(axis=1)
    # The scale maps the value of largest magnitude to -8, keeping its sign, as ggml does.
    d = np.where(-gmin > gmax, gmin, gmax) / -8.0
    with np.errstate(divide="ignore"):
        inv_d = np.where(d != 0, 1.0 / d, 0.0)
    q = np.minimum(groups * inv_d[:, None] + 8.5, 15.0).astype(np.int8).astype(np.uint8)
    out = np.empty(groups.shape[0], dtype=Q40_BLOCK)
    out["d"] = d.astype(np.float16)
    out["qs"] = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    return out.reshape(x.shape[:-1] + (x.shape[-1] // BLOCK_SIZE,))


def dequantize_q40(blocks: np.ndarray) -> np.ndarray:
    """Q40 blocks (any leading shape) to float32 values; the last axis grows 32 times."""
    blocks = np.asarray(blocks)
    qs = blocks["qs"]
    low = (qs & 0xF).astype(np.int8) - 8
    high = (qs >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=-1).astype(np.float32)
    values *= blocks["d"].astype(np.float32)[..., None]
    return values.reshape(blocks.shape[:-1] + (blocks.shape[-1] * BLOCK_SIZE,))


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """Quantize a float array whose last axis is a multiple of 32 into Q80 blocks."""
    x = np.asarray(x, dtype=np.float32)
    groups = x.reshape(-1, BLOCK_SIZE).astype(np.float64)  # float64: see quantize_q40
    amax = np.abs(groups).max(axis=1)
    d = amax / 127.0
    with np.errstate(divide="ignore"):
        inv_d = np.where(d != 0, 1.0 / d, 0.0)
    out = np.empty(groups.shape[0], dtype=Q80_BLOCK)
    out["d"] = d.astype(np.float16)
    scaled = groups * inv_d[:, None]
    # Round half away from zero (C's roundf), as ggml and distributed-llama's kernels do.
    out["qs"] = np.clip(np.trunc(scaled + np.copysign(0.5, scaled)), -127, 127).astype(np.int8)
    return out.reshape(x.shape[:-1] + (x.shape[-1] // BLOCK_SIZE,))


def dequantize_q80(blocks: np.ndarray) -> np.ndarray:
    """Q80 blocks (any leading shape) to float32 values; the last axis grows 32 times."""
    blocks = np.asarray(blocks)
    values = blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[..., None]
    return values.reshape(blocks.shape[:-1] + (blocks.shape[-1] * BLOCK_SIZE,))


def to_float32(data: np.ndarray, float_type: FloatType) -> np.ndarray:
    """Stored elements of any type to float32 values (rows stay rows)."""
    if float_type == FloatType.F32:
        return np.asarray(data, dtype=np.float32)
    if float_type == FloatType.F16:
        return np.asarray(data).astype(np.float32)
    if float_type == FloatType.Q40:
        return dequantize_q40(data)
    return dequantize_q80(data)


def from_float32(x: np.ndarray, float_type: FloatType) -> np.ndarray:
    """Float values to stored elements of ``float_type`` (the inverse of ``to_float32``)."""
    if float_type == FloatType.F32:
        return np.ascontiguousarray(x, dtype="<f4")
    if float_type == FloatType.F16:
        return np.ascontiguousarray(x, dtype="<f2")
    if float_type == FloatType.Q40:
        return quantize_q40(x)
    return quantize_q80(x)
