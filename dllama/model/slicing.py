"""Tensor parallelism: which part of every weight each node of a cluster holds.

The cut is distributed-llama's: q, k, v, w1, w3 and the output head by output rows; o and w2
by input columns, so each node's attention and feed-forward outputs are partial sums that the
all-gather adds up. Attention is split by whole heads, the KV cache with it. Beyond the
original, any node count works and slices may be uneven:

- sizes are split in proportion to per-node weights (``--split``, equal by default) in whole
  units: KV heads, feed-forward rows in whole 32-value blocks (w2's columns are quantized
  blocks), vocabulary rows;
- with at most as many nodes as KV heads, nodes take whole KV groups (and their query heads);
  with more nodes, query heads are split and each node keeps the KV heads its query heads
  read, so a KV head may live on two nodes (replicated; its rows are computed on both).

The embedding table lives on the root only: it embeds the input and broadcasts it. Norms and
the MoE router are small and kept whole everywhere.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

from dllama.errors import DllamaError
from dllama.formats.cuts import TensorCut
from dllama.formats.mfile import ModelHeader, TensorSpec, tensor_plan
from dllama.kernels.quants import BLOCK_SIZE

Range = tuple[int, int]


@dataclass(frozen=True)
class NodeSlice:
    """One node's share: half-open ranges of query heads, KV heads, feed-forward hidden units
    (of every expert, for MoE) and vocabulary rows."""

    index: int
    n_nodes: int
    q_heads: Range
    kv_heads: Range
    hidden: Range
    vocab: Range

    @property
    def n_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def hidden_dim(self) -> int:
        return self.hidden[1] - self.hidden[0]

    @property
    def vocab_size(self) -> int:
        return self.vocab[1] - self.vocab[0]

    @property
    def is_root(self) -> bool:
        return self.index == 0

    def head_offset(self, group: int) -> int:
        """Where the first query head sits inside its KV group (0 unless heads are split inside groups)."""
        return self.q_heads[0] - self.kv_heads[0] * group

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "NodeSlice":
        try:
            ranges = {k: (int(d[k][0]), int(d[k][1])) for k in ("q_heads", "kv_heads", "hidden", "vocab")}
            return cls(index=int(d["index"]), n_nodes=int(d["n_nodes"]), **ranges)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError):
            raise DllamaError("malformed node slice") from None


def ffn_hidden_dim(h: ModelHeader) -> int:
    return h.moe_hidden_dim if h.is_moe else h.hidden_dim


def whole_model(h: ModelHeader) -> NodeSlice:
    """The slice of a single node: everything."""
    return NodeSlice(0, 1, (0, h.n_heads), (0, h.n_kv_heads), (0, ffn_hidden_dim(h)), (0, h.vocab_size))


def proportional(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` units split in proportion to ``weights``, at least one each (largest remainder;
    ties go to the lower index, so the root gets the extra unit)."""
    n = len(weights)
    if total < n:
        raise ValueError(f"{total} units cannot give each of {n} nodes one")
    scale = total / sum(weights)
    ideal = [w * scale for w in weights]
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) > total:
        i = max((i for i in range(n) if counts[i] > 1), key=lambda i: (counts[i] - ideal[i], -i))
        counts[i] -= 1
    while sum(counts) < total:
        i = max(range(n), key=lambda i: (ideal[i] - counts[i], -i))
        counts[i] += 1
    return counts


def _ranges(counts: Sequence[int], unit: int = 1) -> list[Range]:
    out, start = [], 0
    for c in counts:
        out.append((start * unit, (start + c) * unit))
        start += c
    return out


def plan_slices(h: ModelHeader, weights: Sequence[float]) -> list[NodeSlice]:
    """Every node's slice, root first, for nodes of the given relative speeds."""
    n = len(weights)
    if n < 1 or any(not (w > 0) or w == float("inf") for w in weights):
        raise DllamaError("--split needs one positive finite weight per node")
    group = h.n_heads // h.n_kv_heads
    if n > h.n_heads:
        raise DllamaError(f"{n} nodes are more than the model's {h.n_heads} attention heads; "
                          f"use at most {h.n_heads} nodes")
    if n <= h.n_kv_heads:
        kv = _ranges(proportional(h.n_kv_heads, weights))
        q = [(a * group, b * group) for a, b in kv]
    else:  # split query heads; each node keeps the KV heads they read
        q = _ranges(proportional(h.n_heads, weights))
        kv = [(a // group, -(-b // group)) for a, b in q]
    hidden = ffn_hidden_dim(h)
    unit = BLOCK_SIZE if hidden % BLOCK_SIZE == 0 else 1
    if hidden // unit < n:
        raise DllamaError(f"the feed-forward's {hidden} rows cannot be split over {n} nodes")
    rows = _ranges(proportional(hidden // unit, weights), unit)
    vocab = _ranges(proportional(h.vocab_size, weights))
    if h.weight_type.is_quantized and n > 1 and h.head_dim % BLOCK_SIZE:
        raise DllamaError(f"quantized weights split by head need a head size that is a multiple of "
                          f"{BLOCK_SIZE}; this model's is {h.head_dim}")
    return [NodeSlice(i, n, q[i], kv[i], rows[i], vocab[i]) for i in range(n)]


def _cut(name: str, h: ModelHeader, node: NodeSlice) -> tuple[int, Range] | None:
    """(axis in values, range) of tensor ``name`` that the node holds; None when it holds it whole."""
    d = h.head_dim
    kind = name.rsplit(".", 1)[-1]
    if kind == "q":
        return 0, (node.q_heads[0] * d, node.q_heads[1] * d)
    if kind in ("k", "v"):
        return 0, (node.kv_heads[0] * d, node.kv_heads[1] * d)
    if kind == "o":
        return 1, (node.q_heads[0] * d, node.q_heads[1] * d)
    if kind in ("w1", "w3"):
        return 0, node.hidden
    if kind == "w2":
        return 1, node.hidden
    if name == "output":
        return 0, node.vocab
    return None


def node_specs(h: ModelHeader, node: NodeSlice) -> list[TensorSpec]:
    """The tensors a node holds, in file order, with their sliced shapes."""
    specs = []
    for spec in tensor_plan(h):
        if spec.name == "embedding" and not node.is_root:
            continue
        cut = _cut(spec.name, h, node)
        shape = spec.shape
        if cut is not None:
            axis, (a, b) = cut
            shape = tuple(b - a if i == axis else s for i, s in enumerate(shape))
        specs.append(TensorSpec(spec.name, shape, spec.float_type))
    return specs


def node_tensors(tensors: Mapping[str, np.ndarray], h: ModelHeader, node: NodeSlice) -> dict[str, np.ndarray]:
    """Views of the whole model's stored tensors that make up the node's share (no copies)."""
    out = {}
    for spec in node_specs(h, node):
        t = tensors[spec.name]
        cut = _cut(spec.name, h, node)
        if cut is not None:
            axis, (a, b) = cut
            if axis == 1:
                per = spec.float_type.values_per_element
                t = t[:, a // per:b // per]
            else:
                t = t[a:b]
        out[spec.name] = t
    return out


def node_cuts(h: ModelHeader, node: NodeSlice) -> list[TensorCut]:
    """The node's tensors (``node_specs`` order) as byte ranges of the whole stored tensors."""
    cuts = []
    for spec in tensor_plan(h):
        if spec.name == "embedding" and not node.is_root:
            continue
        rows = spec.shape[0] if len(spec.shape) == 2 else 1
        row_bytes = spec.nbytes // rows
        cut = _cut(spec.name, h, node)
        if cut is None:
            cuts.append(TensorCut(spec.name, rows, row_bytes, 0, 0, rows))
        elif cut[0] == 0:
            cuts.append(TensorCut(spec.name, rows, row_bytes, 0, *cut[1]))
        else:
            per_byte = spec.shape[1] / row_bytes  # values per byte (a fraction for F32, more for Q40)
            lo, hi = cut[1]
            cuts.append(TensorCut(spec.name, rows, row_bytes, 1, round(lo / per_byte), round(hi / per_byte)))
    return cuts


def whole_bytes(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """A whole stored tensor as rows x bytes (what ``TensorCut`` ranges index)."""
    t = tensors[name]
    return t.reshape(t.shape[0] if t.ndim == 2 else 1, -1).view(np.uint8)


def node_weight_bytes(h: ModelHeader, node: NodeSlice) -> int:
    return sum(s.nbytes for s in node_specs(h, node))


def node_kv_bytes(h: ModelHeader, node: NodeSlice, seq_len: int, n_slots: int = 1) -> int:
    """The most a node's KV cache holds: ``n_slots`` sequences of ``seq_len`` positions."""
    return 2 * h.n_layers * n_slots * seq_len * node.n_kv_heads * h.head_dim * 4


def plan_digest(h: ModelHeader, node: NodeSlice) -> str:
    """A stable text of what a node holds, for keys of the workers' slice caches."""
    return json.dumps({"slice": node.to_json(), "header": {k: (v.name if hasattr(v, "name") else v)
                                                           for k, v in asdict(h).items()
                                                           if k not in ("seq_len", "header_size")}},
                      sort_keys=True)


@dataclass
class NodeModel:
    """A node's share of a model: the header of the whole model, the slice, its tensors."""

    header: ModelHeader
    node: NodeSlice
    tensors: Mapping[str, np.ndarray]
    # The tensors were handed over (a worker's received slice): a model built from them may give
    # their memory back once it holds its own copy (see ``model.jit_blocks``).
    reclaimable: bool = False

    @classmethod
    def from_model(cls, model, node: NodeSlice | None = None) -> "NodeModel":
        """The share ``node`` (default: everything) of a model with whole ``tensors`` (a ModelFile)."""
        h = model.header
        node = node or whole_model(h)
        return cls(h, node, node_tensors(model.tensors, h, node))


def describe_plan(h: ModelHeader, plan: list[NodeSlice], addresses: list[str], seq_len: int,
                  n_slots: int = 1) -> list[str]:
    """One line per node (``addresses``: the workers'): what it holds and the memory it needs
    (its KV cache at most)."""
    lines = []
    for node, name in zip(plan, ["root"] + addresses):
        weights = node_weight_bytes(h, node)
        kv = node_kv_bytes(h, node, seq_len, n_slots)
        lines.append(f"💡 Node {node.index} ({name}): heads {node.q_heads[0]}..{node.q_heads[1] - 1}, "
                     f"KV heads {node.kv_heads[0]}..{node.kv_heads[1] - 1}, FFN rows {node.hidden[0]}..{node.hidden[1] - 1}, "
                     f"vocab rows {node.vocab[0]}..{node.vocab[1] - 1}: {weights / 1e6:.1f} MB weights + "
                     f"{kv / 1e6:.1f} MB KV cache")
    return lines
