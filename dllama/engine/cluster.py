"""The root's side of a cluster: plan the slices, hand every worker its share (or let it use
its slice cache), start the data plane, and run the root's own share with a sync that
reaches the workers."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dllama.default_model import dllama_home
from dllama.formats.atomic import write_bytes_atomic
from dllama.formats.mfile import ModelFile
from dllama.model.forward import Transformer
from dllama.model.node import node_config, warm_up
from dllama.model.slicing import (
    NodeModel,
    NodeSlice,
    node_tensors,
    node_weight_bytes,
    plan_digest,
)
from dllama.model.wire import WireCodec
from dllama.transport.mesh import PeerFailed
from dllama.transport.protocol import PROTOCOL_VERSION
from dllama.transport.root import RootLink
from dllama.transport.sync import MeshSync


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = h.hexdigest()
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(memo_path, json.dumps(memo).encode())
    except OSError:
        pass  # only a memo
    return memo[key]


@dataclass
class SyncStats:
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0


class RootSync:
    """The root's ``Sync``: starts each forward on the workers, all-gathers, collects logits."""

    def __init__(self, link: RootLink, codec: WireCodec, plan: list[NodeSlice], dim: int):
        self.link = link
        self.plan = plan
        self.mesh_sync = MeshSync(link.mesh, codec, len(plan), dim)
        self.fwd = 0
        self.logits_seconds = 0.0

    def begin(self, x: np.ndarray, pos: int, all_logits: bool) -> np.ndarray:
        self.fwd += 1
        self.link.forward(self.fwd, pos, x.shape[0], all_logits)
        self.mesh_sync.publish_input(self.fwd, x)
        return x

    def all_reduce(self, partial: np.ndarray, layer: int, block: str) -> np.ndarray:
        try:
            return self.mesh_sync.all_reduce(partial, layer, block)
        except PeerFailed as e:
            raise self.link.failed(e) from None

    def finish(self, logits: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        parts = [logits]
        for node, blob in zip(self.plan[1:], self.link.logits(self.fwd)):
            if len(blob) != logits.shape[0] * node.vocab_size * 4:
                raise self.link.failed(PeerFailed([node.index], "sent logits of the wrong size"))
            parts.append(np.frombuffer(blob, dtype=np.float32).reshape(logits.shape[0], node.vocab_size))
        self.logits_seconds += time.perf_counter() - t0
        return np.concatenate(parts, axis=1)

    def stats(self) -> SyncStats:
        mesh = self.link.mesh
        return SyncStats(self.mesh_sync.seconds + self.logits_seconds,
                         mesh.bytes_sent + self.link.bytes_sent, mesh.bytes_received + self.link.bytes_received)


def _progress(total: int) -> Callable[[int], None]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="📤 weights to workers", file=sys.stderr,
               disable=total == 0, leave=False)

    def step(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()
    return step


class Cluster:
    """The root's Transformer of node 0 and the link to the workers."""

    def __init__(self, transformer: Transformer, link: RootLink, sync: RootSync, weight_bytes_sent: list[int]):
        self.transformer = transformer
        self.link = link
        self.sync = sync
        self.weight_bytes_sent = weight_bytes_sent

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
                  net_timeout: float, build_root: Callable[[NodeModel], Transformer],
                  log: Callable[[str], None]) -> Cluster:
    h = model.header
    link = RootLink(addresses, net_timeout)
    try:
        link.hello(len(plan))
        digest = model_digest(model.path)
        uncached = []
        for w, node in zip(link.workers, plan[1:]):
            key = hashlib.sha256(f"{PROTOCOL_VERSION}\n{digest}\n{plan_digest(h, node)}".encode()).hexdigest()
            if link.configure(w, node_config(h, node, seq_len, buffer_type, key)):
                log(f"💡 worker {w.address}: node {node.index}, weights from its slice cache")
            else:
                uncached.append((w, node))
        progress = _progress(sum(node_weight_bytes(h, node) for _, node in uncached))
        for w, node in uncached:
            t0 = time.perf_counter()
            link.send_weights(w, node_tensors(model.tensors, h, node).items(), progress)
            seconds = time.perf_counter() - t0
            log(f"💡 worker {w.address}: node {node.index}, sent {w.weight_bytes_sent / 1e6:.1f} MB of weights "
                f"in {seconds:.1f} s")
        link.start_mesh()
        link.send_all("build")
        transformer = build_root(NodeModel.from_model(model, plan[0]))  # while the workers build theirs
        warm_up(transformer)
        link.wait_built()
        codec = WireCodec(buffer_type == "q80", transformer.backend)
        sync = RootSync(link, codec, plan, h.dim)
        transformer.sync = sync
        link.send_all("go")
    except BaseException:
        link.close()
        raise
    return Cluster(transformer, link, sync, [w.weight_bytes_sent for w in link.workers])


def describe_plan(model: ModelFile, plan: list[NodeSlice], addresses: list[str], seq_len: int) -> list[str]:
    """One line per node: what it holds and the memory it needs."""
    from dllama.model.slicing import node_kv_bytes

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

