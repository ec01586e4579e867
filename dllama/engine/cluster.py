"""The root's side of a cluster: plan the slices, hand every worker its share (or let it use
its slice cache), start the data plane, and build the root's own share with a sync that
reaches the workers (``transport.sync.RootSync``)."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dllama.default_model import dllama_home
from dllama.formats.atomic import write_bytes_atomic
from dllama.formats.digest import sha256_file
from dllama.formats.mfile import ModelFile
from dllama.model.forward import Transformer
from dllama.model.node import node_config, warm_up
from dllama.model.slicing import (
    NodeModel,
    NodeSlice,
    node_kv_bytes,
    node_tensors,
    node_weight_bytes,
    plan_digest,
)
from dllama.model.sync import Sync
from dllama.transport.mesh import PeerFailed
from dllama.transport.protocol import PROTOCOL_VERSION, ProtocolError
from dllama.transport.root import RootLink, WorkerFailed
from dllama.transport.sync import RootSync
from dllama.transport.wire import WireCodec


# What a generation raises when the cluster broke (a worker died, froze or misbehaved).
CLUSTER_FAILURES = (WorkerFailed, PeerFailed, ProtocolError)


def model_digest(path: Path) -> str:
    """SHA-256 of a model file, remembered per (path, size, mtime) so that it is read once."""
    st = path.stat()
    memo_path = dllama_home() / "model-digests.json"
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key]
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = sha256_file(path)
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(memo_path, json.dumps(memo).encode())
    except OSError:
        pass  # only a memo
    return memo[key]


def _progress(total: int) -> Callable[[int], None]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="📤 weights to workers", file=sys.stderr,
               disable=total == 0, leave=False)

    def step(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()
    return step


@dataclass
class WeightTransfer:
    """How a worker got its slices at the start."""

    address: str
    node: int
    from_cache: bool  # its slice cache had them: configuration only
    bytes_sent: int = 0
    seconds: float = 0.0


@dataclass
class ClusterStats:
    nodes: int
    forwards: int
    sync_seconds: float  # all-gathers and logits, encoding and summing included
    bytes_sent: int
    bytes_received: int

    def since(self, start: ClusterStats) -> ClusterStats:
        """What happened between ``start`` and these counters."""
        return ClusterStats(self.nodes, self.forwards - start.forwards, self.sync_seconds - start.sync_seconds,
                            self.bytes_sent - start.bytes_sent, self.bytes_received - start.bytes_received)


class Cluster:
    """The root's Transformer of node 0, the link to the workers, and the slice plan."""

    def __init__(self, transformer: Transformer, link: RootLink, sync: RootSync, plan: list[NodeSlice],
                 transfers: list[WeightTransfer]):
        self.transformer = transformer
        self.link = link
        self.sync = sync
        self.plan = plan
        self.transfers = transfers  # one per worker, in node order

    def stats(self) -> ClusterStats:
        s = self.sync.stats()
        return ClusterStats(len(self.plan), s.forwards, s.seconds, s.bytes_sent, s.bytes_received)

    def alive(self) -> bool:
        """Whether every worker is still connected (between generations: it reads the sockets
        the generation uses)."""
        try:
            self.link.mesh.check_peers()
        except PeerFailed:
            return False
        return True

    def close(self) -> None:
        self.link.close()


def start_cluster(model: ModelFile, plan: list[NodeSlice], addresses: list[str], seq_len: int, buffer_type: str,
                  net_timeout: float, build_root: Callable[[NodeModel, Sync], Transformer],
                  log: Callable[[str], None]) -> Cluster:
    """Start a session with every worker, hand out the slices of ``plan`` (root first), and
    build the root's share with ``build_root(share, sync)``."""
    h = model.header
    link = RootLink(addresses, net_timeout)
    try:
        link.hello(len(plan))
        digest = model_digest(model.path)
        transfers = []
        for w, node in zip(link.workers, plan[1:]):
            key = hashlib.sha256(f"{PROTOCOL_VERSION}\n{digest}\n{plan_digest(h, node)}".encode()).hexdigest()
            cached = link.configure(w, node_config(h, node, seq_len, buffer_type, key))
            transfers.append(WeightTransfer(w.address, node.index, cached))
            if cached:
                log(f"💡 worker {w.address}: node {node.index}, weights from its slice cache")
        uncached = [(w, node, t) for w, node, t in zip(link.workers, plan[1:], transfers) if not t.from_cache]
        progress = _progress(sum(node_weight_bytes(h, node) for _, node, _ in uncached))
        for w, node, transfer in uncached:
            t0 = time.perf_counter()
            link.send_weights(w, node_tensors(model.tensors, h, node).items(), progress)
            transfer.seconds = time.perf_counter() - t0
            transfer.bytes_sent = w.weight_bytes_sent
            log(f"💡 worker {w.address}: node {node.index}, sent {transfer.bytes_sent / 1e6:.1f} MB of weights "
                f"in {transfer.seconds:.1f} s")
        link.start_mesh()
        link.send_all("build")
        sync = RootSync(link, WireCodec(buffer_type == "q80"), [node.vocab_size for node in plan], h.dim)
        transformer = build_root(NodeModel.from_model(model, plan[0]), sync)  # while the workers build theirs
        warm_up(transformer)
        link.wait_built()
        link.send_all("go")
    except BaseException:
        link.close()
        raise
    return Cluster(transformer, link, sync, plan, transfers)


def describe_plan(model: ModelFile, plan: list[NodeSlice], addresses: list[str], seq_len: int) -> list[str]:
    """One line per node: what it holds and the memory it needs."""
    h = model.header
    lines = []
    for node, name in zip(plan, ["root"] + addresses):
        weights = node_weight_bytes(h, node)
        kv = node_kv_bytes(h, node, seq_len)
        lines.append(f"💡 Node {node.index} ({name}): heads {node.q_heads[0]}..{node.q_heads[1] - 1}, "
                     f"KV heads {node.kv_heads[0]}..{node.kv_heads[1] - 1}, FFN rows {node.hidden[0]}..{node.hidden[1] - 1}, "
                     f"vocab rows {node.vocab[0]}..{node.vocab[1] - 1}: {weights / 1e6:.1f} MB weights + "
                     f"{kv / 1e6:.1f} MB KV cache")
    return lines

