"""Keys and values of every past position, for the KV heads a node holds, in ``slots``: one per
sequence that may run at once (continuous batching); a single generation uses slot 0.

The arrays are zeros from the OS: a page of memory is committed when a position is first
written, so the memory in use grows with the positions evaluated, up to ``nbytes``."""
from __future__ import annotations

import numpy as np

from dllama.machine import small_pages


class KVCache:
    """``k`` and ``v``: ``[layers, slots, seq_len, kv_heads, head_dim]`` float32."""

    def __init__(self, n_layers: int, seq_len: int, n_kv_heads: int, head_dim: int, n_slots: int = 1):
        shape = (n_layers, n_slots, seq_len, n_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        # Written a position at a time: huge pages would commit (and clear) 2 MiB per first write.
        small_pages(self.k)
        small_pages(self.v)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Slot ``dst`` holds what slot ``src`` holds at positions 0..length-1 (choices that share a prompt)."""
        if src != dst:
            self.k[:, dst, :length] = self.k[:, src, :length]
            self.v[:, dst, :length] = self.v[:, src, :length]
