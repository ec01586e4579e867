"""Element-wise and per-token operations in jitted code: RMS norm, SiLU/GELU and the gated
feed-forward product, softmax, rope, embedding rows. Each public function takes and returns
what its ``reference`` counterpart does; the ``*_into`` kernels are what the fused blocks call."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from dllama.kernels.jit import FAST, simd


NORM_LANES = 16


@njit(cache=True, nogil=True)  # not inlined: numba would compile it with the caller's fastmath
def _sum_squares(x):
    """The sum of x's squares in one fixed order: 16 lanes side by side (which vectorize without
    reassociation), then the lanes and the tail in turn. Without fastmath, so that a row gets
    the same bits alone or inside a parallel loop over a batch: a row's logits must not depend
    on the rows beside it (the API batches users together)."""
    n = x.shape[0]
    lanes = np.zeros(NORM_LANES, dtype=np.float32)
    whole = n - n % NORM_LANES
    for j in range(0, whole, NORM_LANES):
        for k in range(NORM_LANES):
            lanes[k] += x[j + k] * x[j + k]
    ss = np.float32(0.0)
    for k in range(NORM_LANES):
        ss += lanes[k]
    for j in range(whole, n):
        ss += x[j] * x[j]
    return ss


# Not inlined, and no fastmath that changes results (arcp would turn x * (1 / r) into x / r in
# one caller and not in another): a row is normalized to the same bits alone or in a batch.
@njit(cache=True, nogil=True, fastmath={"nsz"})
def _rms_norm_row(x, weight, eps, out):
    n = x.shape[0]
    ss = _sum_squares(x)
    scale = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
    for j in range(n):
        out[j] = (x[j] * scale) * weight[j]


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def _rms_norm_rows(x, weight, eps, out):
    for t in prange(x.shape[0]):
        _rms_norm_row(x[t], weight, eps, out[t])


@njit(cache=True, nogil=True, parallel=True)
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


@njit(cache=True, nogil=True, inline="always")
def _pow2(n):
    """2^n as float32 for -126 <= n <= 127."""
    return simd.f32_from_bits(np.int32((n + 127) << 23))


@njit(cache=True, nogil=True, inline="always", fastmath={"nsz", "contract"})
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


@njit(cache=True, nogil=True, inline="always")
def _silu(v):
    return v / (np.float32(1.0) + expf(-v))


@njit(cache=True, nogil=True, inline="always")
def _gelu(v):
    return np.float32(0.5) * v * (np.float32(1.0) + np.tanh(
        np.float32(0.7978845608028654) * (v + np.float32(0.044715) * v * v * v)))


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True, inline="always")
def _gated_row(gate_up, hidden, use_gelu, out):
    for j in range(hidden):
        g = gate_up[j]
        a = _gelu(g) if use_gelu else _silu(g)
        out[j] = a * gate_up[hidden + j]


@njit(cache=True, nogil=True, parallel=True)
def _gated_rows(gate_up, hidden, use_gelu, out):
    for t in prange(gate_up.shape[0]):
        _gated_row(gate_up[t], hidden, use_gelu, out[t])


@njit(cache=True, nogil=True, parallel=True)
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


@njit(cache=True, nogil=True, fastmath={"nsz", "arcp", "contract"})
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


@njit(cache=True, nogil=True)
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

@njit(cache=True, nogil=True)
def embedding_into(table, tokens, out):
    for t in range(tokens.shape[0]):
        out[t, :] = table[tokens[t], :]


def embedding(table: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    out = np.empty((tokens.shape[0], table.shape[1]), dtype=np.float32)
    embedding_into(table, tokens, out)
    return out
