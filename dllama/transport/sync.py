"""The forward's sync points on a cluster: the all-gather-and-sum of partial outputs, the root's
broadcast of the embedded input, and the logits slices sent back to the root."""
from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from dllama.transport.mesh import Mesh
from dllama.transport.protocol import ProtocolError


class Codec(Protocol):
    def encode(self, x: np.ndarray) -> bytes: ...

    def sum_parts(self, parts: list, rows: int, dim: int) -> np.ndarray: ...


class MeshSync:
    """What every node's forward calls between blocks."""

    def __init__(self, mesh: Mesh, codec: Codec, n_nodes: int, dim: int):
        self.mesh = mesh
        self.codec = codec
        self.index = mesh.index
        self.n_nodes = n_nodes
        self.dim = dim
        self.others = [i for i in range(n_nodes) if i != self.index]
        self.fwd = 0
        self.rows = 0
        self.seconds = 0.0  # time spent in syncs, encoding and summing included

    def all_reduce(self, partial: np.ndarray, layer: int, block: str) -> np.ndarray:
        t0 = time.perf_counter()
        step = 1 + 2 * layer + (0 if block == "attention" else 1)
        own = self.codec.encode(partial)
        self.mesh.publish(self.fwd, step, own)
        parts = self.mesh.gather(self.fwd, step, self.others)
        parts[self.index] = own
        try:  # node order: the same float sums on every node
            total = self.codec.sum_parts([parts[node] for node in range(self.n_nodes)], self.rows, self.dim)
        except ValueError as e:
            raise ProtocolError(f"a part: {e}") from None
        self.seconds += time.perf_counter() - t0
        return total

    def publish_input(self, fwd: int, x: np.ndarray) -> None:
        """The root: start forward ``fwd`` with the embedded input on every node."""
        self.fwd, self.rows = fwd, x.shape[0]
        self.mesh.publish(fwd, 0, np.ascontiguousarray(x, dtype=np.float32).tobytes())

    def receive_input(self, fwd: int, rows: int) -> np.ndarray:
        """A worker: the root's embedded input of forward ``fwd``."""
        t0 = time.perf_counter()
        self.fwd, self.rows = fwd, rows
        data = self.mesh.gather(fwd, 0, [0])[0]
        if len(data) != rows * self.dim * 4:
            raise ProtocolError(f"an input of {len(data)} bytes for {rows} x {self.dim} values")
        self.seconds += time.perf_counter() - t0
        return np.frombuffer(data, dtype=np.float32).reshape(rows, self.dim).copy()
