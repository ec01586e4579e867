"""Activations on the wire: the Q80 codec's bytes are ggml's Q80 blocks, the JIT codec equals
the NumPy one bit for bit, parts add up in order, and a round trip errs at most half a
quantization step."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama.kernels import quants
from dllama.transport.wire import WireCodec

shapes = st.tuples(st.integers(1, 8), st.integers(1, 12).map(lambda b: 32 * b))


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**32 - 1), st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
def test_q80_wire_codec(shape, seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    x[0, :min(3, shape[1])] *= 50  # outliers, as real activations have
    fast, slow = WireCodec(True, "numba"), WireCodec(True, "numpy")
    data = fast.encode(x)
    assert bytes(data) == bytes(slow.encode(x)) == quants.quantize_q80(x).tobytes()
    other = slow.encode(x[::-1].copy())
    total_fast = fast.sum_parts([data, other], *shape)
    total_slow = slow.sum_parts([data, other], *shape)
    assert np.array_equal(total_fast, total_slow)
    decoded = fast.sum_parts([data], *shape)
    blocks = np.abs(x.reshape(-1, 32)).max(axis=1)
    # Half a step of 127 levels, plus the float16 scale's relative rounding (2^-11) over 127
    # steps; below float16's normal range the scale's absolute rounding (2^-25) over 127 steps.
    bound = np.repeat(blocks * (0.5 / 127 + 2.0 ** -11), 32).reshape(shape) + 127 * 2.0 ** -25
    assert np.all(np.abs(decoded - x) <= bound)


def test_f32_wire_is_exact_and_sizes_are_checked():
    codec = WireCodec(False, "numba")
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(codec.sum_parts([codec.encode(x)], 3, 64), x)
    for c in (codec, WireCodec(True, "numba")):
        with pytest.raises(ValueError, match="does not hold 3 x 64 values"):
            c.sum_parts([c.encode(x), b"\0" * 7], 3, 64)
