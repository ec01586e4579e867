"""The forward's sync points on a cluster, as ``model.sync`` defines them (the model does not
import this module: the root's ``Transformer`` gets a ``RootSync``, a worker's forward the
``ForwardSync`` of each forward).

Per forward: the root publishes the embedded input (step 0), every node all-gathers and sums
the partial outputs of each block (``protocol.data_step``), and each worker sends its slice of
the logits to the root over the control plane. Only sizes are known here, never model types.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dllama.transport.mesh import Mesh, PeerFailed
from dllama.transport.protocol import INPUT_STEP, ProtocolError, data_step
from dllama.transport.root import RootLink
from dllama.transport.wire import WireCodec


class MeshSync:
    """One node's side of the all-gathers, over its ``Mesh``."""

    def __init__(self, mesh: Mesh, codec: WireCodec, n_nodes: int, dim: int,
                 blame: Callable[[PeerFailed], Exception] | None = None):
        self.mesh = mesh
        self.codec = codec
        self.n_nodes = n_nodes
        self.dim = dim
        self.blame = blame  # turns a peer's failure into the error this node reports
        self.others = [i for i in range(n_nodes) if i != mesh.index]
        self.seconds = 0.0  # time spent in syncs, encoding and summing included

    def publish_input(self, fwd: int, x: np.ndarray) -> ForwardSync:
        """The root: start forward ``fwd`` with the embedded input on every node."""
        self.mesh.publish(fwd, INPUT_STEP, np.ascontiguousarray(x, dtype=np.float32).tobytes())
        return ForwardSync(self, fwd, x.shape[0])

    def receive_input(self, fwd: int, rows: int) -> tuple[np.ndarray, ForwardSync]:
        """A worker: the root's embedded input of forward ``fwd``, and the forward's sync points."""
        t0 = time.perf_counter()
        data = self.gather(fwd, INPUT_STEP, [0])[0]
        if len(data) != rows * self.dim * 4:
            raise ProtocolError(f"an input of {len(data)} bytes for {rows} x {self.dim} values")
        x = np.frombuffer(data, dtype=np.float32).reshape(rows, self.dim).copy()
        self.seconds += time.perf_counter() - t0
        return x, ForwardSync(self, fwd, rows)

    def gather(self, fwd: int, step: int, sources: list[int]) -> dict:
        try:
            return self.mesh.gather(fwd, step, sources)
        except PeerFailed as e:
            if self.blame is None:
                raise
            raise self.blame(e) from None


class ForwardSync:
    """The sync points of one forward (``model.sync.BlockSync``)."""

    def __init__(self, sync: MeshSync, fwd: int, rows: int):
        self.sync = sync
        self.fwd = fwd
        self.rows = rows

    def all_reduce(self, partial: np.ndarray, layer: int, block: int) -> np.ndarray:
        s = self.sync
        t0 = time.perf_counter()
        step = data_step(layer, block)
        own = s.codec.encode(partial)
        s.mesh.publish(self.fwd, step, own)
        parts = s.gather(self.fwd, step, s.others)
        parts[s.mesh.index] = own
        try:  # node order: the same float sums on every node
            total = s.codec.sum_parts([parts[node] for node in range(s.n_nodes)], self.rows, s.dim)
        except ValueError as e:
            raise ProtocolError(f"a part: {e}") from None
        s.seconds += time.perf_counter() - t0
        return total


@dataclass
class SyncStats:
    forwards: int = 0
    seconds: float = 0.0  # all-gathers and logits, encoding and summing included
    bytes_sent: int = 0
    bytes_received: int = 0


class RootSync:
    """The root's ``model.sync.Sync``: starts each forward on the workers, all-gathers, and joins
    the workers' slices of the logits (``vocab_sizes``: rows of each node, the root's first)."""

    def __init__(self, link: RootLink, codec: WireCodec, vocab_sizes: list[int], dim: int):
        self.link = link
        self.vocab_sizes = vocab_sizes
        self.mesh_sync = MeshSync(link.mesh, codec, len(vocab_sizes), dim, blame=link.failed)
        self.fwd = 0
        self.logits_seconds = 0.0

    def begin(self, x: np.ndarray, batch) -> ForwardSync:
        """``batch``: the forward's ``model.batch.Batch`` (sent as it describes itself)."""
        self.fwd += 1
        self.link.forward(self.fwd, batch.to_json())
        return self.mesh_sync.publish_input(self.fwd, x)

    def finish(self, logits: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        parts = [logits]
        for node, (rows, blob) in enumerate(zip(self.vocab_sizes[1:], self.link.logits(self.fwd)), start=1):
            if len(blob) != logits.shape[0] * rows * 4:
                raise self.link.failed(PeerFailed([node], "sent logits of the wrong size"))
            parts.append(np.frombuffer(blob, dtype=np.float32).reshape(logits.shape[0], rows))
        self.logits_seconds += time.perf_counter() - t0
        return np.concatenate(parts, axis=1)

    def stats(self) -> SyncStats:
        mesh, link = self.link.mesh, self.link
        return SyncStats(self.fwd, self.mesh_sync.seconds + self.logits_seconds,
                         mesh.bytes_sent + link.bytes_sent, mesh.bytes_received + link.bytes_received)
