"""The block formats: quantization error within each format's step, ggml's layout, round trips."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from dllama.kernels.quants import (BLOCK_SIZE, FloatType, Q40_BLOCK, Q80_BLOCK, dequantize_q40,
                                   dequantize_q80, from_float32, quantize_q40, quantize_q80, to_float32)

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def block_amax(x):
    """Largest magnitude of each value's block, broadcast back to the values."""
    amax = np.abs(x.reshape(-1, BLOCK_SIZE)).max(axis=1)
    return amax.repeat(BLOCK_SIZE).reshape(x.shape)


def q40_bound(x: np.ndarray) -> np.ndarray:
    """How far a Q40 round trip may move each value of ``x``."""
    scale = block_amax(x) / 8
    # Rounding to the nearest of 16 levels costs scale/2, except the extreme opposite to the
    # block's largest value, which clips from +8 to +7 levels: a whole scale. Storing the scale
    # as float16 moves it by a relative 2^-11 (absolute 2^-25 below float16's normal range),
    # multiplied by up to 8 levels. Float32 products add a relative 2^-20 at most.
    return scale + 8 * np.maximum(scale * 2.0 ** -11, 2.0 ** -25) + block_amax(x) * 2.0 ** -20


def q80_bound(x: np.ndarray) -> np.ndarray:
    """How far a Q80 round trip may move each value of ``x``."""
    scale = block_amax(x) / 127
    # Rounding costs scale/2; the float16 scale's error (see q40_bound) counts 127 levels.
    return scale / 2 + 127 * np.maximum(scale * 2.0 ** -11, 2.0 ** -25) + block_amax(x) * 2.0 ** -20


def f16_bound(x: np.ndarray) -> np.ndarray:
    """Half a float16 ulp at each value: round to nearest is off by at most 2^-11 relative (11
    significant bits), or by half the subnormal step 2^-24 below float16's normal range."""
    return np.maximum(np.abs(x.astype(np.float64)) * 2.0 ** -11, 2.0 ** -25)


@st.composite
def row_batches(draw):
    n_blocks = draw(st.integers(1, 6))
    rows = draw(st.integers(1, 4))
    x = draw(hnp.arrays(np.float32, (rows, n_blocks * BLOCK_SIZE), elements=finite))
    # Mix in blocks that are all zero, all equal, or of a tiny scale: the quantizers' edge cases.
    kind = draw(st.sampled_from(["plain", "zeros", "equal", "tiny"]))
    if kind == "zeros":
        x[:, :BLOCK_SIZE] = 0
    elif kind == "equal":
        x[:, :BLOCK_SIZE] = draw(finite)
    elif kind == "tiny":
        x[:, :BLOCK_SIZE] *= 1e-3
    return x


@settings(max_examples=200, deadline=None)
@given(row_batches())
def test_q40_error_within_block_scale(x):
    blocks = quantize_q40(x)
    assert blocks.dtype == Q40_BLOCK and blocks.shape == (x.shape[0], x.shape[1] // BLOCK_SIZE)
    y = dequantize_q40(blocks)
    assert np.all(np.abs(x - y) <= q40_bound(x))


@settings(max_examples=200, deadline=None)
@given(row_batches())
def test_q80_error_within_block_scale(x):
    blocks = quantize_q80(x)
    assert blocks.dtype == Q80_BLOCK
    y = dequantize_q80(blocks)
    assert np.all(np.abs(x - y) <= q80_bound(x))


def test_q40_layout_matches_ggml():
    # Value j sits in the low nibble of byte j, value j+16 in the high nibble.
    x = np.arange(-16, 16, dtype=np.float32)[None, :] / 2  # largest magnitude -8: scale 1
    b = quantize_q40(x)
    assert b.shape == (1, 1) and b["d"][0, 0] == 1.0
    levels = np.minimum(np.floor(x[0] + 8.5), 15).astype(np.uint8)  # ggml: (int)(x/d + 8.5)
    assert np.array_equal(b["qs"][0, 0], levels[:16] | (levels[16:] << 4))
    assert np.array_equal(dequantize_q40(b)[0], levels.astype(np.float32) - 8)


def test_all_zero_block_is_exact():
    z = np.zeros((2, 64), np.float32)
    assert np.array_equal(dequantize_q40(quantize_q40(z)), z)
    assert np.array_equal(dequantize_q80(quantize_q80(z)), z)


@pytest.mark.parametrize("ft", list(FloatType), ids=lambda f: f.name)
def test_from_to_float32_round_trip_shapes(ft):
    # Values spread over [-1, 1]: unequal blocks, signs, and float16 values of several binades.
    x = np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(3, 64)
    stored = from_float32(x, ft)
    assert stored.dtype == ft.element_dtype
    assert stored.shape == (3, 64 // ft.values_per_element)
    assert ft.nbytes(x.size) == stored.nbytes
    back = to_float32(stored, ft)
    assert back.dtype == np.float32 and back.shape == x.shape
    if ft == FloatType.F32:
        assert np.array_equal(back, x)  # stored as it is
    else:
        bound = {FloatType.F16: f16_bound, FloatType.Q80: q80_bound, FloatType.Q40: q40_bound}[ft](x)
        assert np.all(np.abs(back.astype(np.float64) - x) <= bound)
