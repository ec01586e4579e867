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

from dllama.kernels import nucleus
from dllama.transport.mesh import HEADER, Mesh, PeerFailed
from dllama.transport.protocol import INPUT_STEP, ProtocolError, data_step
from dllama.transport.root import RootLink, WorkerFailed
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
        size = x.size * 4
        self.mesh.own_part(size).view(np.float32)[:] = x.reshape(-1)
        self.mesh.publish_part(fwd, INPUT_STEP, size)
        return ForwardSync(self, fwd, x.shape[0])

    def receive_input(self, fwd: int, rows: int) -> tuple[np.ndarray, ForwardSync]:
        """A worker: the root's embedded input of forward ``fwd``, and the forward's sync points."""
        t0 = time.perf_counter()
        data = self.gather(fwd, INPUT_STEP, [0], rows * self.dim * 4)[0]
        if len(data) != rows * self.dim * 4:
            raise ProtocolError(f"an input of {len(data)} bytes for {rows} x {self.dim} values")
        x = np.frombuffer(data, dtype=np.float32).reshape(rows, self.dim).copy()
        self.seconds += time.perf_counter() - t0
        return x, ForwardSync(self, fwd, rows)

    def gather(self, fwd: int, step: int, sources: list[int], max_size: int) -> dict:
        try:
            return self.mesh.gather(fwd, step, sources, max_size)
        except PeerFailed as e:
            raise self.failure(e) from None

    def failure(self, e: PeerFailed) -> Exception:
        """The error this node reports for a peer's failure."""
        return e if self.blame is None else self.blame(e)


class ForwardSync:
    """The sync points of one forward (``model.sync.BlockSync``)."""

    def __init__(self, sync: MeshSync, fwd: int, rows: int):
        self.sync = sync
        self.fwd = fwd
        self.rows = rows

    def all_reduce(self, partial: np.ndarray, layer: int, block: int) -> np.ndarray:
        s, mesh = self.sync, self.sync.mesh
        t0 = time.perf_counter()
        step, size = data_step(layer, block), s.codec.nbytes(self.rows, s.dim)
        s.codec.encode_into(partial, mesh.own_part(size))
        mesh.publish_part(self.fwd, step, size)
        try:
            order = mesh.gather_parts(self.fwd, step, size)
        except PeerFailed as e:
            raise s.failure(e) from None
        total = s.codec.sum_rows(mesh.frames, order, HEADER, self.rows, s.dim)  # node order: the same bits everywhere
        s.seconds += time.perf_counter() - t0
        return total


class DrawRow:
    """A row of logits that the nodes summarized for a draw (``kernels.nucleus``): the draw is
    made from the summaries, or from the whole row, fetched from the workers where they cannot
    decide it. Valid until the next forward. A worker lost while the row is fetched fails the
    fetch with the cluster's errors, unless ``again`` was set: then ``again(error)`` gives the
    whole row some other way (the engine recovers the cluster and evaluates the row again)."""

    def __init__(self, draw, parts: list, whole: Callable[[], np.ndarray]):
        self.draw, self.parts, self._fetch = draw, parts, whole
        self._row: np.ndarray | None = None
        self.again: Callable[[Exception], np.ndarray] | None = None

    def _whole(self) -> np.ndarray:
        if self._row is None:
            try:
                self._row = self._fetch()
            except (WorkerFailed, PeerFailed, ProtocolError) as e:
                if self.again is None:
                    raise
                self._row = self.again(e.with_traceback(None))
        return self._row

    def sample(self, temperature: float, topp: float, coin: float) -> int:
        """The token ``nucleus.draw_full`` gives on the whole row's first ``draw.tokens``."""
        if (temperature, topp) == (self.draw.temperature, self.draw.topp):
            token = nucleus.draw(self.parts, temperature, topp, coin)
            if token is not None:
                return token
        return nucleus.draw_full(self._whole()[:self.draw.tokens], temperature, topp, coin)


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
        self.offsets = [sum(vocab_sizes[:i]) for i in range(len(vocab_sizes))]
        self.mesh_sync = MeshSync(link.mesh, codec, len(vocab_sizes), dim, blame=link.failed)
        self.fwd = 0
        self.draws: tuple = ()  # of the forward under way
        self.logits_seconds = 0.0
        self.second_rounds = 0  # rows fetched whole after their summaries

    def begin(self, x: np.ndarray, batch) -> ForwardSync:
        """``batch``: the forward's ``model.batch.Batch`` (sent as it describes itself)."""
        self.fwd += 1
        self.draws = batch.draws
        self.link.forward(self.fwd, batch.to_json())
        return self.mesh_sync.publish_input(self.fwd, x)

    def finish(self, logits: np.ndarray) -> np.ndarray | list:
        """The whole rows [rows, vocabulary]; where the batch asked for draws, a list of rows:
        whole ones, and ``DrawRow`` for those the workers summarized."""
        t0 = time.perf_counter()
        n_rows, draws = logits.shape[0], list(self.draws)
        nodes = [nucleus.summarize_rows(logits, 0, draws)]
        for node, blob in enumerate(self.link.logits(self.fwd), start=1):
            try:
                nodes.append(nucleus.decode(blob, draws, n_rows, self.vocab_sizes[node], self.offsets[node]))
            except ValueError as e:
                raise self.link.failed(PeerFailed([node], f"sent logits that do not parse: {e}")) from None
        self.logits_seconds += time.perf_counter() - t0
        if not draws:  # whole rows only: every node's [rows, slice] side by side
            return np.concatenate([logits] + [np.asarray(rows, dtype=np.float32).reshape(n_rows, size)
                                              for rows, size in zip(nodes[1:], self.vocab_sizes[1:])], axis=1)
        out: list = []
        for r, d in enumerate(draws):
            if d is None:
                out.append(np.concatenate([rows[r] for rows in nodes]))
            else:
                out.append(DrawRow(d, [rows[r] for rows in nodes],
                                   lambda r=r, own=logits[r], fwd=self.fwd: self._whole(fwd, r, own)))
        return out

    def _whole(self, fwd: int, row: int, own: np.ndarray) -> np.ndarray:
        """Row ``row`` of forward ``fwd``, whole, from every worker (a second round)."""
        if self.link.closed:  # the cluster moved on to a new session
            raise WorkerFailed(f"the session of forward {fwd} is over: its rows of logits are gone")
        if fwd != self.fwd:
            raise ValueError(f"a row of forward {fwd} fetched after forward {self.fwd}")
        self.second_rounds += 1
        parts = [own]
        for node, blob in enumerate(self.link.rows(fwd, [row]), start=1):
            if len(blob) != self.vocab_sizes[node] * 4:
                raise self.link.failed(PeerFailed([node], "sent a row of logits of the wrong size"))
            parts.append(np.frombuffer(blob, dtype=np.float32))
        return np.concatenate(parts)

    def stats(self) -> SyncStats:
        mesh, link = self.link.mesh, self.link
        return SyncStats(self.fwd, self.mesh_sync.seconds + self.logits_seconds,
                         mesh.bytes_sent + link.bytes_sent, mesh.bytes_received + link.bytes_received)
