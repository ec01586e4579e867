"""The transformer forward pass: start, then (attention, feed-forward) per layer, end.

Each block returns this node's *partial* output; the sync sums the nodes' parts into the
block's output before the residual add (the identity on one node, the all-gather between
nodes in a cluster: ``model.sync``). The blocks themselves are a strategy chosen once, when
the model is built (``model.blocks``: NumPy reference or numba kernels).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dllama.errors import DllamaError
from dllama.formats.mfile import ModelFile, ModelHeader
from dllama.kernels.backend import backend as default_backend
from dllama.kernels.quants import FloatType
from dllama.model.blocks import make_blocks
from dllama.model.dense import DenseBudget, DenseWeights
from dllama.model.kv_cache import KVCache
from dllama.model.rope import rope_tables
from dllama.model.shape import NodeShape
from dllama.model.slicing import NodeModel
from dllama.model.sync import ATTENTION, FEED_FORWARD, LOCAL, BlockSync, Sync
from dllama.model.weights import node_weights

# Prompt tokens evaluated per forward: weights are read once per batch.
MAX_BATCH = 32


class Transformer:
    """A model ready to run: the weights of a ``.m`` file (or one node's share of them), a KV
    cache of ``seq_len`` positions for the node's KV heads, and the ``sync`` that joins this
    node's forward with the other nodes' (none on one node)."""

    def __init__(self, model: ModelFile | NodeModel, seq_len: int | None = None,
                 buffer_type: FloatType = FloatType.F32, sync: Sync = LOCAL,
                 budget: DenseBudget | None = None, backend: str | None = None, dense: DenseWeights | None = None):
        share = model if isinstance(model, NodeModel) else NodeModel.from_model(model)
        h = share.header
        self.node = share.node
        self.header: ModelHeader = h if seq_len is None else h.with_seq_len(seq_len)
        self.shape = NodeShape.of(self.header, self.node, buffer_type == FloatType.Q80)
        self._sync = sync  # fixed for the model's life
        weights = node_weights(share)  # not kept: the blocks hold what they compute with
        self.kv_cache = KVCache(h.n_layers, self.seq_len, self.node.n_kv_heads, h.head_dim)
        self.backend = backend or default_backend()
        rope_cos, rope_sin = rope_tables(h, self.seq_len)
        self.blocks = make_blocks(self.backend, weights, self.shape, self.kv_cache, rope_cos, rope_sin, budget, dense)

    @property
    def seq_len(self) -> int:
        return self.header.seq_len

    def prepare(self) -> None:
        """Do now what the first forward would otherwise pay for (the NumPy blocks' dense copies)."""
        self.blocks.prepare()

    def forward(self, tokens: Sequence[int], pos: int, all_logits: bool = False) -> np.ndarray:
        """Evaluate ``tokens`` at positions ``pos ..`` on every node; logits of the last token
        (or of all), over the whole vocabulary."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        if not 0 < n <= MAX_BATCH:
            raise ValueError(f"a forward takes 1 to {MAX_BATCH} tokens, got {n}")
        if pos < 0 or pos + n > self.seq_len:
            raise DllamaError(f"context is full: positions {pos}..{pos + n - 1} exceed the "
                              f"sequence length {self.seq_len} (raise --max-seq-len)")
        if tokens.min() < 0 or tokens.max() >= self.header.vocab_size:
            raise DllamaError(f"token id out of range 0..{self.header.vocab_size - 1}")
        x = self.blocks.start(tokens)
        steps = self._sync.begin(x, pos, all_logits)
        logits = self._sync.finish(self.forward_embedded(x, pos, all_logits, steps))
        return logits if all_logits else logits[0]

    def forward_embedded(self, x: np.ndarray, pos: int, all_logits: bool, sync: BlockSync) -> np.ndarray:
        """The layers on an embedded input, then this node's slice of the logits (of the last
        token, or of all): what every node of a cluster runs, meeting the others at ``sync``."""
        for i in range(self.header.n_layers):
            x = x + sync.all_reduce(self.blocks.attention(i, x, pos), i, ATTENTION)
            x = x + sync.all_reduce(self.blocks.feed_forward(i, x), i, FEED_FORWARD)
        return self.blocks.end(x if all_logits else x[-1:])
