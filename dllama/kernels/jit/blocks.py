"""The forward pass's blocks as single jitted calls.

Each block (start, attention, feed-forward, end) is one call from Python into compiled code:
RMS norm, the activation's Q80 quantization (once for every product that shares it), the
matrix products and the rest run without returning to the interpreter. q, k and v are packed
as one weight, and so are w1 and w3, so that each costs one parallel launch. The blocks return
partial outputs exactly where the NumPy blocks do (``model.numpy_blocks``), so a cluster's
sync points are the same on both backends.

Everything a block takes besides its input is built once, by name, as one of the named tuples
below, and splatted at the call: ``attention_block(x, slots, positions, *args)``. Their fields are the
blocks' parameters, in order (a test holds them equal). They are not passed as named tuples:
numba types a named tuple argument in Python, about 1 µs per tuple and call, 60 calls a token.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from dllama.kernels.jit.attention import attention_into
from dllama.kernels.jit.elementwise import embedding_into, gated_into, rms_norm_into, rope_into
from dllama.kernels.jit.matmul import product


class AttentionArgs(NamedTuple):
    """What ``attention_block`` takes after the input ``x`` [rows, dim] and the rows' KV cache
    slots and positions."""

    norm: np.ndarray  # attn_norm
    eps: np.float32
    qkv: tuple  # q, k and v stacked by rows, packed (``packing``)
    qkv_rows: int  # the padded width of its product
    q_norm: np.ndarray  # Qwen3's per-head norms of q and k; empty arrays otherwise
    k_norm: np.ndarray
    cos: np.ndarray  # rope tables [seq_len, head_dim / 2]
    sin: np.ndarray
    falcon: bool  # NeoX rope pairs (i, i + head_dim/2), else interleaved (2i, 2i + 1)
    k_cache: np.ndarray  # this layer's [slots, seq_len, kv_heads, head_dim]
    v_cache: np.ndarray
    n_heads: int  # query heads of this node
    n_kv_heads: int  # KV heads of this node
    head_dim: int
    group: int  # query heads per KV head, in the whole model
    head_offset: int  # where the first query head sits inside its KV group
    o: tuple
    o_rows: int
    q80: bool  # quantized weights against Q80 activations (int8 products), else float32
    path: int  # the SIMD path of Q40 products (simd.PATH_*)
    f16_table: np.ndarray  # float32 of every float16 bit pattern


class ExpertArgs(NamedTuple):
    """What ``expert_ffn`` takes after its normalized input: one feed-forward (or MoE expert)."""

    w13: tuple  # w1 (gate) and w3 (up) stacked by rows, packed
    w13_rows: int
    hidden: int  # rows of w1 (and of w3): this node's hidden units
    w2: tuple  # down
    w2_rows: int
    gelu: bool  # GELU (tanh approximation), else SiLU
    q80: bool
    path: int
    f16_table: np.ndarray


class FeedForwardArgs(NamedTuple):
    """What ``ffn_block`` takes after its input: the norm, then a dense feed-forward."""

    norm: np.ndarray  # ffn_norm
    eps: np.float32
    w13: tuple
    w13_rows: int
    hidden: int
    w2: tuple
    w2_rows: int
    gelu: bool
    q80: bool
    path: int
    f16_table: np.ndarray


class EndArgs(NamedTuple):
    """What ``end_block`` takes after its input."""

    norm: np.ndarray  # final_norm
    eps: np.float32
    w: tuple  # this node's rows of the output head, packed
    rows: int
    vocab: int  # logits this node computes
    q80: bool
    path: int
    f16_table: np.ndarray


@njit(cache=True, nogil=True, parallel=True)
def attention_block(x, slots, positions, norm, eps, qkv, qkv_rows, q_norm, k_norm, cos, sin, falcon, k_cache, v_cache,
                    n_heads, n_kv_heads, head_dim, group, head_offset, o, o_rows, q80, path, f16_table):
    n_tokens, dim = x.shape
    y = np.empty_like(x)
    rms_norm_into(x, norm, eps, y)
    qkv_out = product(qkv, qkv_rows, y, q80, path, f16_table)
    q_dim = n_heads * head_dim
    kv_dim = n_kv_heads * head_dim
    q = np.ascontiguousarray(qkv_out[:, :q_dim]).reshape(n_tokens, n_heads, head_dim)
    k = np.ascontiguousarray(qkv_out[:, q_dim:q_dim + kv_dim]).reshape(n_tokens, n_kv_heads, head_dim)
    if q_norm.shape[0] > 0:  # Qwen3: RMS norm of each head's q and k
        q2 = q.reshape(n_tokens * n_heads, head_dim)
        rms_norm_into(q2.copy(), q_norm, eps, q2)
        k2 = k.reshape(n_tokens * n_kv_heads, head_dim)
        rms_norm_into(k2.copy(), k_norm, eps, k2)
    row_cos, row_sin = cos[positions], sin[positions]
    rope_into(q, row_cos, row_sin, falcon)
    rope_into(k, row_cos, row_sin, falcon)
    for t in range(n_tokens):
        slot, pos = slots[t], positions[t]
        for h in range(n_kv_heads):
            for d in range(head_dim):
                k_cache[slot, pos, h, d] = k[t, h, d]
                v_cache[slot, pos, h, d] = qkv_out[t, q_dim + kv_dim + h * head_dim + d]
    z = np.empty((n_tokens, q_dim), dtype=np.float32)
    attention_into(q, k_cache, v_cache, slots, positions, z, group, head_offset)
    return product(o, o_rows, z, q80, path, f16_table)[:, :dim]


@njit(cache=True, nogil=True, parallel=True)
def expert_ffn(y, w13, w13_rows, hidden, w2, w2_rows, gelu, q80, path, f16_table):
    """act(y @ w1.T) * (y @ w3.T) @ w2.T for a normalized input y."""
    gate_up = product(w13, w13_rows, y, q80, path, f16_table)
    d = np.empty((y.shape[0], hidden), dtype=np.float32)
    gated_into(gate_up, hidden, gelu, d)
    return product(w2, w2_rows, d, q80, path, f16_table)[:, :y.shape[1]]


@njit(cache=True, nogil=True, parallel=True)
def ffn_block(x, norm, eps, w13, w13_rows, hidden, w2, w2_rows, gelu, q80, path, f16_table):
    y = np.empty_like(x)
    rms_norm_into(x, norm, eps, y)
    return expert_ffn(y, w13, w13_rows, hidden, w2, w2_rows, gelu, q80, path, f16_table)


@njit(cache=True, nogil=True, parallel=True)
def start_block(embedding, tokens):
    out = np.empty((tokens.shape[0], embedding.shape[1]), dtype=np.float32)
    embedding_into(embedding, tokens, out)
    return out


@njit(cache=True, nogil=True, parallel=True)
def end_block(x, norm, eps, w, rows, vocab, q80, path, f16_table):
    y = np.empty_like(x)
    rms_norm_into(x, norm, eps, y)
    return product(w, rows, y, q80, path, f16_table)[:, :vocab]
