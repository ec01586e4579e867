"""The worker's end of the control plane: a ROUTER that serves one root at a time.

The worker knows nothing of models until a root sends its configuration; a ``NodeFactory``
(the model side) turns configuration and received bytes into a runnable node. When the
session ends (the root says stop, dies, freezes, or breaks the protocol) everything of it is
dropped and the worker waits for the next root. Messages from anyone else get an error reply;
nothing they send can end the session or grow memory beyond one bounded message.
"""
from __future__ import annotations

import gc
import re
import time
from typing import Callable, Protocol

import numpy as np
import zmq

from dllama.errors import DllamaError
from dllama.transport.links import PLAINTEXT, LinkSecurity, endpoint, new_socket
from dllama.transport.mesh import Mesh, PeerFailed
from dllama.transport.protocol import (
    MAX_FRAMES,
    PROTOCOL_VERSION,
    ProtocolError,
    field,
    pack,
    unpack,
)
from dllama.transport.slice_cache import SliceCache
from dllama.transport.sync import ForwardSync, MeshSync
from dllama.transport.wire import WireCodec


class Node(Protocol):
    dim: int  # values per activation row
    wire_q80: bool  # activations travel as Q80 blocks
    weight_bytes: int
    kv_bytes: int

    def forward(self, x: np.ndarray, pos: int, all_logits: bool, sync: ForwardSync) -> np.ndarray:
        """This node's slice of the logits of forward ``x`` at ``pos``, meeting the others at ``sync``."""


class NodeFactory(Protocol):
    def tensor_sizes(self, config: dict) -> list[tuple[str, int]]:
        """(name, bytes) of every tensor the configuration's node holds; DllamaError if invalid."""

    def build(self, config: dict, tensors: dict[str, np.ndarray]) -> Node: ...


MAX_NODES = 4096
_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")


class SessionEnded(Exception):
    pass


def _describe(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, (DllamaError, ProtocolError)):
        return str(e)
    return f"{type(e).__name__}: {e}"  # a bug, or input no check foresaw: still one line


def _peer_endpoints(meta: dict, index: int, n_nodes: int) -> dict[int, str]:
    """The data-plane endpoints of every other worker, from the root's mesh message."""
    peers = meta.get("peers")
    if not isinstance(peers, dict):
        raise ProtocolError("mesh: peers missing")
    out = {}
    for key, value in peers.items():
        if key == "0":
            continue
        node = int(key) if key.isascii() and key.isdecimal() else -1
        if not (0 < node < n_nodes and node != index and isinstance(value, str) and _ENDPOINT.fullmatch(value)):
            raise ProtocolError("mesh: malformed peer list")
        out[node] = value
    if len(out) != n_nodes - 2:
        raise ProtocolError("mesh: the peer list does not name every node")
    return out


class WorkerServer:
    def __init__(self, factory: NodeFactory, port: int, host: str = "0.0.0.0", cache: SliceCache | None = None,
                 log: Callable[[str], None] = print, security: LinkSecurity = PLAINTEXT):
        self.factory = factory
        self.cache = cache
        self.log = log
        self.security = security
        self.bind_host = "*" if host in ("0.0.0.0", "*") else host
        self.ctx = zmq.Context()
        # Until a root says otherwise: how long a silent root may take during a transfer.
        self.router = new_socket(self.ctx, zmq.ROUTER, 10.0, server=True, security=security)
        try:
            self.router.bind(f"tcp://{self.bind_host}:{port}")
        except zmq.ZMQError as e:
            raise DllamaError(f"cannot listen on {host}:{port}: {e}") from None
        self.sessions = 0

    # -- messages ------------------------------------------------------------------------------
    def _reply(self, identity: bytes, kind: str, meta: dict | None = None, *blobs) -> None:
        try:
            self.router.send_multipart([identity, *pack(kind, meta, *blobs)], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass  # the peer is gone or not reading: nothing to tell it

    def _read(self, owner: bytes | None) -> tuple | None:
        """One message from the ROUTER: (identity, peer address, kind, meta, blobs) when it is
        well-formed and its sender may speak now (``owner``, or anyone saying hello when there
        is no session); everyone else gets an error reply and None."""
        frames = self.router.recv_multipart(copy=False)
        identity = frames[0].bytes
        if len(frames) > 1 + MAX_FRAMES:
            message = f"a message has 2 to {MAX_FRAMES} frames, got {len(frames) - 1}"
            self._reply(identity, "error", {"message": message})
            if identity == owner:
                raise ProtocolError(message)
            return None
        try:
            peer = frames[1].get("Peer-Address") if len(frames) > 1 else ""
        except zmq.ZMQError:
            peer = ""
        try:
            kind, meta, blobs = unpack([f.bytes for f in frames[1:]])
        except ProtocolError as e:
            if identity == owner:
                raise  # the session's error reply says it
            self._reply(identity, "error", {"message": str(e)})
            return None
        if owner is not None and identity != owner:
            self._reply(identity, "error", {"message": "this worker is busy with another root"})
            return None
        if owner is None and kind != "hello":
            self._reply(identity, "error", {"message": f"{kind!r} before hello"})
            return None
        return identity, peer, kind, meta, blobs

    def _next(self, owner: bytes | None, mesh: Mesh | None) -> tuple:
        """The next message that ``owner`` (anyone, for a hello, when None) may send. Waits as
        long as the root's data-plane link is up: a root that dies or freezes drops it. Until
        that link is up, waits at most the net timeout."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        if mesh is not None:
            poller.register(mesh.monitor, zmq.POLLIN)
        while True:
            timeout_ms = None
            if mesh is not None and 0 not in mesh.connected:
                left = self._root_deadline - time.monotonic()
                if left <= 0:
                    raise SessionEnded("cannot reach the root's data port (a firewall between them?)")
                timeout_ms = max(1, int(left * 1000))
            ready = dict(poller.poll(timeout_ms))
            if mesh is not None and mesh.monitor in ready:
                mesh.check_peers()
            if self.router in ready:
                message = self._read(owner)
                if message is not None:
                    return message

    def _expect(self, owner: bytes, mesh: Mesh, kind: str) -> tuple[dict, list]:
        _, _, got, meta, blobs = self._next(owner, mesh)
        self._check_kind(owner, got, kind)
        return meta, blobs

    def _check_kind(self, owner: bytes, got: str, kind: str) -> None:
        if got == "stop":
            self._reply(owner, "bye")
            raise SessionEnded("the root ended the session")
        if got != kind:
            raise ProtocolError(f"{got!r} where {kind!r} was due")

    # -- the loop ------------------------------------------------------------------------------
    def serve(self, max_sessions: int | None = None) -> None:
        while max_sessions is None or self.sessions < max_sessions:
            owner, peer, _, meta, _ = self._next(None, None)
            self.sessions += 1
            try:
                self._session(owner, peer, meta)
            except SessionEnded as e:
                self.log(f"⭕ session ended: {e}")
            except Exception as e:  # noqa: BLE001 - whatever a root sends, the worker serves on
                self.log(f"⭕ session ended: {_describe(e)}")
            finally:
                gc.collect()  # the node's weights and KV cache go now, not at the next session
            self.log("💡 waiting for a root")

    def _session(self, owner: bytes, peer: str, hello: dict) -> None:
        """One root's session; on any failure the root hears why (and which peer failed)
        before the data plane closes, so that it can tell the user the real cause."""
        mesh = None
        try:
            version = hello.get("version")
            if version != PROTOCOL_VERSION:
                raise ProtocolError(f"the root speaks protocol version {version}, this worker {PROTOCOL_VERSION}: "
                                    f"install the same dllama on both")
            index = field(hello, "index", int, 1)
            n_nodes = field(hello, "n_nodes", int, 2)
            root_port = field(hello, "root_port", int, 1)
            net_timeout = hello.get("net_timeout")
            if index >= n_nodes or n_nodes > MAX_NODES or root_port > 65535:
                raise ProtocolError("node index, node count or port out of range")
            if isinstance(net_timeout, bool) or not isinstance(net_timeout, (int, float)) \
                    or not 0.1 <= net_timeout <= 86400:
                raise ProtocolError("net_timeout out of range")
            mesh = Mesh(self.ctx, index, float(net_timeout), self.bind_host, self.security)
            self._run(owner, peer, index, n_nodes, root_port, float(net_timeout), mesh)
        except SessionEnded:
            raise
        except Exception as e:
            meta = {"message": _describe(e)}
            if isinstance(e, PeerFailed):
                meta["failed"] = e.nodes
            self._reply(owner, "error", meta)
            raise
        finally:
            if mesh is not None:
                mesh.close()

    def _run(self, owner, peer, index, n_nodes, root_port, net_timeout, mesh: Mesh) -> None:
        self._root_deadline = time.monotonic() + net_timeout
        mesh.connect({0: endpoint(peer or "127.0.0.1", root_port)})
        self._reply(owner, "hello", {"version": PROTOCOL_VERSION, "data_port": mesh.port})
        self.log(f"💡 root {peer or '?'} connected: this is node {index} of {n_nodes}")

        config, _ = self._expect(owner, mesh, "config")
        sizes = self.factory.tensor_sizes(config)
        key = config.get("cache_key")
        use_cache = self.cache is not None and isinstance(key, str)
        tensors = self.cache.load(key, sizes) if use_cache else None
        cached = tensors is not None
        self._reply(owner, "config", {"cached": cached})
        if tensors is None:
            tensors = self._receive_weights(owner, mesh, sizes)
        self.log(f"💡 weights: {sum(n for _, n in sizes) / 1e6:.1f} MB "
                 f"({'from the slice cache' if cached else 'received'})")

        meta, _ = self._expect(owner, mesh, "mesh")
        mesh.connect(_peer_endpoints(meta, index, n_nodes))
        reported = []

        def build_due(seen: set[int]) -> bool:
            if not reported and len(seen) == n_nodes - 1:
                self._reply(owner, "mesh_ready")
                reported.append(True)
            while reported and self.router.poll(0):  # the root says build once all are ready
                message = self._read(owner)
                if message is not None:
                    self._check_kind(owner, message[2], "build")
                    return True
            return False

        mesh.handshake(build_due)
        if use_cache and not cached:  # while the root waits for "built", which may take long
            try:
                self.cache.store(key, sizes, tensors)
            except OSError as e:
                self.log(f"⚠️  cannot write the slice cache: {e.strerror or e}")
        node = self.factory.build(config, tensors)
        del tensors
        codec = WireCodec(node.wire_q80)  # compiles its kernels now, not in the first timed sync
        self._reply(owner, "built", {"weight_bytes": node.weight_bytes, "kv_bytes": node.kv_bytes})
        self.log(f"💡 node ready: {node.weight_bytes / 1e6:.1f} MB of weights, KV cache {node.kv_bytes / 1e6:.1f} MB")
        self._expect(owner, mesh, "go")
        sync = MeshSync(mesh, codec, n_nodes, node.dim)
        last_fwd = 0
        while True:
            meta, _ = self._expect(owner, mesh, "forward")
            fwd = field(meta, "fwd", int, last_fwd + 1)
            pos = field(meta, "pos", int, 0)
            rows = field(meta, "rows", int, 1)
            all_logits = bool(meta.get("all_logits"))
            last_fwd = fwd
            x, steps = sync.receive_input(fwd, rows)
            logits = node.forward(x, pos, all_logits, steps)
            self._reply(owner, "logits", {"fwd": fwd}, np.ascontiguousarray(logits, dtype=np.float32).data)

    def _receive_weights(self, owner, mesh, sizes) -> dict[str, np.ndarray]:
        buffers = {name: np.empty(n, dtype=np.uint8) for name, n in sizes}
        filled = {name: 0 for name, _ in sizes}
        left = sum(n for _, n in sizes)
        seq = 0
        order = [name for name, _ in sizes]
        while left > 0:
            meta, blobs = self._expect(owner, mesh, "chunk")
            name = meta.get("tensor")
            if name not in buffers or len(blobs) != 1:
                raise ProtocolError(f"chunk of unknown tensor {str(name)[:64]!r}")
            if meta.get("seq") != seq or meta.get("offset") != filled[name]:
                raise ProtocolError(f"chunk {meta.get('seq')} of {name} out of order")
            data = blobs[0]
            if filled[name] + len(data) > len(buffers[name]) or not data:
                raise ProtocolError(f"chunk overruns tensor {name}")
            buffers[name][filled[name]:filled[name] + len(data)] = np.frombuffer(data, dtype=np.uint8)
            filled[name] += len(data)
            left -= len(data)
            seq += 1
            self._reply(owner, "ack", {"seq": seq - 1})
        missing = [n for n in order if filled[n] != len(buffers[n])]
        if missing:
            raise ProtocolError(f"tensor {missing[0]} incomplete")
        return buffers

    def close(self) -> None:
        self.router.close(linger=0)
        self.ctx.term()
