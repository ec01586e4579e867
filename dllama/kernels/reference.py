"""The NumPy reference for every operation of the forward pass, of the activations' wire codec
and of sampling.

These are the definitions the JIT kernels are checked against: plain, readable, float32 in and
out (float64 inside reductions where that is what the arithmetic needs). Activations are
``[tokens, features]``; heads are ``[tokens, heads, head_dim]``.
"""
from __future__ import annotations

import numpy as np

from dllama.kernels.quants import BLOCK_SIZE as Q80_BLOCK_VALUES
from dllama.kernels.quants import Q80_BLOCK, dequantize_q80, quantize_q80


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    x = np.asarray(x, dtype=np.float32)
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(ms + np.float32(eps)))) * np.asarray(weight, dtype=np.float32)


def round_trip_q80(x: np.ndarray) -> np.ndarray:
    """What a matmul against quantized weights sees with ``--buffer-float-type q80``."""
    return dequantize_q80(quantize_q80(x))


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w.T for float32 activations ``[tokens, in]`` and dense weights ``[out, in]``."""
    return np.asarray(x, dtype=np.float32) @ np.asarray(w, dtype=np.float32).T


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU (as distributed-llama and most checkpoints use)."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x ** 3)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rope_frequencies(head_dim: int, theta: float, llama31_scaling: tuple[float, float, float, int] | None = None
                     ) -> np.ndarray:
    """Angular frequency of each rotated pair of a head: theta^(-2i/head_dim), i < head_dim/2.

    ``llama31_scaling`` is (factor, low_freq_factor, high_freq_factor, original_max_seq_len):
    Llama 3.1 stretches long wavelengths by the factor, keeps short ones, blends the band between.
    """
    i = np.arange(head_dim // 2, dtype=np.float64)
    freq = theta ** (-2.0 * i / head_dim)
    if llama31_scaling is not None:
        factor, low, high, orig = llama31_scaling
        wavelen = 2.0 * np.pi / freq
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1.0 - smooth) * freq / factor + smooth * freq
        freq = np.where(wavelen < orig / high, freq, np.where(wavelen > orig / low, freq / factor, blended))
    return freq


def rope_llama(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Interleaved rope: pairs (2i, 2i+1) of each head rotate by angle i.

    ``x`` is ``[tokens, heads, head_dim]``; ``cos``/``sin`` are ``[tokens, head_dim/2]``.
    """
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    c = cos[:, None, :]
    s = sin[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def rope_falcon(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX/Falcon rope: pairs (i, i + head_dim/2) of each head rotate by angle i."""
    half = x.shape[-1] // 2
    x0 = x[..., :half]
    x1 = x[..., half:]
    c = cos[:, None, :]
    s = sin[:, None, :]
    return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slots: np.ndarray, positions: np.ndarray,
              group: int = 0, head_offset: int = 0) -> np.ndarray:
    """Causal grouped-query attention of a batch of rows, each of its own sequence and position.

    ``q`` is ``[rows, heads, head_dim]``; the caches are ``[slots, seq_len, kv_heads, head_dim]``
    and already hold the batch's keys and values. Row ``t`` attends positions
    ``0 .. positions[t]`` of cache slot ``slots[t]``. Query head ``h`` reads KV head
    ``(h + head_offset) // group`` (``group`` 0: heads / kv_heads): a cluster node's query heads
    may start and end inside a KV group. Returns ``[rows, heads * head_dim]``.
    """
    n_rows, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    group = group or n_heads // n_kv
    # Pad the heads to whole groups, attend as plain GQA, keep the real heads.
    full = np.zeros((n_rows, n_kv, group, head_dim), dtype=np.float32)
    full.reshape(n_rows, n_kv * group, head_dim)[:, head_offset:head_offset + n_heads] = q
    out = np.empty((n_rows, n_kv, group, head_dim), dtype=np.float32)
    for t in range(n_rows):
        end = int(positions[t]) + 1
        k = k_cache[slots[t], :end]  # [S, KV, D]: the row's own sequence, up to its position
        v = v_cache[slots[t], :end]
        scores = np.einsum("kgd,skd->kgs", full[t], k) / np.float32(np.sqrt(head_dim))
        probs = softmax(scores, axis=-1).astype(np.float32)
        out[t] = np.einsum("kgs,skd->kgd", probs, v)
    out = out.reshape(n_rows, n_kv * group, head_dim)[:, head_offset:head_offset + n_heads]
    return np.ascontiguousarray(out).reshape(n_rows, n_heads * head_dim)


def q80_wire_encode_into(x: np.ndarray, out: np.ndarray) -> None:
    """float32 values (a multiple of 32 per row) as Q80 blocks' bytes, written into the uint8
    array ``out`` of exactly their size: a part on the wire."""
    out[:] = quantize_q80(x).view(np.uint8).reshape(-1)


def q80_wire_sum(frames: np.ndarray, order: np.ndarray, offset: int, rows: int, dim: int) -> np.ndarray:
    """The sum, in ``order`` and starting from zero, of the Q80 parts of ``rows x dim`` values
    that rows ``order`` of the uint8 array ``frames`` hold from byte ``offset`` on: every node
    that sums the same parts gets the same bits."""
    size = rows * dim // Q80_BLOCK_VALUES * Q80_BLOCK.itemsize
    total = np.zeros((rows, dim), dtype=np.float32)
    for row in order:
        part = np.frombuffer(frames[row, offset:offset + size], dtype=Q80_BLOCK)
        total += dequantize_q80(part).reshape(rows, dim)
    return total


def argmax(logits: np.ndarray) -> int:
    """Index of the largest value, the first one on ties."""
    return int(np.argmax(logits))
