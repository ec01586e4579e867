"""Activations on the wire: the Q80 codec's bytes are ggml's Q80 blocks, the JIT codec equals
the NumPy one bit for bit, and a round trip errs at most half a quantization step."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama.kernels import quants
from dllama.model.wire import WireCodec

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
    total_fast = np.full(shape, 0.25, dtype=np.float32)
    total_slow = total_fast.copy()
    fast.add_into(data, total_fast)
    slow.add_into(data, total_slow)
    assert np.array_equal(total_fast, total_slow)
    decoded = total_fast - np.float32(0.25)
    blocks = np.abs(x.reshape(-1, 32)).max(axis=1)
    # Half a step of 127 levels, plus the float16 scale's relative rounding (2^-11) over 127
    # steps; below float16's normal range the scale's absolute rounding (2^-25) over 127 steps.
    bound = np.repeat(blocks * (0.5 / 127 + 2.0 ** -11), 32).reshape(shape) + 127 * 2.0 ** -25
    assert np.all(np.abs(decoded - x) <= bound)


def test_f32_wire_is_exact_and_sizes_are_checked():
    codec = WireCodec(False, "numba")
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    total = np.zeros_like(x)
    codec.add_into(codec.encode(x), total)
    assert np.array_equal(total, x)
    for c in (codec, WireCodec(True, "numba")):
        try:
            c.add_into(b"\0" * 7, total)
        except ValueError as e:
            assert "does not hold 3 x 64 values" in str(e)
        else:
            raise AssertionError("a part of the wrong size was accepted")
