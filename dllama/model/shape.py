"""The sizes and settings one node's blocks compute with."""
from __future__ import annotations

from dataclasses import dataclass

from dllama.formats.mfile import HiddenAct, ModelHeader, RopeType
from dllama.model.slicing import NodeSlice


@dataclass(frozen=True)
class NodeShape:
    """What a node's blocks need to know beyond their weights: head sizes, this node's share of
    heads and vocabulary (the whole model on one node), and the settings that choose the
    arithmetic."""

    head_dim: int
    n_heads: int  # query heads of this node
    n_kv_heads: int  # KV heads of this node
    group: int  # query heads per KV head, in the whole model
    head_offset: int  # where this node's first query head sits inside its KV group
    vocab_size: int  # logits this node computes
    norm_eps: float
    n_active_experts: int  # MoE: experts per token (0: a dense feed-forward)
    rope_falcon: bool  # NeoX rope pairs (i, i + head_dim/2), else interleaved (2i, 2i + 1)
    gelu: bool  # GELU (tanh approximation), else SiLU
    q80_buffers: bool  # quantized weights multiply Q80-rounded activations

    @classmethod
    def of(cls, h: ModelHeader, node: NodeSlice, q80_buffers: bool) -> NodeShape:
        group = h.n_heads // h.n_kv_heads
        return cls(head_dim=h.head_dim, n_heads=node.n_heads, n_kv_heads=node.n_kv_heads, group=group,
                   head_offset=node.head_offset(group), vocab_size=node.vocab_size, norm_eps=h.norm_epsilon,
                   n_active_experts=h.n_active_experts if h.is_moe else 0,
                   rope_falcon=h.effective_rope_type == RopeType.FALCON, gelu=h.hidden_act == HiddenAct.GELU,
                   q80_buffers=q80_buffers)
