"""Weight and activation formats: each block format is defined here once and used everywhere.

All quantized formats work on blocks of 32 consecutive values of a row (ggml's layout):

- ``Q40`` (ggml Q4_0), 18 bytes: float16 scale ``d``, then 16 bytes where byte ``j`` holds
  value ``j`` in its low nibble and value ``j + 16`` in its high nibble; value = (nibble - 8) * d.
- ``Q80`` (ggml Q8_0), 34 bytes: float16 scale ``d``, then 32 int8 ``q``; value = q * d.
- ``F16`` and ``F32``: plain little-endian IEEE floats.

Q80 follows ggml's reference rounding, so its blocks match the ones distributed-llama writes. Q40
searches each block's scale for the least weighted squared error (``quantize_q40``): ggml's
max-abs scale (``quantize_q40_max_abs``) is fixed by one value, so conversions that must round to
Q40 (from floats, Q4_1 or K-quants) stay closer to their source; Q40 files therefore differ from
distributed-llama's. A per-column importance (``engine.calibration``: how large each column's
input is) weighs the error further, as llama.cpp's importance matrix does. A GGUF's Q4_0 blocks
are copied, never rounded again.
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


def quantize_q40_max_abs(x: np.ndarray) -> np.ndarray:
    """ggml's Q4_0 rounding of a float array whose last axis is a multiple of 32: the value of
    largest magnitude maps to level -8. ``quantize_q40`` starts from these blocks.

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


# The level the block's value of largest magnitude is first rounded to, for each candidate scale
# of the Q40 search: -8 +- 0.9 in steps of 0.1, the candidates of llama.cpp's make_qx_quants.
Q40_SEARCH_LEVELS = -(8.0 + 0.1 * np.arange(-9, 10, dtype=np.float64))
_Q40_CHUNK = 1 << 14  # blocks searched at once: bounds the [blocks, candidates] temporaries


def q40_error_weights(groups: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """The weight of each value's squared error in the Q40 search, for float64 blocks [n, 32]:
    sqrt(sigma2 + x^2), sigma2 the block's mean square, times ``importance`` [n, 32] (each
    value's column's importance; None: 1). llama.cpp weighs Q4_0 this way (make_qx_quants with
    quant_weights). A plain squared error lets the search clip a block's few large weights to
    serve its many small ones: on SmolLM2 it lowered the weight error more but the model's KL
    divergence from F32 less (0.40 against 0.34)."""
    sigma2 = _sequential_sum(groups * groups) / BLOCK_SIZE
    w = np.sqrt(sigma2[:, None] + groups * groups)
    return w if importance is None else importance * w


def _sequential_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis left to right, the order of the jitted kernel's loop (NumPy's own
    sum is pairwise), so that both round alike."""
    total = np.zeros(a.shape[:-1])
    for j in range(a.shape[-1]):
        total += a[..., j]
    return total


def q40_block_errors(groups: np.ndarray, blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """The weighted squared error (``q40_error_weights``) of each Q40 block against its float64
    values [n, 32], summed left to right: the quantity the Q40 search minimises."""
    d = blocks["d"].astype(np.float64)[:, None]
    levels = np.concatenate([blocks["qs"] & 0xF, blocks["qs"] >> 4], axis=-1).astype(np.float64) - 8.0
    diff = groups - d * levels
    return _sequential_sum(q40_error_weights(groups, importance) * (diff * diff))


def q40_block_importance(importance: np.ndarray | None, n_columns: int) -> np.ndarray | None:
    """A per-column importance [n_columns] as float64 rows of blocks [n_columns / 32, 32]
    (block b of a flattened [rows, n_columns] array uses row b % (n_columns / 32)); None stays
    None. It must be finite and not negative: a weight is a share of the error, not a sign."""
    if importance is None:
        return None
    imp = np.asarray(importance, dtype=np.float64)
    if imp.shape != (n_columns,):
        raise ValueError(f"importance must have one value per column ({n_columns}), got shape {imp.shape}")
    if not (np.isfinite(imp).all() and (imp >= 0).all()):
        raise ValueError("importance must be finite and not negative")
    return imp.reshape(-1, BLOCK_SIZE)


def quantize_q40(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize a float array whose last axis is a multiple of 32 into Q40 blocks, each block's
    scale chosen for the least weighted squared error (``q40_error_weights``).

    ``importance`` (one value per column of the last axis, e.g. the mean square of the input
    activation each column multiplies) weighs each value's error further, so that the error
    goes where the model's inputs are small; None weighs all columns alike.
    Each candidate of ``Q40_SEARCH_LEVELS`` rounds the block once; the least-squares scale of
    those levels, rounded to float16 as stored, is scored; the best one rounds the block again
    to its nearest levels, and replaces the max-abs block only if its (same weighted) error is
    smaller. So no block is worse than ggml's, and blocks of zeros, infinities or NaN (or of
    zero importance) stay ggml's.
    The result has the shape of ``x`` with the last axis divided by 32, dtype ``Q40_BLOCK``.
    """
    x = np.asarray(x, dtype=np.float32)
    imp = q40_block_importance(importance, x.shape[-1])
    out = quantize_q40_max_abs(x).reshape(-1)
    groups = x.reshape(-1, BLOCK_SIZE).astype(np.float64)
    for start in range(0, groups.shape[0], _Q40_CHUNK):
        chunk = groups[start:start + _Q40_CHUNK]
        w = None if imp is None else imp[np.arange(start, start + chunk.shape[0]) % imp.shape[0]]
        _search_q40(chunk, out[start:start + _Q40_CHUNK], w)
    return out.reshape(x.shape[:-1] + (x.shape[-1] // BLOCK_SIZE,))


def _search_q40(groups: np.ndarray, blocks: np.ndarray, importance: np.ndarray | None) -> None:
    """Improve max-abs ``blocks`` in place (see ``quantize_q40``; ``importance`` [n, 32] or
    None); every sum runs left to right and every step is the jitted kernel's, which must give
    the same bytes."""
    gmax, gmin = groups.max(axis=1), groups.min(axis=1)
    vmax = np.where(-gmin > gmax, gmin, gmax)
    w = q40_error_weights(groups, importance)
    swx2 = _sequential_sum(w * groups * groups)
    live = (vmax != 0) & np.isfinite(swx2)
    groups, w, swx2, vmax = groups[live], w[live], swx2[live], vmax[live]
    importance = None if importance is None else importance[live]
    iscale = Q40_SEARCH_LEVELS[None, :] / vmax[:, None]
    sumlx = np.zeros(iscale.shape)
    suml2 = np.zeros(iscale.shape)
    for j in range(BLOCK_SIZE):
        level = np.clip(np.floor(iscale * groups[:, j, None] + 0.5), -8.0, 7.0)
        sumlx += w[:, j, None] * groups[:, j, None] * level
        suml2 += w[:, j, None] * level * level
    # The scale as stored: its float16 rounding is part of the error. A scale that rounds to
    # zero or overflows can't win.
    with np.errstate(over="ignore", invalid="ignore"):
        d = (sumlx / suml2).astype(np.float16).astype(np.float64)
        err = swx2[:, None] - 2.0 * d * sumlx + d * d * suml2
    err[~((d != 0) & np.isfinite(err))] = np.inf
    best = np.argmin(err, axis=1)
    found = np.isfinite(err[np.arange(err.shape[0]), best])
    rows = np.flatnonzero(live)[found]
    groups, d = groups[found], d[found, best[found]]
    importance = None if importance is None else importance[found]
    levels = np.clip(np.floor(groups * (1.0 / d)[:, None] + 8.5), 0.0, 15.0).astype(np.uint8)
    candidate = np.empty(rows.shape[0], dtype=Q40_BLOCK)
    candidate["d"] = d.astype(np.float16)
    candidate["qs"] = levels[:, :16] | (levels[:, 16:] << 4)
    better = q40_block_errors(groups, candidate, importance) < q40_block_errors(groups, blocks[rows], importance)
    blocks[rows[better]] = candidate[better]


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
    groups = x.reshape(-1, BLOCK_SIZE).astype(np.float64)  # float64: see quantize_q40_max_abs
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


def from_float32(x: np.ndarray, float_type: FloatType, importance: np.ndarray | None = None) -> np.ndarray:
    """Float values to stored elements of ``float_type`` (the inverse of ``to_float32``), by the
    NumPy reference; ``backend.q40_quantizer()`` is the same Q40 search on the JIT kernels.
    ``importance`` (per column of the last axis) steers the Q40 search (``quantize_q40``); the
    other types round each value to its nearest and ignore it."""
    if float_type == FloatType.F32:
        return np.ascontiguousarray(x, dtype="<f4")
    if float_type == FloatType.F16:
        return np.ascontiguousarray(x, dtype="<f2")
    if float_type == FloatType.Q40:
        return quantize_q40(x, importance)
    return quantize_q80(x)
