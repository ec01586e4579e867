"""The worker's end of the control plane: a ROUTER that serves one root at a time.

The worker knows nothing of models until a root sends its configuration; a ``NodeFactory``
(the model side) turns configuration and received bytes into a runnable node. When the
session ends (the root says stop, dies, freezes, or breaks the protocol) everything of it is
dropped and the worker waits for the next root. Messages from anyone else get an error reply;
nothing they send can end the session or grow memory beyond one bounded message.
"""
from __future__ import annotations

import gc
import time
from typing import Callable, Protocol

import numpy as np
import zmq

from dllama.errors import DllamaError
from dllama.transport.links import PLAINTEXT, LinkSecurity, new_socket
from dllama.transport.mesh import Mesh, PeerFailed
from dllama.transport.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    field,
    pack,
    unpack,
)
from dllama.transport.slice_cache import SliceCache
from dllama.transport.sync import MeshSync


class Node(Protocol):
    dim: int
    weight_bytes: int
    kv_bytes: int

    def forward(self, x: np.ndarray, pos: int, all_logits: bool, sync: MeshSync) -> np.ndarray: ...

    def codec(self): ...


class NodeFactory(Protocol):
    def tensor_sizes(self, config: dict) -> list[tuple[str, int]]:
        """(name, bytes) of every tensor the configuration's node holds; DllamaError if invalid."""

    def build(self, config: dict, tensors: dict[str, np.ndarray]) -> Node: ...


class SessionEnded(Exception):
    pass


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

    def _next(self, owner: bytes | None, mesh: Mesh | None, timeout: float | None) -> tuple:
        """The next well-formed message of ``owner`` (anyone when None): (identity, peer address,
        kind, meta, blobs). Strangers and malformed messages get an error reply."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        if mesh is not None:
            poller.register(mesh.monitor, zmq.POLLIN)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise SessionEnded(f"the root sent nothing for {timeout:g} s")
            ready = dict(poller.poll(None if left is None else left * 1000))
            if mesh is not None and mesh.monitor in ready:
                mesh.check_peers()
            if self.router not in ready:
                continue
            frames = self.router.recv_multipart(copy=False)
            identity = frames[0].bytes
            try:
                peer = frames[1].get("Peer-Address") if len(frames) > 1 else ""
            except zmq.ZMQError:
                peer = ""
            try:
                kind, meta, blobs = unpack([f.bytes for f in frames[1:]])
            except ProtocolError as e:
                self._reply(identity, "error", {"message": str(e)})
                if identity == owner:
                    raise
                continue
            if owner is not None and identity != owner:
                self._reply(identity, "error", {"message": "this worker is busy with another root"})
                continue
            if owner is None and kind != "hello":
                self._reply(identity, "error", {"message": f"{kind!r} before hello"})
                continue
            return identity, peer, kind, meta, blobs

    def _expect(self, owner: bytes, mesh: Mesh, kind: str, timeout: float | None) -> tuple[dict, list]:
        _, _, got, meta, blobs = self._next(owner, mesh, timeout)
        if got == "stop":
            self._reply(owner, "bye")
            raise SessionEnded("the root ended the session")
        if got != kind:
            raise ProtocolError(f"{got!r} where {kind!r} was due")
        return meta, blobs

    # -- the loop ------------------------------------------------------------------------------
    def serve(self, max_sessions: int | None = None) -> None:
        while max_sessions is None or self.sessions < max_sessions:
            owner, peer, _, meta, _ = self._next(None, None, None)
            self.sessions += 1
            mesh = None
            try:
                mesh = self._session(owner, peer, meta)
            except SessionEnded as e:
                self.log(f"⭕ session ended: {e}")
            except PeerFailed as e:
                self.log(f"⭕ session ended: {e}")
            except (ProtocolError, DllamaError, MemoryError) as e:
                message = str(e) if not isinstance(e, MemoryError) else "out of memory"
                self._reply(owner, "error", {"message": message})
                self.log(f"⭕ session ended: {message}")
            finally:
                if mesh is not None:
                    mesh.close()
                gc.collect()  # the node's weights and KV cache go now, not at the next session
            self.log("💡 waiting for a root")

    def _session(self, owner: bytes, peer: str, hello: dict) -> Mesh | None:
        version = hello.get("version")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"the root speaks protocol version {version}, this worker {PROTOCOL_VERSION}: "
                                f"install the same dllama on both")
        index = field(hello, "index", int, 1)
        n_nodes = field(hello, "n_nodes", int, 2)
        root_port = field(hello, "root_port", int, 1)
        net_timeout = hello.get("net_timeout")
        if index >= n_nodes or n_nodes > 4096 or root_port > 65535:
            raise ProtocolError("node index, node count or port out of range")
        if not isinstance(net_timeout, (int, float)) or not 0.1 <= net_timeout <= 86400:
            raise ProtocolError("net_timeout out of range")
        mesh = Mesh(self.ctx, index, float(net_timeout), self.bind_host, self.security)
        try:
            self._run(owner, peer, index, n_nodes, root_port, float(net_timeout), mesh)
        except BaseException:
            mesh.close()
            raise
        return mesh

    def _run(self, owner, peer, index, n_nodes, root_port, net_timeout, mesh: Mesh) -> None:
        root_host = f"[{peer}]" if ":" in peer else (peer or "127.0.0.1")
        mesh.connect({0: f"tcp://{root_host}:{root_port}"})
        self._reply(owner, "hello", {"version": PROTOCOL_VERSION, "data_port": mesh.port})
        self.log(f"💡 root {peer or '?'} connected: this is node {index} of {n_nodes}")

        config, _ = self._expect(owner, mesh, "config", None)
        sizes = self.factory.tensor_sizes(config)
        key = config.get("cache_key")
        tensors = None
        if self.cache is not None and isinstance(key, str):
            tensors = self.cache.load(key, sizes)
        self._reply(owner, "config", {"cached": tensors is not None})
        received = 0
        if tensors is None:
            tensors = self._receive_weights(owner, mesh, sizes, net_timeout)
            received = sum(n for _, n in sizes)
            if self.cache is not None and isinstance(key, str):
                self.cache.store(key, sizes, tensors)
        self.log(f"💡 weights: {sum(n for _, n in sizes) / 1e6:.1f} MB "
                 f"({'from the slice cache' if received == 0 else 'received'})")

        meta, _ = self._expect(owner, mesh, "mesh", None)
        peers = meta.get("peers")
        if not isinstance(peers, dict):
            raise ProtocolError("mesh: peers missing")
        endpoints = {}
        for k, endpoint in peers.items():
            if k == "0":
                continue
            if not (k.isdigit() and 0 < int(k) < n_nodes and int(k) != index and isinstance(endpoint, str)
                    and endpoint.startswith("tcp://")):
                raise ProtocolError("mesh: malformed peer list")
            endpoints[int(k)] = endpoint
        if len(endpoints) != n_nodes - 2:
            raise ProtocolError("mesh: the peer list does not name every node")
        mesh.connect(endpoints)
        reported = []
        build_due = []

        def everyone_ready(seen: set[int]) -> bool:
            if not reported and len(seen) == n_nodes - 1:
                self._reply(owner, "mesh_ready")
                reported.append(True)
            if reported and self.router.poll(0):
                _, _, kind, _, _ = self._next(owner, mesh, 0.1)
                if kind != "build":
                    raise ProtocolError(f"{kind!r} where 'build' was due")
                build_due.append(True)
            return bool(build_due)

        mesh.handshake(everyone_ready)
        node = self.factory.build(config, tensors)
        del tensors
        self._reply(owner, "built", {"weight_bytes": node.weight_bytes, "kv_bytes": node.kv_bytes})
        self.log(f"💡 node ready: {node.weight_bytes / 1e6:.1f} MB of weights, KV cache {node.kv_bytes / 1e6:.1f} MB")
        self._expect(owner, mesh, "go", None)
        sync = MeshSync(mesh, node.codec(), n_nodes, node.dim)
        last_fwd = 0
        while True:
            meta, _ = self._expect(owner, mesh, "forward", None)
            fwd = field(meta, "fwd", int, last_fwd + 1)
            pos = field(meta, "pos", int, 0)
            rows = field(meta, "rows", int, 1)
            all_logits = bool(meta.get("all_logits"))
            last_fwd = fwd
            x = sync.receive_input(fwd, rows)
            logits = node.forward(x, pos, all_logits, sync)
            self._reply(owner, "logits", {"fwd": fwd}, np.ascontiguousarray(logits, dtype=np.float32).data)

    def _receive_weights(self, owner, mesh, sizes, net_timeout) -> dict[str, np.ndarray]:
        buffers = {name: np.empty(n, dtype=np.uint8) for name, n in sizes}
        filled = {name: 0 for name, _ in sizes}
        left = sum(n for _, n in sizes)
        seq = 0
        order = [name for name, _ in sizes]
        while left > 0:
            meta, blobs = self._expect(owner, mesh, "chunk", None)
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
