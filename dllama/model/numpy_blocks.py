"""The forward's blocks in plain NumPy (``kernels.reference``): the executable definition of the
model, which the JIT blocks are tested against. One layer reads from top to bottom as the
papers write it: attention (norm, q/k/v, q/k norms for Qwen3, rope, cache, causal attention, o),
then the feed-forward (norm, gate and up, SiLU or GELU, down; or a mixture of experts).

Each block returns this node's partial output; the forward sums the nodes' parts in between.
"""
from __future__ import annotations

import numpy as np

from dllama.kernels import reference as ref
from dllama.model.dense import DenseWeights
from dllama.model.kv_cache import KVCache
from dllama.model.moe import mix_experts
from dllama.model.shape import NodeShape
from dllama.model.weights import FeedForwardWeights, NodeWeights, Weight


class NumpyBlocks:
    def __init__(self, weights: NodeWeights, shape: NodeShape, kv_cache: KVCache, rope_cos: np.ndarray,
                 rope_sin: np.ndarray, dense: DenseWeights):
        self.weights = weights
        self.shape = shape
        self.kv_cache = kv_cache
        self.rope_cos, self.rope_sin = rope_cos, rope_sin
        self.rope = ref.rope_falcon if shape.rope_falcon else ref.rope_llama
        self.act = ref.gelu if shape.gelu else ref.silu
        self.dense = dense

    def prepare(self) -> None:
        """Make the dense copies now, so that the first forward is not the one to pay."""
        for layer in self.weights.layers:
            for w in [layer.q, layer.k, layer.v, layer.o] + [w for f in layer.feed_forwards()
                                                              for w in (f.w1, f.w2, f.w3)]:
                self.dense.dense(w)
        self.dense.dense(self.weights.output)

    def _matmul(self, x: np.ndarray, w: Weight) -> np.ndarray:
        return self.dense.matmul(x, w, self.shape.q80_buffers)

    def start(self, tokens: np.ndarray) -> np.ndarray:
        return np.array(self.weights.embedding[tokens], dtype=np.float32)

    def attention(self, i: int, x: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        s, layer, cache = self.shape, self.weights.layers[i], self.kv_cache
        n = x.shape[0]
        y = ref.rms_norm(x, layer.attn_norm, s.norm_eps)
        q = self._matmul(y, layer.q).reshape(n, s.n_heads, s.head_dim)
        k = self._matmul(y, layer.k).reshape(n, s.n_kv_heads, s.head_dim)
        v = self._matmul(y, layer.v).reshape(n, s.n_kv_heads, s.head_dim)
        if layer.q_norm is not None:
            q = ref.rms_norm(q, layer.q_norm, s.norm_eps)
            k = ref.rms_norm(k, layer.k_norm, s.norm_eps)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        q = self.rope(q, cos, sin)
        cache.k[i, slots, positions] = self.rope(k, cos, sin)
        cache.v[i, slots, positions] = v
        z = ref.attention(q, cache.k[i], cache.v[i], slots, positions, s.group, s.head_offset)
        return self._matmul(z, layer.o)

    def feed_forward(self, i: int, x: np.ndarray) -> np.ndarray:
        layer = self.weights.layers[i]
        y = ref.rms_norm(x, layer.ffn_norm, self.shape.norm_eps)
        if layer.experts is None:
            return self._expert(layer.ffn, y)
        probs = ref.softmax(ref.matmul(y, layer.router), axis=-1)
        return mix_experts(y, probs, self.shape.n_active_experts, lambda e, rows: self._expert(layer.experts[e], rows))

    def _expert(self, ffn: FeedForwardWeights, y: np.ndarray) -> np.ndarray:
        return self._matmul(self.act(self._matmul(y, ffn.w1)) * self._matmul(y, ffn.w3), ffn.w2)

    def end(self, x: np.ndarray) -> np.ndarray:
        y = ref.rms_norm(x, self.weights.final_norm, self.shape.norm_eps)
        return self._matmul(y, self.weights.output)
