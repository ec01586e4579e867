"""Every numba kernel of ``dllama.kernels.jit`` against the NumPy reference.

Quantizers and float16 conversions must be bit-identical; arithmetic kernels must agree within a
bound derived from float32 rounding (``U`` below is float32's unit roundoff): each tolerance
says where it comes from. Shapes, contents and the SIMD path are drawn by hypothesis.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllama.kernels.backend import NUMBA, NUMPY, cpu_path, q40_quantizer
from dllama.kernels import reference as ref
from dllama.kernels.jit import attention, elementwise, float16, matmul, quantize, sampling, simd
from dllama.kernels.jit import packing
from dllama.kernels.jit.packing import pack, pack_rows, padded_rows
from dllama.kernels.quants import (
    BLOCK_SIZE,
    Q40_BLOCK,
    Q80_BLOCK,
    FloatType,
    dequantize_q40,
    dequantize_q80,
    from_float32,
    quantize_q40,
    quantize_q80,
    to_float32,
)
from tests.helpers import simd_paths

U = 2.0 ** -24  # float32 unit roundoff: a rounded operation is exact * (1 + d), |d| <= U
TINY = 2.0 ** -149  # smallest float32 subnormal: a product that underflows is off by at most TINY / 2

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Only Q40 weight products take the SIMD path (see tests/helpers.py: simd_paths): they run on
# every path, the other weight types once, on this CPU's own (the path argument is unused there).
PATH_IDS = {"portable": simd.PATH_PORTABLE, "avx2": simd.PATH_AVX2, "vnni": simd.PATH_VNNI,
            "avx512": simd.PATH_AVX512, "neon": simd.PATH_NEON, "dotprod": simd.PATH_DOTPROD}
LINEAR_CASES = [
    *(pytest.param(ft, q80, PATH_IDS[name], marks=skip, id=f"{ft.name}-{'q80' if q80 else 'f32'}-{name}")
      for ft in (FloatType.Q40, FloatType.Q80) for name, skip in simd_paths() for q80 in (False, True)),
    # Float weights take float32 activations whatever the buffers; q80 true must change nothing.
    *(pytest.param(ft, False, PATH_IDS[name], marks=skip, id=f"{ft.name}-{name}")
      for ft in (FloatType.F32, FloatType.F16) for name, skip in simd_paths()),
    *(pytest.param(ft, True, None, id=f"{ft.name}-q80") for ft in (FloatType.F32, FloatType.F16)),
]

seeds = st.integers(0, 2 ** 32 - 1)

# The references overflow float16 scales to inf and multiply inf by 0 on purpose (edge cases).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")]


def gamma(n: int) -> float:
    """Higham's gamma_n: the relative error bound of a result that went through n roundings."""
    return n * U / (1 - n * U)


def assert_same_floats(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-identical, except that any NaN matches any NaN (payloads are not part of the contract)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_got, nan_want)
    bits = {2: np.uint16, 4: np.uint32}[got.dtype.itemsize]
    mismatch = (got.view(bits) != want.view(bits)) & ~nan_want
    assert not mismatch.any(), f"first mismatch at {np.argwhere(mismatch)[0]}: got {got[mismatch][0]!r}, " \
                               f"want {want[mismatch][0]!r}"


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bad = ~(err <= bound)  # also catches NaN on either side
    assert not bad.any(), (f"{bad.sum()} of {bad.size} outside the bound; first at {np.argwhere(bad)[0]}: "
                           f"got {got[bad][0]!r}, want {want[bad][0]!r}, bound {np.broadcast_to(bound, bad.shape)[bad][0]!r}")


# -- block contents with the quantizers' edge cases -----------------------------------------------
BLOCK_KINDS = ["normal", "zeros", "neg_zeros", "equal", "one_hot", "grid_q40", "grid_q80", "grid_q41", "huge", "tiny",
               "subnormal", "f32_max", "mixed_signs"]


def fill_blocks(rng: np.random.Generator, n_blocks: int, kinds: list[str]) -> np.ndarray:
    """``n_blocks`` blocks of 32 float32 values, block b of kind ``kinds[b % len(kinds)]``."""
    out = np.empty((n_blocks, BLOCK_SIZE), dtype=np.float32)
    for b in range(n_blocks):
        kind = kinds[b % len(kinds)]
        scale = float(10.0 ** rng.uniform(-3, 3))
        if kind == "normal":
            v = rng.standard_normal(BLOCK_SIZE) * scale
        elif kind == "zeros":
            v = np.zeros(BLOCK_SIZE)
        elif kind == "neg_zeros":
            v = np.full(BLOCK_SIZE, -0.0)
        elif kind == "equal":
            v = np.full(BLOCK_SIZE, rng.choice([-1.0, 1.0]) * scale)
        elif kind == "one_hot":
            v = np.zeros(BLOCK_SIZE)
            v[rng.integers(BLOCK_SIZE)] = rng.choice([-1.0, 1.0]) * scale
        elif kind == "grid_q40":  # multiples of d/2 with d = 1: x/d + 8.5 lands exactly on integers
            v = rng.integers(-16, 17, BLOCK_SIZE) / 2.0
            v[0] = -8.0
        elif kind == "grid_q41":  # Q4_1's 16 levels from a minimum: what conversions from Q4_1 meet
            v = (rng.uniform(-15, 0) + rng.integers(0, 16, BLOCK_SIZE)) * scale
        elif kind == "grid_q80":  # half-integer multiples of d = 1: roundf's ties
            v = rng.integers(-254, 255, BLOCK_SIZE) / 2.0
            v[0] = 127.0
        elif kind == "huge":  # the float16 scale overflows to inf
            v = rng.standard_normal(BLOCK_SIZE) * 1e30
        elif kind == "tiny":  # the float16 scale underflows to zero
            v = rng.standard_normal(BLOCK_SIZE) * 1e-30
        elif kind == "subnormal":  # float32 subnormal values
            v = rng.standard_normal(BLOCK_SIZE) * 1e-40
        elif kind == "f32_max":
            v = rng.uniform(-1, 1, BLOCK_SIZE) * 3.4e38
        else:  # mixed_signs: the largest magnitude is negative, equal to the largest positive value
            v = rng.uniform(-1, 1, BLOCK_SIZE) * scale
            v[0], v[1] = scale, -scale
        out[b] = v.astype(np.float32)
    return out


@st.composite
def block_arrays(draw):
    """A float32 array [rows, blocks * 32] of mixed block kinds."""
    rows = draw(st.integers(1, 5))
    n_blocks = draw(st.integers(1, 8))
    kinds = draw(st.lists(st.sampled_from(BLOCK_KINDS), min_size=1, max_size=6))
    rng = np.random.default_rng(draw(seeds))
    return fill_blocks(rng, rows * n_blocks, kinds).reshape(rows, n_blocks * BLOCK_SIZE)


# -- quantizers and float16 -----------------------------------------------------------------------
@st.composite
def column_importance(draw, n_columns: int):
    """None, or a per-column importance as calibrations give it (mean squared activations:
    spread over decades), with zeros and a few dominant columns."""
    if draw(st.booleans()):
        return None
    rng = np.random.default_rng(draw(seeds))
    imp = 10.0 ** rng.uniform(-4, 3, n_columns)
    imp[rng.random(n_columns) < draw(st.sampled_from([0.0, 0.1, 1.0]))] = 0.0
    return imp.astype(np.float32)


@settings(max_examples=80, **SETTINGS)
@given(st.data())
def test_quantize_q40_bit_identical(data):
    # The scale search, unweighted or weighted by an importance per column: every candidate's
    # sums, float16 roundings and choices must match.
    x = data.draw(block_arrays())
    importance = data.draw(column_importance(x.shape[1]))
    want = quantize_q40(x, importance)
    got = quantize.quantize_q40(x, importance)
    assert got.dtype == Q40_BLOCK and got.shape == want.shape
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    # Conversions quantize through the backend's operation (the jitted search under numba);
    # from_float32 is the NumPy reference's.
    assert np.array_equal(q40_quantizer(NUMBA)(x, importance).view(np.uint8), want.view(np.uint8))
    assert np.array_equal(q40_quantizer(NUMPY)(x, importance).view(np.uint8), want.view(np.uint8))
    assert np.array_equal(from_float32(x, FloatType.Q40, importance).view(np.uint8), want.view(np.uint8))


@settings(max_examples=40, **SETTINGS)
@given(block_arrays())
def test_quantize_q80_bit_identical(x):
    want = quantize_q80(x)
    got = quantize.quantize_q80(x)
    assert got.dtype == Q80_BLOCK and got.shape == want.shape
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    assert_same_floats(quantize.round_trip_q80(x), ref.round_trip_q80(x))


@settings(max_examples=30, **SETTINGS)
@given(seeds, st.integers(1, 4), st.integers(1, 6))
def test_dequantizers_identical_on_any_bytes(seed, rows, n_blocks):
    # Random bytes: every float16 scale pattern (subnormal, +-0, inf, NaN) and every nibble/int8.
    rng = np.random.default_rng(seed)
    for dtype, reference, kernel in ((Q40_BLOCK, dequantize_q40, quantize.dequantize_q40),
                                     (Q80_BLOCK, dequantize_q80, quantize.dequantize_q80)):
        raw = rng.integers(0, 256, rows * n_blocks * dtype.itemsize, dtype=np.uint8)
        blocks = raw.view(dtype).reshape(rows, n_blocks)
        assert_same_floats(kernel(blocks), reference(blocks))


def test_dequantizers_every_scale():
    # Each of the 65536 float16 scales once, with all 16 nibble values / a spread of int8 values.
    d = np.arange(65536, dtype=np.uint16).view(np.float16)
    q40 = np.empty(65536, dtype=Q40_BLOCK)
    q40["d"] = d
    q40["qs"] = (np.arange(16, dtype=np.uint8) * 17)[None, :]  # low and high nibble both j
    assert_same_floats(quantize.dequantize_q40(q40[None, :]), dequantize_q40(q40[None, :]))
    q80 = np.empty(65536, dtype=Q80_BLOCK)
    q80["d"] = d
    q80["qs"] = np.array([-128, -127, -1, 0, 1, 127] + list(range(-13, 13)), dtype=np.int8)[None, :]
    assert_same_floats(quantize.dequantize_q80(q80[None, :]), dequantize_q80(q80[None, :]))


def test_from_float16_every_pattern():
    h = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(256, 256)
    assert_same_floats(float16.from_float16(h), h.astype(np.float32))


def test_to_float16_every_rounding_boundary():
    # For every finite float16 h and its successor: h, the midpoint (a tie: rounds to even), and
    # the float32 values one ulp either side of both, with both signs; plus the overflow edge.
    h = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    nxt = np.arange(1, 0x7C01, dtype=np.uint16).view(np.float16).astype(np.float64)  # last is inf
    nxt[-1] = 65536.0  # the float16 "successor" of 65504 for rounding purposes: midpoint 65520
    mid = ((h + nxt) / 2).astype(np.float32)  # exact: float16 values have 11-bit significands
    base = np.concatenate([h.astype(np.float32), mid])
    up = np.nextafter(base, np.float32(np.inf))
    down = np.nextafter(base, np.float32(-np.inf))
    x = np.concatenate([base, up, down, np.float32([65504, 65519.996, 65520, 65520.004, 1e30, 3.4e38, np.inf,
                                                    np.nan, 1e-45, 2.0 ** -25, 2.0 ** -26, 5.9604645e-08])])
    x = np.concatenate([x, -x])
    assert_same_floats(float16.to_float16(x), x.astype(np.float16))


@settings(max_examples=40, **SETTINGS)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True), min_size=1,
                max_size=200))
def test_to_float16_random(values):
    x = np.array(values, dtype=np.float32)
    assert_same_floats(float16.to_float16(x), x.astype(np.float16))
    assert_same_floats(float16.to_float16(x.reshape(1, -1)), x.reshape(1, -1).astype(np.float16))


# -- linear -------------------------------------------------------------------------------------
ROW_KINDS = ["normal", "normal", "zeros", "equal_blocks", "big", "small"]


def weight_values(rng: np.random.Generator, rows: int, n: int, kinds: list[str], ft: FloatType) -> np.ndarray:
    w = np.empty((rows, n), dtype=np.float64)
    for r in range(rows):
        kind = kinds[r % len(kinds)]
        if kind == "normal":
            w[r] = rng.standard_normal(n)
        elif kind == "zeros":
            w[r] = 0.0
        elif kind == "equal_blocks":
            w[r] = np.repeat(rng.standard_normal(n // BLOCK_SIZE), BLOCK_SIZE)
        elif kind == "big":  # scales near float16's top (Q40 d up to ~1e4, Q80 d ~ 2e3)
            w[r] = rng.uniform(-1, 1, n) * 6e4
        else:  # small: float16 subnormal scales (Q40 d ~ 1e-7, Q80 d ~ 8e-9 -> 0 or 2^-24)
            w[r] = rng.uniform(-1, 1, n) * 1e-6
    if ft == FloatType.F16:
        w = np.clip(w, -65504, 65504)
    return w.astype(np.float32)


@pytest.mark.parametrize("ft, q80_input, path", LINEAR_CASES)
@settings(max_examples=10, **SETTINGS)
@given(seed=seeds, rows=st.integers(1, 70), n_blocks=st.integers(1, 16), tokens=st.integers(1, 32),
       kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=5),
       x_scale=st.sampled_from([1.0, 1e-3, 1e3]))
def test_linear_matches_reference(ft, q80_input, path, seed, rows, n_blocks, tokens, kinds, x_scale):
    rng = np.random.default_rng(seed)
    n = n_blocks * BLOCK_SIZE
    stored = from_float32(weight_values(rng, rows, n, kinds, ft), ft)
    w = to_float32(stored, ft)
    x = (rng.standard_normal((tokens, n)) * x_scale).astype(np.float32)
    x[rng.random(tokens) < 0.1] = 0.0
    packed = pack(stored, ft)
    assert packed[0].shape[0] == (padded_rows(rows, ft) // simd.GROUP_ROWS if ft.is_quantized else rows)

    got = matmul.linear(x, packed, rows, ft, q80_input, cpu_path() if path is None else path)

    x_seen = ref.round_trip_q80(x) if (q80_input and ft.is_quantized) else x
    want = ref.matmul(x_seen, w)
    assert got.shape == (tokens, rows)
    # Both sides multiply the same values: dequantized weights ((nibble - 8) or int8 times a
    # float16 scale, exact in float32) and the same activation (both quantize it to Q80 the
    # same, bit for bit). Each product term of a dot of n terms passes through at most n + 2
    # roundings on either side (its product, the per-block scale product, and at most n
    # additions, in whatever order), so each side is within gamma(n + 2) * sum|x_j w_j| of the
    # exact dot, and the two within twice that; products that underflow add TINY each.
    magnitude = np.abs(x_seen.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    bound = 2 * gamma(n + 2) * magnitude + 2 * (n + 2) * TINY
    assert_within(got, want, bound)


def test_linear_zero_weight_and_activation_give_exact_zeros():
    for ft in FloatType:
        stored = from_float32(np.zeros((5, 64), np.float32), ft)
        for q80_input in (False, True):
            for path in (PATH_IDS[name] for name, skip in simd_paths() if not skip.args[0]):  # this CPU's
                out = matmul.linear(np.ones((3, 64), np.float32), pack(stored, ft), 5, ft, q80_input, path)
                assert out.shape == (3, 5) and np.all(out == 0)


@pytest.mark.parametrize("ft", [FloatType.F32, FloatType.F16])
@pytest.mark.parametrize("path", [pytest.param(PATH_IDS[name], marks=skip, id=name) for name, skip in simd_paths()])
@settings(max_examples=8, **SETTINGS)
@given(seed=seeds, rows=st.integers(1, 20), n=st.integers(1, 200), tokens=st.integers(1, 9))
def test_float_weights_of_any_width(ft, path, seed, rows, n, tokens):
    # Rows of float weights need no whole blocks: the values past the last block are added apart.
    rng = np.random.default_rng(seed)
    stored = from_float32(rng.standard_normal((rows, n)).astype(np.float32), ft)
    w = to_float32(stored, ft)
    x = rng.standard_normal((tokens, n)).astype(np.float32)
    got = matmul.linear(x, pack(stored, ft), rows, ft, False, path)
    bound = 2 * gamma(n + 1) * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)
    assert_within(got, ref.matmul(x, w), bound)


@pytest.mark.parametrize("ft", list(FloatType))
@settings(max_examples=15, **SETTINGS)
@given(seed=seeds, part_rows=st.lists(st.integers(1, 23), min_size=1, max_size=3), n_blocks=st.integers(1, 3),
       chunk=st.sampled_from([4, 8, 12, 4096]))
def test_stacked_weights_pack_in_chunks_as_one(ft, seed, part_rows, n_blocks, chunk):
    # q, k and v (w1 and w3) are packed as one weight, a few thousand rows at a time, straight
    # from the parts: the result is the packing of the stacked rows, and multiplies like them.
    rng = np.random.default_rng(seed)
    n = n_blocks * BLOCK_SIZE
    parts = [from_float32(rng.standard_normal((r, n)).astype(np.float32), ft) for r in part_rows]
    stacked = np.concatenate(parts, axis=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "CHUNK_ROWS", chunk)
        got = pack_rows(parts, ft)
    want = pack(stacked, ft)
    assert len(got) == len(want) == 1 and got[0].dtype == want[0].dtype
    assert np.array_equal(got[0].view(np.uint8), want[0].view(np.uint8))
    x = rng.standard_normal((3, n)).astype(np.float32)
    w = to_float32(stacked, ft)
    out = matmul.linear(x, got, stacked.shape[0], ft, False, cpu_path())
    bound = 2 * gamma(n + 2) * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)
    assert_within(out, ref.matmul(x, w), bound)


# -- dense matmul, norm, activations ------------------------------------------------------------
@settings(max_examples=25, **SETTINGS)
@given(seeds, st.integers(1, 32), st.integers(1, 70), st.integers(1, 300))
def test_matmul(seed, tokens, rows, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, n)).astype(np.float32)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    got = matmul.matmul(x, w)
    # Same argument as linear: n products and n - 1 additions per term on either side.
    bound = 2 * gamma(n + 1) * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)
    assert_within(got, ref.matmul(x, w), bound)


@settings(max_examples=30, **SETTINGS)
@given(seeds, st.integers(1, 32), st.integers(1, 300), st.sampled_from([1e-5, 1e-6]),
       st.sampled_from([1.0, 1e-3, 1e3, 1e-20]))
def test_rms_norm(seed, tokens, dim, eps, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((tokens, dim)) * scale).astype(np.float32)
    x[rng.random(tokens) < 0.1] = 0.0
    weight = (1 + 0.5 * rng.standard_normal(dim)).astype(np.float32)
    got = elementwise.rms_norm(x, weight, eps)
    want = ref.rms_norm(x, weight, eps)
    # mean(x^2) + eps: n squares and n additions of non-negative terms, so a relative error of
    # gamma(n + 2) per side (underflowed squares are negligible against eps >= 1e-6); the square
    # root halves it; then 1/sqrt, sqrt, and the two products: 4 more roundings per side, and
    # room for one more in case the compiler uses a refined reciprocal-sqrt estimate (< 2U).
    # Results that land in float32's subnormal range are off by TINY per product.
    rel = gamma(dim + 2) + 2 * gamma(6)
    assert_within(got, want, np.abs(want.astype(np.float64)) * rel + 4 * TINY)


# A float32 exp is accurate to a few ulp on either side (libm/SVML < 1 ulp, NumPy's SIMD exp
# < 3 ulp); one ulp is at most 2U relative, so 4 ulp = 8U covers both.
EXP_REL = 8 * U


def silu_bound(x: np.ndarray, want: np.ndarray) -> np.ndarray:
    # x / (1 + exp(-x)): exp's error moves 1 + e by at most that relative amount, then the
    # addition and the division round once each, per side; near the float32 underflow (x < -87)
    # the quotient is subnormal and off by TINY.
    return np.abs(want.astype(np.float64)) * 2 * (EXP_REL + gamma(2)) + 2 * TINY


def gelu_bound(x: np.ndarray, want: np.ndarray) -> np.ndarray:
    # 0.5 x (1 + tanh(z)), z = c (x + 0.044715 x^3). z carries a relative error of <= 6 roundings
    # (x^3 as two products or powf, the product, the sum, the product by c); tanh turns it into
    # an absolute error (1 - tanh^2 z) |z| gamma(6), and tanh itself is off by a few ulp of a
    # value <= 1 (4 ulp = 2^-21 absolute). 1 + tanh then rounds (U absolute, relative to 2).
    # That absolute error of (1 + tanh) is multiplied by 0.5 |x|; the final products add 2U
    # relative. Both sides: twice. (For x << 0, 1 + tanh cancels: the absolute term dominates.)
    x64 = x.astype(np.float64)
    z = 0.7978845608028654 * (x64 + 0.044715 * x64 ** 3)
    with np.errstate(over="ignore", invalid="ignore"):
        sech2 = np.where(np.abs(z) > 30, 0.0, 1.0 / np.cosh(np.minimum(np.abs(z), 30)) ** 2)
    abs_tanh = sech2 * np.abs(z) * gamma(6) + 2.0 ** -21 + 2 * U
    return 2 * (0.5 * np.abs(x64) * abs_tanh + np.abs(want.astype(np.float64)) * gamma(3)) + 2 * TINY


activations = st.lists(st.one_of(st.floats(-30, 30, width=32), st.floats(-1e4, 1e4, width=32),
                                 st.sampled_from([0.0, -0.0, -87.0, -88.7, -89.0, -103.0, -104.0, 88.7, 1e20,
                                                  -1e20, 1e-40, -1e-40])), min_size=1, max_size=300)


@settings(max_examples=40, **SETTINGS)
@given(activations)
def test_silu_and_gelu(values):
    x = np.array(values, dtype=np.float32).reshape(1, -1)
    with np.errstate(over="ignore"):
        want_silu, want_gelu = ref.silu(x), ref.gelu(x)
    assert_within(elementwise.silu(x), want_silu, silu_bound(x, want_silu))
    assert_within(elementwise.gelu(x), want_gelu, gelu_bound(x, want_gelu))


@settings(max_examples=30, **SETTINGS)
@given(seeds, st.integers(1, 32), st.integers(1, 200), st.booleans())
def test_swiglu(seed, tokens, hidden, use_gelu):
    rng = np.random.default_rng(seed)
    gate = (rng.standard_normal((tokens, hidden)) * 4).astype(np.float32)
    up = rng.standard_normal((tokens, hidden)).astype(np.float32)
    act = ref.gelu(gate) if use_gelu else ref.silu(gate)
    got = elementwise.swiglu(gate, up, use_gelu=use_gelu)
    want = act * up
    # The activation's bound scaled by |up|, plus the final product's rounding on each side.
    act_bound = gelu_bound(gate, act) if use_gelu else silu_bound(gate, act)
    assert_within(got, want, act_bound * np.abs(up) + 2 * U * np.abs(want.astype(np.float64)))


@settings(max_examples=40, **SETTINGS)
@given(seeds, st.integers(1, 8), st.integers(1, 300), st.sampled_from([1.0, 10.0, 100.0, 1e30]),
       st.floats(0, 0.9))
def test_softmax(seed, rows, n, scale, neg_inf_share):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * scale).astype(np.float32)
    x[rng.random((rows, n)) < neg_inf_share] = -np.inf
    x[np.arange(rows), rng.integers(0, n, rows)] = rng.standard_normal(rows) * scale  # >= 1 finite per row
    got = elementwise.softmax(x)
    want = ref.softmax(x)
    # x - max is the same rounded subtraction on both sides; exp is then off by EXP_REL, the sum
    # of n positive terms by gamma(n), the normalization rounds once or twice (1/total, product):
    # per side EXP_REL + gamma(n + 2) relative; underflowed exponentials are off by TINY / total
    # with total >= 1.
    rel = 2 * (EXP_REL + gamma(n + 2))
    assert_within(got, want, np.abs(want.astype(np.float64)) * rel + 2 * TINY)
    # Other axes go through the same kernel.
    x3 = x.reshape(rows, n, 1)
    assert_within(elementwise.softmax(x3, axis=1), ref.softmax(x3, axis=1), (np.abs(want) * rel + 2 * TINY)[..., None])


# -- rope and attention -------------------------------------------------------------------------
@st.composite
def rope_inputs(draw):
    rng = np.random.default_rng(draw(seeds))
    tokens = draw(st.integers(1, 32))
    heads = draw(st.integers(1, 9))
    head_dim = 2 * draw(st.integers(1, 64))
    theta = draw(st.sampled_from([10000.0, 500000.0, 1e6]))
    positions = rng.integers(0, draw(st.sampled_from([64, 4096, 131072])), tokens)
    angles = np.outer(positions.astype(np.float64), ref.rope_frequencies(head_dim, theta))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    x = (rng.standard_normal((tokens, heads, head_dim)) * draw(st.sampled_from([1.0, 1e3, 1e-3]))).astype(np.float32)
    return x, cos, sin


@settings(max_examples=30, **SETTINGS)
@given(rope_inputs(), st.booleans())
def test_rope(inputs, falcon):
    x, cos, sin = inputs
    kernel, reference = (elementwise.rope_falcon, ref.rope_falcon) if falcon else (elementwise.rope_llama, ref.rope_llama)
    before = x.copy()
    got = kernel(x, cos, sin)
    assert np.array_equal(x, before)  # the public form must not rotate its input in place
    want = reference(x, cos, sin)
    # Each output is a0 * c -+ a1 * s: two products and a sum, gamma(2) relative to
    # |a0 c| + |a1 s| per side; the magnitude is the same for both outputs of a pair.
    half = x.shape[-1] // 2
    if falcon:
        a0, a1 = x[..., :half], x[..., half:]
    else:
        a0, a1 = x[..., 0::2], x[..., 1::2]
    mag = (np.abs(a0) * np.abs(cos[:, None, :]) + np.abs(a1) * np.abs(sin[:, None, :])).astype(np.float64)
    mag_full = np.concatenate([mag, mag], axis=-1) if falcon else np.repeat(mag, 2, axis=-1)
    assert_within(got, want, 2 * gamma(2) * mag_full + 2 * TINY)


@st.composite
def attention_inputs(draw):
    """A batch as the serving engine makes it: runs of rows, each run one cache slot's rows at
    consecutive positions (a prompt chunk, longer than a tile at times, or a single decode row),
    slots in any order and a slot possibly in several runs. Cache rows past a slot's last
    position in the batch hold garbage that turns any result that reads them into NaN."""
    rng = np.random.default_rng(draw(seeds))
    kv_heads = draw(st.sampled_from([1, 3, 5]))
    ratio = draw(st.integers(1, 8))
    head_dim = 2 * draw(st.integers(1, 40))  # up to 80: whole vectors, and rows that end inside one
    n_slots = draw(st.integers(1, 4))
    runs = draw(st.lists(st.tuples(st.integers(0, n_slots - 1), st.integers(0, 90), st.integers(1, 40)),
                         min_size=1, max_size=4))
    slots = np.concatenate([np.full(n, s) for s, _, n in runs]).astype(np.int64)
    positions = np.concatenate([np.arange(start, start + n) for _, start, n in runs]).astype(np.int64)
    seq_len = int(positions.max()) + 1 + draw(st.integers(0, 8))
    spread = draw(st.sampled_from([0.5, 1.0, 3.0]))
    q = (rng.standard_normal((len(slots), kv_heads * ratio, head_dim)) * spread).astype(np.float32)
    k = (rng.standard_normal((n_slots, seq_len, kv_heads, head_dim)) * spread).astype(np.float32)
    v = rng.standard_normal((n_slots, seq_len, kv_heads, head_dim)).astype(np.float32)
    k, v = garbage_past(k, v, slots, positions)
    return q, k, v, slots, positions


def garbage_past(k: np.ndarray, v: np.ndarray, slots: np.ndarray, positions: np.ndarray):
    """Copies of the caches whose rows past each slot's last position among ``positions`` are
    garbage, as in a cache those rows have not been written to: keys NaN (a score that reads one
    is NaN) and values inf (a zero weight times one is NaN)."""
    k, v = k.copy(), v.copy()
    for s in range(k.shape[0]):
        mine = positions[slots == s]
        end = int(mine.max()) + 1 if mine.size else 0
        k[s, end:] = np.nan
        v[s, end:] = np.inf
    return k, v


@settings(max_examples=40, **SETTINGS)
@given(attention_inputs())
def test_attention(inputs):
    q, k, v, slots, positions = inputs
    rows, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    got = attention.attention(q, k, v, slots, positions)
    want = ref.attention(q, k, v, slots, positions)
    assert got.shape == (rows, heads * head_dim)
    # Each score is a dot of head_dim terms times 1/sqrt(head_dim) (the kernel's also times log2(e),
    # for powers of 2): off by gamma(head_dim + 2) times scale * sum|q_d k_d| per side, so E = twice
    # that (the largest over the row) on both. The probabilities are ratios of exp(score): shifting
    # every score by at most E changes each probability by a factor within exp(+-2E). The output
    # sum_s p_s v_s (a convex combination) then moves by at most expm1(2E) * max|v| from that,
    # plus, per side, exp's EXP_REL and the roundings of the softmax sum and of the weighted sum
    # over S = position + 1 keys (gamma(S + 2) each, relative to sum_s p_s |v_s| <= max|v|), and
    # on the kernel's side two roundings per block of KEYS keys (its running softmax rescales the
    # sums so far by 2^(old max - new max), the same factor for both, when a block raises the max).
    group = heads // kv_heads
    qg = q.astype(np.float64).reshape(rows, kv_heads, group, head_dim)
    bound = np.empty((rows, kv_heads, group))
    for t in range(rows):
        end = positions[t] + 1
        kt = np.abs(k[slots[t], :end].astype(np.float64))  # [S, KV, D]
        mag = np.einsum("kgd,skd->kgs", np.abs(qg[t]), kt) / math.sqrt(head_dim)
        score_err = 2 * gamma(head_dim + 2) * mag.max(axis=-1)  # [KV, G]
        blocks = -(-end // attention.KEYS)
        rounding = 2 * (EXP_REL + 2 * gamma(end + 2)) + 2 * blocks * U
        vmax = np.abs(v[slots[t], :end].astype(np.float64)).max(axis=(0, 2))  # per kv head
        bound[t] = (np.expm1(2 * score_err) + rounding) * vmax[:, None]
    bound = np.repeat(bound.reshape(rows, heads), head_dim, axis=1)
    assert_within(got, want, bound)


@settings(max_examples=40, **SETTINGS)
@given(attention_inputs(), st.data())
def test_attention_is_batch_invariant(inputs, data):
    """The serving engine promises a request the same text alone or beside others: each row's
    output has the same bits alone, in any sub-run of the batch, in the batch's rows in any order,
    and on any number of threads (which only change how rows are cut into tiles), whatever the
    cache holds past the row's own position."""
    q, k, v, slots, positions = inputs
    rows = len(slots)
    whole = attention.attention(q, k, v, slots, positions)
    for t in range(rows):
        alone_k, alone_v = garbage_past(k, v, slots[t:t + 1], positions[t:t + 1])
        assert np.array_equal(attention.attention(q[t:t + 1], alone_k, alone_v, slots[t:t + 1], positions[t:t + 1]),
                              whole[t:t + 1]), t
    cuts = data.draw(st.lists(st.integers(1, max(1, rows - 1)), max_size=5))
    bounds = [0, *sorted({c for c in cuts if c < rows}), rows]
    for a, b in zip(bounds, bounds[1:]):
        part_k, part_v = garbage_past(k, v, slots[a:b], positions[a:b])
        part = attention.attention(q[a:b], part_k, part_v, slots[a:b], positions[a:b])
        assert np.array_equal(part, whole[a:b]), (a, b)
    order = np.random.default_rng(data.draw(seeds)).permutation(rows)
    assert np.array_equal(attention.attention(q[order], k, v, slots[order], positions[order]), whole[order])
    threads = numba.get_num_threads()
    for n in {1, 2, numba.config.NUMBA_NUM_THREADS}:
        if n <= numba.config.NUMBA_NUM_THREADS:
            numba.set_num_threads(n)
            try:
                assert np.array_equal(attention.attention(q, k, v, slots, positions), whole), n
            finally:
                numba.set_num_threads(threads)


def test_attention_long_prompt_chunk_is_batch_invariant():
    """The shape the engine runs most: a 32-row prompt chunk deep into a long prompt (many key
    blocks, the softmax's maximum moving), beside decode rows of other slots; scores that span
    a wide range, so that probabilities underflow and the running maximum jumps."""
    rng = np.random.default_rng(7)
    heads, kv_heads, head_dim, seq_len = 9, 3, 64, 700
    k = rng.standard_normal((3, seq_len, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((3, seq_len, kv_heads, head_dim)).astype(np.float32)
    k[0, ::37] *= 6  # outliers: a few keys that dominate their queries' softmax
    slots = np.array([1] + [0] * 32 + [2], dtype=np.int64)
    positions = np.array([650] + list(range(600, 632)) + [5], dtype=np.int64)
    q = (rng.standard_normal((len(slots), heads, head_dim)) * 2).astype(np.float32)
    k, v = garbage_past(k, v, slots, positions)
    whole = attention.attention(q, k, v, slots, positions)
    np.testing.assert_allclose(whole, ref.attention(q, k, v, slots, positions), rtol=1e-4, atol=1e-5)
    for t in range(len(slots)):
        alone_k, alone_v = garbage_past(k, v, slots[t:t + 1], positions[t:t + 1])
        assert np.array_equal(attention.attention(q[t:t + 1], alone_k, alone_v, slots[t:t + 1], positions[t:t + 1]),
                              whole[t:t + 1]), t


@settings(max_examples=30, **SETTINGS)
@given(attention_inputs(), st.data())
def test_attention_of_a_head_range(inputs, data):
    """A cluster node holds query heads [first, last) and the KV heads they read, possibly
    starting and ending inside a KV group: each of its heads equals that head of the full
    attention (the same code per query on the JIT side, so bit for bit there)."""
    q, k, v, slots, positions = inputs
    rows, heads, head_dim = q.shape
    group = heads // k.shape[2]
    first = data.draw(st.integers(0, heads - 1))
    last = data.draw(st.integers(first + 1, heads))
    kv_first, kv_last = first // group, -(-last // group)
    part_q = q[:, first:last]
    part_k, part_v = k[:, :, kv_first:kv_last], v[:, :, kv_first:kv_last]
    offset = first - kv_first * group
    cols = slice(first * head_dim, last * head_dim)
    assert_same_floats(attention.attention(part_q, part_k, part_v, slots, positions, group, offset),
                       attention.attention(q, k, v, slots, positions)[:, cols])
    # The reference's einsum may sum in another order for other shapes: float32 rounding of
    # sums over at most 131 positions of unit-scale values.
    np.testing.assert_allclose(ref.attention(part_q, part_k, part_v, slots, positions, group, offset),
                               ref.attention(q, k, v, slots, positions)[:, cols], rtol=1e-4, atol=1e-4)


# -- embedding and sampling ---------------------------------------------------------------------
@settings(max_examples=25, **SETTINGS)
@given(seeds, st.integers(1, 100), st.integers(1, 64), st.integers(1, 32))
def test_embedding(seed, vocab, dim, tokens):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    ids = rng.integers(0, vocab, tokens)
    assert_same_floats(elementwise.embedding(table, ids), table[ids])  # a copy: exact
    assert_same_floats(elementwise.embedding(table, list(ids)), table[ids])


logit_lists = st.lists(st.one_of(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 2.0]), st.floats(-20, 20, width=32)),
                       min_size=1, max_size=60)


@settings(max_examples=40, **SETTINGS)
@given(logit_lists)
def test_argmax_first_of_ties(values):
    logits = np.array(values, dtype=np.float32)
    assert sampling.argmax(logits) == int(np.argmax(logits))


BATCH_INVARIANCE_CASES = [
    pytest.param(ft, q80, PATH_IDS[name], marks=skip, id=f"{ft.name}-{'q80' if q80 else 'f32'}-{name}")
    for ft in (FloatType.Q40, FloatType.Q80, FloatType.F16, FloatType.F32)
    for q80 in (False, True) for name, skip in simd_paths()]


@pytest.mark.parametrize("ft, q80_input, path", BATCH_INVARIANCE_CASES)
@settings(max_examples=8, **SETTINGS)
@given(seed=seeds, rows=st.integers(1, 40), n_blocks=st.integers(1, 12), tail=st.integers(0, 31),
       tokens=st.integers(1, 20), cuts=st.lists(st.integers(1, 19), max_size=6),
       kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=5))
def test_linear_batch_invariant(ft, q80_input, path, seed, rows, n_blocks, tail, tokens, cuts, kinds):
    # The serving engine batches rows of different requests in one forward and promises each the
    # text it gets alone: a row's product must have the same bits alone, in any sub-batch, and in
    # the whole batch (the tiles of tokens that share a weight load must not change its sums).
    rng = np.random.default_rng(seed)
    values = weight_values(rng, rows, n_blocks * BLOCK_SIZE, kinds, ft)
    if not ft.is_quantized:  # float rows may end past a whole block
        values = np.hstack([values, rng.standard_normal((rows, tail)).astype(np.float32)])
    n = values.shape[1]
    stored = from_float32(values, ft)
    packed = pack(stored, ft)
    x = rng.standard_normal((tokens, n)).astype(np.float32) * rng.choice([1e-3, 1.0, 1e3], size=(tokens, 1)).astype(np.float32)
    whole = matmul.linear(x, packed, rows, ft, q80_input, path)
    for t in range(tokens):
        assert np.array_equal(matmul.linear(x[t:t + 1], packed, rows, ft, q80_input, path), whole[t:t + 1]), t
    bounds = [0, *sorted({c for c in cuts if c < tokens}), tokens]
    for a, b in zip(bounds, bounds[1:]):
        assert np.array_equal(matmul.linear(x[a:b], packed, rows, ft, q80_input, path), whole[a:b]), (a, b)
