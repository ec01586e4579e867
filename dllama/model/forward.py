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
from dllama.model.batch import MAX_BATCH, Batch
from dllama.model.blocks import make_blocks
from dllama.model.dense import DenseBudget, DenseWeights
from dllama.model.kv_cache import KVCache
from dllama.model.rope import rope_tables
from dllama.model.shape import NodeShape
from dllama.model.slicing import NodeModel
from dllama.model.sync import ATTENTION, FEED_FORWARD, LOCAL, BlockSync, Sync
from dllama.model.weights import node_weights

__all__ = ["MAX_BATCH", "Batch", "Transformer"]


class Transformer:
    """A model ready to run: the weights of a ``.m`` file (or one node's share of them), a KV
    cache of ``n_slots`` sequences of ``seq_len`` positions for the node's KV heads, and the
    ``sync`` that joins this node's forward with the other nodes' (none on one node)."""

    def __init__(self, model: ModelFile | NodeModel, seq_len: int | None = None,
                 buffer_type: FloatType = FloatType.F32, sync: Sync = LOCAL,
                 budget: DenseBudget | None = None, backend: str | None = None, dense: DenseWeights | None = None,
                 n_slots: int = 1):
        share = model if isinstance(model, NodeModel) else NodeModel.from_model(model)
        h = share.header
        self.node = share.node
        self.header: ModelHeader = h if seq_len is None else h.with_seq_len(seq_len)
        self.shape = NodeShape.of(self.header, self.node, buffer_type == FloatType.Q80)
        self._sync = sync  # fixed for the model's life
        weights = node_weights(share)  # not kept: the blocks hold what they compute with
        self.kv_cache = KVCache(h.n_layers, self.seq_len, self.node.n_kv_heads, h.head_dim, n_slots)
        self.backend = backend or default_backend()
        rope_cos, rope_sin = rope_tables(h, self.seq_len)
        self.blocks = make_blocks(self.backend, weights, self.shape, self.kv_cache, rope_cos, rope_sin, budget, dense)

    @property
    def seq_len(self) -> int:
        return self.header.seq_len

    def prepare(self) -> None:
        """Do now what the first forward would otherwise pay for (the NumPy blocks' dense copies)."""
        self.blocks.prepare()

    def forward(self, tokens: Sequence[int], pos: int, all_logits: bool = False, slot: int = 0) -> np.ndarray:
        """Evaluate ``tokens`` at positions ``pos ..`` of ``slot`` on every node; logits of the
        last token (or of all), over the whole vocabulary."""
        n = len(tokens)
        if not 0 < n <= MAX_BATCH:
            raise ValueError(f"a forward takes 1 to {MAX_BATCH} tokens, got {n}")
        if pos < 0 or pos + n > self.seq_len:
            raise DllamaError(f"context is full: positions {pos}..{pos + n - 1} exceed the "
                              f"sequence length {self.seq_len} (raise --max-seq-len)")
        logits = self.forward_batch(tokens, Batch.run(n, pos, slot, all_logits))
        return logits if all_logits else logits[0]

    def forward_batch(self, tokens: Sequence[int], batch: Batch) -> np.ndarray:
        """Evaluate one token per row of ``batch`` on every node; the logits of its logit rows
        ``[rows, vocabulary]``. A row's logits do not depend on the other rows (the kernels
        give every row the same bits alone or in any batch)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) != batch.rows:
            raise ValueError(f"{len(tokens)} tokens for {batch.rows} rows")
        batch.check(self.kv_cache.n_slots, self.seq_len)
        if tokens.min() < 0 or tokens.max() >= self.header.vocab_size:
            raise DllamaError(f"token id out of range 0..{self.header.vocab_size - 1}")
        x = self.blocks.start(tokens)
        steps = self._sync.begin(x, batch)
        return self._sync.finish(self.forward_embedded(x, batch, steps))

    def forward_embedded(self, x: np.ndarray, batch: Batch, sync: BlockSync) -> np.ndarray:
        """The layers on an embedded input, then this node's slice of the logits of the batch's
        logit rows: what every node of a cluster runs, meeting the others at ``sync``."""
        for src, dst, length in batch.copies:
            self.kv_cache.copy_prefix(src, dst, length)
        for i in range(self.header.n_layers):
            x = x + sync.all_reduce(self.blocks.attention(i, x, batch.slots, batch.positions), i, ATTENTION)
            x = x + sync.all_reduce(self.blocks.feed_forward(i, x), i, FEED_FORWARD)
        rows = batch.logit_rows
        if len(rows) == 0:  # a prompt's chunk before its last: only the KV cache was wanted
            return np.zeros((0, self.shape.vocab_size), dtype=np.float32)
        return self.blocks.end(x if len(rows) == len(x) else x[rows])
