"""A node's weights as plain data: the stored elements (memory-mapped from the ``.m`` file, or
received from the root) and their type. Both kernel backends read these; each keeps its own
working form (the NumPy blocks float32 copies, the JIT blocks packed layouts)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dllama.kernels.quants import FloatType
from dllama.model.slicing import NodeModel


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a backend's copies are keyed by it
class Weight:
    """A matrix ``[out, in]`` as stored: rows of floats, or of Q40/Q80 blocks of 32 values."""

    stored: np.ndarray
    float_type: FloatType
    name: str = ""  # the tensor's name in the .m file ("layers.0.q", "output")

    @property
    def rows(self) -> int:
        return self.stored.shape[0]


@dataclass
class FeedForwardWeights:
    w1: Weight  # gate
    w2: Weight  # down
    w3: Weight  # up


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    q: Weight
    k: Weight
    v: Weight
    o: Weight
    ffn_norm: np.ndarray
    ffn: FeedForwardWeights | None = None  # dense models
    router: np.ndarray | None = None  # MoE models: the router and the experts
    experts: list[FeedForwardWeights] | None = None
    q_norm: np.ndarray | None = None  # Qwen3: per-head norms of q and k
    k_norm: np.ndarray | None = None

    def feed_forwards(self) -> list[FeedForwardWeights]:
        return self.experts if self.experts is not None else [self.ffn]


@dataclass
class NodeWeights:
    embedding: np.ndarray | None  # the root's only: it embeds the input for every node
    layers: list[LayerWeights]
    final_norm: np.ndarray
    output: Weight
    reclaimable: bool = False  # the stored arrays were handed over: packing may give their memory back


def node_weights(share: NodeModel) -> NodeWeights:
    """The weights of a node's share, named by their role (no copies)."""
    h, t = share.header, share.tensors

    def weight(name: str) -> Weight:
        return Weight(t[name], h.weight_type, name)

    def feed_forward(prefix: str) -> FeedForwardWeights:
        return FeedForwardWeights(weight(prefix + "w1"), weight(prefix + "w2"), weight(prefix + "w3"))

    layers = []
    for i in range(h.n_layers):
        p = f"layers.{i}."
        layer = LayerWeights(attn_norm=np.asarray(t[p + "attn_norm"]), q=weight(p + "q"), k=weight(p + "k"),
                             v=weight(p + "v"), o=weight(p + "o"), ffn_norm=np.asarray(t[p + "ffn_norm"]))
        if h.is_moe:
            layer.router = np.asarray(t[p + "router"])
            layer.experts = [feed_forward(f"{p}experts.{e}.") for e in range(h.n_experts)]
        else:
            layer.ffn = feed_forward(p)
        if h.has_qk_norm:
            layer.q_norm = np.asarray(t[p + "q_norm"])
            layer.k_norm = np.asarray(t[p + "k_norm"])
        layers.append(layer)
    return NodeWeights(embedding=t.get("embedding"), layers=layers, final_norm=np.asarray(t["final_norm"]),
                       output=weight("output"), reclaimable=share.reclaimable)
