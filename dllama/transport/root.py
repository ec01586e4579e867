"""The root's end of the control plane: one DEALER per worker.

Every wait has a deadline and watches the worker's connection, so a dead, frozen or absent
worker ends the root with a message naming its address instead of a hang.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from dllama.errors import DllamaError
from dllama.transport.links import (
    PLAINTEXT,
    LinkSecurity,
    endpoint,
    new_socket,
    parse_address,
)
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
STOP_LINGER_MS = 200


class WorkerFailed(DllamaError):
    pass


@dataclass
class WorkerLink:
    address: str  # host:port as the user gave it
    host: str
    index: int  # node index (the root is 0)
    sock: zmq.Socket
    monitor: zmq.Socket
    poller: zmq.Poller  # both of the above: what every wait on this worker watches
    data_port: int = 0
    weight_bytes_sent: int = 0


class RootLink:
    def __init__(self, addresses: list[str], net_timeout: float, security: LinkSecurity = PLAINTEXT):
        try:
            parsed = [parse_address(a) for a in addresses]
        except ValueError as e:
            raise DllamaError(str(e)) from None
        self.net_timeout = net_timeout
        self.security = security
        self.ctx = zmq.Context()
        self.workers: list[WorkerLink] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.mesh = Mesh(self.ctx, 0, net_timeout, security=security)
        for i, (address, (host, port)) in enumerate(zip(addresses, parsed), start=1):
            sock = new_socket(self.ctx, zmq.DEALER, net_timeout, server=False, security=security)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            self.workers.append(WorkerLink(address, host, i, sock, monitor, poller))
            try:
                sock.connect(endpoint(host, port))
            except zmq.ZMQError as e:
                self.close()
                raise WorkerFailed(f"worker {address}: cannot connect: {e.strerror}") from None

    def worker(self, node: int) -> WorkerLink:
        return self.workers[node - 1]

    def failed(self, err: PeerFailed) -> WorkerFailed:
        """A data-plane failure, told by worker address. A worker that saw another one fail
        says so before it hangs up (its own disconnect may reach us first): that is the cause."""
        deadline = time.monotonic() + min(0.5, self.net_timeout)
        blamed: list[int] = []
        for w in self.workers:
            if w.index in err.nodes:
                continue  # its own report cannot be trusted to come
            while not blamed and w.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                try:
                    kind, meta, _ = unpack(w.sock.recv_multipart())
                except ProtocolError:
                    continue
                failed = meta.get("failed") if kind == "error" else None
                if isinstance(failed, list):
                    blamed = [n for n in failed if isinstance(n, int) and 1 <= n <= len(self.workers)]
                    if blamed:
                        err = PeerFailed(blamed, f"stopped answering (noticed by worker {w.address})")
        names = ", ".join(self.worker(n).address for n in err.nodes if 1 <= n <= len(self.workers))
        return WorkerFailed(f"worker {names or '?'} {err.reason}")

    # -- messages -----------------------------------------------------------------------------
    def send(self, w: WorkerLink, kind: str, meta: dict | None = None, *blobs) -> None:
        frames = pack(kind, meta, *blobs)
        self.bytes_sent += sum(len(f) for f in frames)
        w.sock.send_multipart(frames, copy=False)

    def recv(self, w: WorkerLink, kind: str, timeout: float | None = None) -> tuple[dict, list]:
        """The next message of worker ``w``, which must be ``kind``."""
        timeout = self.net_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"worker {w.address} did not answer within {timeout:g} s "
                                   f"(is `dllama worker` running there? --net-timeout sets the limit)")
            ready = dict(w.poller.poll(left * 1000))
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

    def configure(self, w: WorkerLink, config: dict) -> bool:
        """Send a worker its configuration; True when it already has the weights cached."""
        self.send(w, "config", config)
        meta, _ = self.recv(w, "config", timeout=BUILD_TIMEOUT)  # it checks its slice cache first
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
                    self._ack(w, seq - in_flight)
                    in_flight -= 1
                progress(len(chunk))
        for _ in range(in_flight):
            self._ack(w, seq - in_flight)
            in_flight -= 1

    def _ack(self, w: WorkerLink, seq: int) -> None:
        meta, _ = self.recv(w, "ack")
        if meta.get("seq") != seq:
            raise WorkerFailed(f"worker {w.address} acknowledged chunk {meta.get('seq')} where {seq} was due")

    def start_mesh(self) -> None:
        """Connect the data plane: every node subscribes to every other, proven by hellos."""
        mesh = self.mesh
        endpoints = {0: None}
        endpoints.update({w.index: endpoint(w.host, w.data_port) for w in self.workers})
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
            silent = [w.address for w in self.workers if w.index in e.nodes or w.index not in ready]
            raise WorkerFailed(f"worker {', '.join(silent)} did not join the data plane within "
                               f"{self.net_timeout:g} s (can every node reach every other's data port?)") from None

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
            if meta.get("fwd") != fwd:
                raise WorkerFailed(f"worker {w.address} sent logits of forward {meta.get('fwd')} in "
                                   f"forward {fwd}")
            if len(blobs) != 1:
                raise WorkerFailed(f"worker {w.address} sent logits without data")
            out.append(blobs[0])
        return out

    def close(self) -> None:
        """Tell every worker the session is over (so it frees its memory), then hang up."""
        if self.ctx.closed:
            return
        for w in self.workers:
            try:
                w.sock.send_multipart(pack("stop"), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.mesh.close()
        for w in self.workers:
            try:
                w.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            w.monitor.close(linger=0)
            # A moment for "stop" to leave (not for a dead worker to take it): live workers
            # free their memory at once, the others when they notice the root is gone.
            w.sock.close(linger=STOP_LINGER_MS)
        self.ctx.term()
