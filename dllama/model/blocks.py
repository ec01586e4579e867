"""The forward pass's blocks, as a strategy chosen once when a model is built: the NumPy
reference blocks or the JIT blocks. Both read the same ``NodeWeights``; neither knows of the
other, of the ``Transformer`` that calls them, or of a cluster."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from dllama.kernels.backend import NUMBA, NUMPY
from dllama.model.dense import DenseBudget, DenseWeights
from dllama.model.kv_cache import KVCache
from dllama.model.shape import NodeShape
from dllama.model.weights import NodeWeights


class Blocks(Protocol):
    def prepare(self) -> None:
        """Do now what the first forward would otherwise pay for."""

    def start(self, tokens: np.ndarray) -> np.ndarray:
        """The embedded input ``[tokens, dim]`` (the root's: it holds the embedding)."""

    def attention(self, layer: int, x: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """This node's partial output of the attention of ``layer`` for the rows of ``x``, row t
        at ``positions[t]`` of KV cache slot ``slots[t]``; writes the rows' keys and values into
        the cache, then each row attends to positions 0..its own of its slot."""

    def feed_forward(self, layer: int, x: np.ndarray) -> np.ndarray:
        """This node's partial output of the feed-forward of ``layer``."""

    def end(self, x: np.ndarray) -> np.ndarray:
        """This node's slice of the logits of the rows of ``x``."""


def make_blocks(backend: str, weights: NodeWeights, shape: NodeShape, kv_cache: KVCache, rope_cos: np.ndarray,
                rope_sin: np.ndarray, budget: DenseBudget | None = None, dense: DenseWeights | None = None) -> Blocks:
    """The blocks of ``backend``. The NumPy blocks multiply through ``dense`` (default: float32
    copies within ``budget``), which a caller may give to watch every product."""
    budget = budget or DenseBudget()  # reads DLLAMA_DENSE_BUDGET_MB: a bad value is an error on either backend
    if backend == NUMBA:
        if dense is not None:
            raise ValueError("dense products are the NumPy blocks' own")
        from dllama.model.jit_blocks import JitBlocks  # imports numba: only when it runs

        return JitBlocks(weights, shape, kv_cache, rope_cos, rope_sin)
    if backend != NUMPY:
        raise ValueError(f"no kernel backend {backend!r} (numba or numpy)")
    from dllama.model.numpy_blocks import NumpyBlocks

    return NumpyBlocks(weights, shape, kv_cache, rope_cos, rope_sin, dense or DenseWeights(budget))
