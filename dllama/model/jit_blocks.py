"""The forward pass's blocks as single jitted calls (the numba backend).

Each block (start, attention, feed-forward, end) is one call from Python into compiled code:
RMS norm, the activation's Q80 quantization (once for every product that shares it), the
matrix products and the rest run without returning to the interpreter. q, k and v are packed
as one weight, and so are w1 and w3, so that each costs one parallel launch. The blocks return
partial outputs exactly where the NumPy blocks do, so the cluster's sync points stay the same.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from dllama.kernels import jit
from dllama.kernels.backend import cpu_path
from dllama.kernels.packing import pack, pack_rows, padded_rows

if TYPE_CHECKING:
    from dllama.model.forward import Transformer


@njit(cache=True, parallel=True)
def attention_block(x, pos, norm, eps, wqkv, qkv_width, q_norm, k_norm, cos, sin, falcon, k_cache, v_cache,
                    n_heads, n_kv_heads, head_dim, group, head_offset, wo, o_width, q80, path, table):
    n_tokens, dim = x.shape
    y = np.empty_like(x)
    jit.rms_norm_into(x, norm, eps, y)
    qkv = jit.product(wqkv, qkv_width, y, q80, path, table)
    q_dim = n_heads * head_dim
    kv_dim = n_kv_heads * head_dim
    q = np.ascontiguousarray(qkv[:, :q_dim]).reshape(n_tokens, n_heads, head_dim)
    k = np.ascontiguousarray(qkv[:, q_dim:q_dim + kv_dim]).reshape(n_tokens, n_kv_heads, head_dim)
    if q_norm.shape[0] > 0:  # Qwen3: RMS norm of each head's q and k
        q2 = q.reshape(n_tokens * n_heads, head_dim)
        jit.rms_norm_into(q2.copy(), q_norm, eps, q2)
        k2 = k.reshape(n_tokens * n_kv_heads, head_dim)
        jit.rms_norm_into(k2.copy(), k_norm, eps, k2)
    jit.rope_into(q, cos[pos:pos + n_tokens], sin[pos:pos + n_tokens], falcon)
    jit.rope_into(k, cos[pos:pos + n_tokens], sin[pos:pos + n_tokens], falcon)
    for t in range(n_tokens):
        for h in range(n_kv_heads):
            for d in range(head_dim):
                k_cache[pos + t, h, d] = k[t, h, d]
                v_cache[pos + t, h, d] = qkv[t, q_dim + kv_dim + h * head_dim + d]
    z = np.empty((n_tokens, q_dim), dtype=np.float32)
    jit.attention_into(q, k_cache, v_cache, pos, z, group, head_offset)
    return jit.product(wo, o_width, z, q80, path, table)[:, :dim]


@njit(cache=True, parallel=True)
def expert_ffn(y, w13, w13_width, hidden, w2, w2_width, use_gelu, q80, path, table):
    """act(y @ w1.T) * (y @ w3.T) @ w2.T for a normalized input y."""
    gate_up = jit.product(w13, w13_width, y, q80, path, table)
    d = np.empty((y.shape[0], hidden), dtype=np.float32)
    jit.gated_into(gate_up, hidden, use_gelu, d)
    return jit.product(w2, w2_width, d, q80, path, table)[:, :y.shape[1]]


@njit(cache=True, parallel=True)
def ffn_block(x, norm, eps, w13, w13_width, hidden, w2, w2_width, use_gelu, q80, path, table):
    y = np.empty_like(x)
    jit.rms_norm_into(x, norm, eps, y)
    return expert_ffn(y, w13, w13_width, hidden, w2, w2_width, use_gelu, q80, path, table)


@njit(cache=True, parallel=True)
def start_block(embedding, tokens):
    out = np.empty((tokens.shape[0], embedding.shape[1]), dtype=np.float32)
    jit.embedding_into(embedding, tokens, out)
    return out


@njit(cache=True, parallel=True)
def end_block(x, norm, eps, w, width, vocab, q80, path, table):
    y = np.empty_like(x)
    jit.rms_norm_into(x, norm, eps, y)
    return jit.product(w, width, y, q80, path, table)[:, :vocab]


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


class JitBlocks:
    """The blocks of a Transformer with its weights repacked for the JIT kernels."""

    def __init__(self, tr: Transformer):
        h = tr.header
        self.tr = tr
        wt = h.weight_type
        self.q80 = bool(tr.q80_buffers and wt.is_quantized)
        self.path = cpu_path()
        self.table = jit.f16_table()
        self.eps = np.float32(h.norm_epsilon)
        self.falcon = tr.rope_is_falcon
        self.use_gelu = tr.uses_gelu
        self.embedding = _f32(tr.embedding) if tr.embedding is not None else None
        node = tr.node
        empty = np.zeros(0, dtype=np.float32)
        self.attn_args = []
        self.ffn_args = []
        self.moe = []
        cache = tr.kv_cache
        for i, layer in enumerate(tr.layers):
            wqkv = pack_rows([layer.q.stored, layer.k.stored, layer.v.stored], wt)
            qkv_rows = layer.q.out_features + 2 * layer.k.out_features
            q_norm = _f32(layer.q_norm) if layer.q_norm is not None else empty
            k_norm = _f32(layer.k_norm) if layer.k_norm is not None else empty
            # Everything but the input and the position, ready for one call per block.
            self.attn_args.append((
                _f32(layer.attn_norm), self.eps, wqkv, padded_rows(qkv_rows, wt), q_norm, k_norm,
                tr.rope_cos, tr.rope_sin, self.falcon, cache.k[i], cache.v[i], node.n_heads, node.n_kv_heads, h.head_dim,
                tr.group, tr.head_offset,
                pack(layer.o.stored, wt), padded_rows(layer.o.out_features, wt), self.q80, self.path, self.table))
            ffns = layer.experts if layer.experts is not None else [layer.ffn]
            packed = [self._ffn_args(f, wt) for f in ffns]
            if layer.experts is None:
                self.ffn_args.append((_f32(layer.ffn_norm), self.eps) + packed[0])
            else:
                self.ffn_args.append((_f32(layer.ffn_norm), _f32(layer.router)))
            self.moe.append(packed if layer.experts is not None else None)
        self.end_args = (_f32(tr.final_norm), self.eps, pack(tr.output.stored, wt),
                         padded_rows(tr.output.out_features, wt), node.vocab_size, self.q80, self.path, self.table)

    def _ffn_args(self, f, wt) -> tuple:
        hidden = f.w1.out_features
        return (pack_rows([f.w1.stored, f.w3.stored], wt), padded_rows(2 * hidden, wt), hidden,
                pack(f.w2.stored, wt), padded_rows(f.w2.out_features, wt), self.use_gelu, self.q80, self.path,
                self.table)

    def start(self, tokens: np.ndarray) -> np.ndarray:
        return start_block(self.embedding, tokens)

    def attention_block(self, i: int, x: np.ndarray, pos: int) -> np.ndarray:
        return attention_block(x, pos, *self.attn_args[i])

    def ffn_block(self, i: int, x: np.ndarray) -> np.ndarray:
        if self.moe[i] is None:
            return ffn_block(x, *self.ffn_args[i])
        norm, router = self.ffn_args[i]
        y = jit.rms_norm(x, norm, float(self.eps))
        return self.tr.mix_experts(y, jit.softmax(jit.matmul(y, router), axis=-1),
                                   lambda e, rows: expert_ffn(rows, *self.moe[i][e]))

    def end(self, x: np.ndarray) -> np.ndarray:
        return end_block(x, *self.end_args)
