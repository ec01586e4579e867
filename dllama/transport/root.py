"""The root's end of the control plane: one DEALER per worker.

Every wait has a deadline and watches the worker's connection, so a dead, frozen or absent
worker ends the root with a message naming its address instead of a hang.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Callable, Iterable

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from dllama.errors import DllamaError
from dllama.transport.links import PLAINTEXT, LinkSecurity, new_socket
from dllama.transport.mesh import Mesh, PeerFailed
from dllama.transport.protocol import (
    CHUNK_BYTES,
    PROTOCOL_VERSION,
    ProtocolError,
    field,
    pack,
    unpack,
)

# Chunks in flight per worker: keeps the link busy without unbounded queues.
WINDOW = 4
# Building a node (packing weights, compiling kernels on a cold cache) may take minutes; a
# worker that dies or freezes meanwhile is still caught by its connection dropping.
BUILD_TIMEOUT = 1800.0


class WorkerFailed(DllamaError):
    pass


@dataclass
class WorkerLink:
    address: str  # host:port as the user gave it
    index: int  # node index (the root is 0)
    sock: zmq.Socket
    monitor: zmq.Socket
    data_port: int = 0
    weight_bytes_sent: int = 0
    info: dict = dc_field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DllamaError(f"worker address {address!r} is not HOST:PORT")
    return host, int(port)


class RootLink:
    def __init__(self, addresses: list[str], net_timeout: float, security: LinkSecurity = PLAINTEXT):
        self.net_timeout = net_timeout
        self.security = security
        self.ctx = zmq.Context()
        self.workers: list[WorkerLink] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.mesh = Mesh(self.ctx, 0, net_timeout, security=security)
        for i, address in enumerate(addresses, start=1):
            host, port = parse_address(address)
            sock = new_socket(self.ctx, zmq.DEALER, net_timeout, server=False, security=security)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self.workers.append(WorkerLink(address, i, sock, monitor))
            try:
                sock.connect(f"tcp://{host if ':' not in host else '[' + host + ']'}:{port}")
            except zmq.ZMQError as e:
                raise WorkerFailed(f"worker {address}: cannot connect: {e}") from None

    def worker(self, node: int) -> WorkerLink:
        return self.workers[node - 1]

    def failed(self, err: PeerFailed) -> WorkerFailed:
        """A data-plane failure, told by worker address."""
        names = ", ".join(self.worker(n).address for n in err.nodes if n >= 1) or "the root"
        return WorkerFailed(f"worker {names} {err.reason}")

    # -- messages -----------------------------------------------------------------------------
    def send(self, w: WorkerLink, kind: str, meta: dict | None = None, *blobs) -> None:
        frames = pack(kind, meta, *blobs)
        self.bytes_sent += sum(len(f) for f in frames)
        w.sock.send_multipart(frames, copy=False)

    def recv(self, w: WorkerLink, kind: str, timeout: float | None = None) -> tuple[dict, list]:
        """The next message of worker ``w``, which must be ``kind``."""
        timeout = self.net_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(w.sock, zmq.POLLIN)
        poller.register(w.monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"worker {w.address} did not answer within {timeout:g} s "
                                   f"(is `dllama worker` running there? --net-timeout sets the limit)")
            ready = dict(poller.poll(left * 1000))
            if w.monitor in ready:
                event = recv_monitor_message(w.monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    raise WorkerFailed(f"worker {w.address} disconnected")
            if w.sock in ready:
                frames = w.sock.recv_multipart()
                self.bytes_received += sum(len(f) for f in frames)
                try:
                    got, meta, blobs = unpack(frames)
                except ProtocolError as e:
                    raise WorkerFailed(f"worker {w.address}: {e}") from None
                if got == "error":
                    raise WorkerFailed(f"worker {w.address}: {meta.get('message', 'error')}")
                if got != kind:
                    raise WorkerFailed(f"worker {w.address} sent {got!r} where {kind!r} was due")
                return meta, blobs

    # -- session ------------------------------------------------------------------------------
    def hello(self, n_nodes: int) -> None:
        """Greet every worker; each learns its index and the root's data-plane port."""
        for w in self.workers:
            self.send(w, "hello", {"version": PROTOCOL_VERSION, "index": w.index, "n_nodes": n_nodes,
                                   "net_timeout": self.net_timeout, "root_port": self.mesh.port})
        for w in self.workers:
            meta, _ = self.recv(w, "hello")
            try:
                version = field(meta, "version", int)
                w.data_port = field(meta, "data_port", int, 1)
            except ProtocolError as e:
                raise WorkerFailed(f"worker {w.address}: {e}") from None
            if version != PROTOCOL_VERSION:
                raise WorkerFailed(f"worker {w.address} speaks protocol version {version}, this root "
                                   f"{PROTOCOL_VERSION}: install the same dllama on both")
            w.info = meta

    def configure(self, w: WorkerLink, config: dict) -> bool:
        """Send a worker its configuration; True when it already has the weights cached."""
        self.send(w, "config", config)
        meta, _ = self.recv(w, "config")
        return bool(meta.get("cached"))

    def send_weights(self, w: WorkerLink, tensors: Iterable[tuple[str, np.ndarray]],
                     progress: Callable[[int], None]) -> None:
        in_flight = 0
        seq = 0
        for name, array in tensors:
            raw = memoryview(np.ascontiguousarray(array)).cast("B")
            for offset in range(0, len(raw), CHUNK_BYTES):
                chunk = raw[offset:offset + CHUNK_BYTES]
                self.send(w, "chunk", {"tensor": name, "offset": offset, "seq": seq}, chunk)
                w.weight_bytes_sent += len(chunk)
                seq += 1
                in_flight += 1
                if in_flight == WINDOW:
                    self.recv(w, "ack")
                    in_flight -= 1
                progress(len(chunk))
        for _ in range(in_flight):
            self.recv(w, "ack")

    def start_mesh(self) -> None:
        """Connect the data plane: every node subscribes to every other, proven by hellos."""
        mesh = self.mesh
        endpoints = {0: None}
        endpoints.update({w.index: f"tcp://{w.host}:{w.data_port}" for w in self.workers})
        mesh.connect({i: e for i, e in endpoints.items() if i != 0})
        for w in self.workers:
            self.send(w, "mesh", {"peers": {str(i): e for i, e in endpoints.items() if i != w.index}})
        ready: set[int] = set()
        n = len(self.workers) + 1

        def all_ready(seen: set[int]) -> bool:
            for w in self.workers:
                if w.index not in ready and w.sock.poll(0):
                    self.recv(w, "mesh_ready")
                    ready.add(w.index)
            return len(seen) == n - 1 and len(ready) == n - 1

        try:
            mesh.handshake(all_ready)
        except PeerFailed as e:
            raise self.failed(e) from None

    def send_all(self, kind: str) -> None:
        for w in self.workers:
            self.send(w, kind)

    def wait_built(self) -> list[dict]:
        """Every worker's report once it has built its node (long: it may compile kernels)."""
        return [self.recv(w, "built", timeout=BUILD_TIMEOUT)[0] for w in self.workers]

    def forward(self, fwd: int, pos: int, rows: int, all_logits: bool) -> None:
        for w in self.workers:
            self.send(w, "forward", {"fwd": fwd, "pos": pos, "rows": rows, "all_logits": all_logits})

    def logits(self, fwd: int) -> list[bytes]:
        out = []
        for w in self.workers:
            meta, blobs = self.recv(w, "logits")
            if meta.get("fwd") != fwd or len(blobs) != 1:
                raise WorkerFailed(f"worker {w.address} sent logits of forward {meta.get('fwd')} in "
                                   f"forward {fwd}")
            out.append(blobs[0])
        return out

    def close(self) -> None:
        """Tell every worker the session is over (so it frees its memory), then hang up."""
        for w in self.workers:
            try:
                w.sock.send_multipart(pack("stop"), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + min(1.0, self.net_timeout)
        for w in self.workers:
            left = deadline - time.monotonic()
            if left > 0 and w.sock.poll(left * 1000):
                w.sock.recv_multipart()
        self.mesh.close()
        for w in self.workers:
            try:
                w.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            w.monitor.close(linger=0)
            w.sock.close(linger=0)
        self.ctx.term()
