"""The forward's blocks on the numba kernels: the weights repacked once for them, then one
jitted call per block (``kernels.jit.blocks``). MoE layers run their router and expert mixing
here, in Python, around one jitted call per expert."""
from __future__ import annotations

import numpy as np

from dllama.kernels.backend import cpu_path
from dllama.kernels.jit import blocks as fused
from dllama.kernels.jit import elementwise, matmul
from dllama.kernels.jit.float16 import f16_table
from dllama.kernels.jit.packing import pack_rows, padded_rows
from dllama.machine import file_backed, release_pages
from dllama.model.kv_cache import KVCache
from dllama.model.moe import mix_experts
from dllama.model.shape import NodeShape
from dllama.model.weights import FeedForwardWeights, NodeWeights, Weight


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _packed(weights: list[Weight], reclaimable: bool) -> tuple[tuple, int]:
    """Weights stacked by rows and packed as one (one parallel launch for all), and the padded
    width of its product. Stored rows that packing copied give their memory back as soon as
    they are packed, so that a node holds one copy of its share, plus a chunk, while packing:
    a file's pages always (they can be read again), other memory when the weights were handed
    over (``reclaimable``: a worker's received slice)."""
    ft = weights[0].float_type
    stored = [w.stored for w in weights]
    release = reclaimable or all(file_backed(s) for s in stored)
    packed = pack_rows(stored, ft, release_pages if release else None)
    return packed, padded_rows(sum(w.rows for w in weights), ft)


class JitBlocks:
    def __init__(self, weights: NodeWeights, shape: NodeShape, kv_cache: KVCache, rope_cos: np.ndarray,
                 rope_sin: np.ndarray):
        self.shape = shape
        q80 = bool(shape.q80_buffers and weights.output.float_type.is_quantized)
        products = dict(q80=q80, path=cpu_path(), f16_table=f16_table())
        eps = np.float32(shape.norm_eps)
        self.embedding = _f32(weights.embedding) if weights.embedding is not None else None
        empty = np.zeros(0, dtype=np.float32)
        reclaim = weights.reclaimable

        def expert(f: FeedForwardWeights) -> fused.ExpertArgs:
            (w13, w13_rows), (w2, w2_rows) = _packed([f.w1, f.w3], reclaim), _packed([f.w2], reclaim)
            return fused.ExpertArgs(w13=w13, w13_rows=w13_rows, hidden=f.w1.rows, w2=w2, w2_rows=w2_rows,
                                    gelu=shape.gelu, **products)

        self.attention_args: list[fused.AttentionArgs] = []
        self.ffn_args: list[fused.FeedForwardArgs | None] = []  # dense layers
        self.moe: list[tuple[np.ndarray, np.ndarray, list[fused.ExpertArgs]] | None] = []  # (norm, router, experts)
        for i, layer in enumerate(weights.layers):
            (qkv, qkv_rows), (o, o_rows) = _packed([layer.q, layer.k, layer.v], reclaim), _packed([layer.o], reclaim)
            self.attention_args.append(fused.AttentionArgs(
                norm=_f32(layer.attn_norm), eps=eps, qkv=qkv, qkv_rows=qkv_rows,
                q_norm=_f32(layer.q_norm) if layer.q_norm is not None else empty,
                k_norm=_f32(layer.k_norm) if layer.k_norm is not None else empty,
                cos=rope_cos, sin=rope_sin, falcon=shape.rope_falcon, k_cache=kv_cache.k[i], v_cache=kv_cache.v[i],
                n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, head_dim=shape.head_dim, group=shape.group,
                head_offset=shape.head_offset, o=o, o_rows=o_rows, **products))
            if layer.experts is None:
                self.ffn_args.append(fused.FeedForwardArgs(norm=_f32(layer.ffn_norm), eps=eps,
                                                           **expert(layer.ffn)._asdict()))
                self.moe.append(None)
            else:
                self.ffn_args.append(None)
                self.moe.append((_f32(layer.ffn_norm), _f32(layer.router), [expert(f) for f in layer.experts]))
        output, output_rows = _packed([weights.output], reclaim)
        self.end_args = fused.EndArgs(norm=_f32(weights.final_norm), eps=eps, w=output, rows=output_rows,
                                      vocab=shape.vocab_size, **products)

    def prepare(self) -> None:
        """Nothing to do: the weights were packed when the blocks were made."""

    def start(self, tokens: np.ndarray) -> np.ndarray:
        return fused.start_block(self.embedding, tokens)

    def attention(self, i: int, x: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return fused.attention_block(x, slots, positions, *self.attention_args[i])

    def feed_forward(self, i: int, x: np.ndarray) -> np.ndarray:
        if self.moe[i] is None:
            return fused.ffn_block(x, *self.ffn_args[i])
        norm, router, experts = self.moe[i]
        y = elementwise.rms_norm(x, norm, self.shape.norm_eps)
        probs = elementwise.softmax(matmul.matmul(y, router), axis=-1)
        return mix_experts(y, probs, self.shape.n_active_experts, lambda e, rows: fused.expert_ffn(rows, *experts[e]))

    def end(self, x: np.ndarray) -> np.ndarray:
        return fused.end_block(np.ascontiguousarray(x), *self.end_args)
