"""Causal grouped-query attention over the KV cache, in jitted code (``reference.attention``
is its definition)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from dllama.kernels.jit import FAST
from dllama.kernels.jit.elementwise import expf


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
