"""Keys and values of every past position, for the KV heads a node holds."""
from __future__ import annotations

import numpy as np


class KVCache:
    """``k`` and ``v``: ``[layers, seq_len, kv_heads, head_dim]`` float32."""

    def __init__(self, n_layers: int, seq_len: int, n_kv_heads: int, head_dim: int):
        shape = (n_layers, seq_len, n_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
