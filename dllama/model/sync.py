"""Where the nodes of a cluster meet inside a forward: the seam between the math and the network.

Each attention and feed-forward block returns this node's *partial* output; ``all_reduce`` turns
the partial outputs of all nodes into the block's full output before the residual add. On one
node that is the identity (``LocalSync``); in a cluster it is the all-gather-and-sum of
``transport.sync``, which implements these protocols without the model importing it.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from dllama.model.batch import Batch

# The two blocks of a layer whose partial outputs are summed across nodes.
ATTENTION = 0
FEED_FORWARD = 1


class BlockSync(Protocol):
    """What a node's layers call between blocks, during one forward."""

    def all_reduce(self, partial: np.ndarray, layer: int, block: int) -> np.ndarray:
        """The sum of every node's partial output of ``block`` (ATTENTION or FEED_FORWARD) of
        ``layer``; the same bits on every node."""


class Sync(Protocol):
    """A whole forward over all nodes, from the root."""

    def begin(self, x: np.ndarray, batch: Batch) -> BlockSync:
        """Start a forward of the embedded input ``x`` (one row per row of ``batch``) on every
        node; its sync points."""

    def finish(self, logits: np.ndarray) -> np.ndarray:
        """The root's slice of the logits joined with every other node's: the whole vocabulary."""


class LocalSync:
    """One node holds the whole model: its partial output is the full output."""

    def begin(self, x: np.ndarray, batch: Batch) -> LocalSync:
        return self

    def all_reduce(self, partial: np.ndarray, layer: int, block: int) -> np.ndarray:
        return partial

    def finish(self, logits: np.ndarray) -> np.ndarray:
        return logits


LOCAL = LocalSync()
