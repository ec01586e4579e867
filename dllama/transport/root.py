"""The root's end of the control plane: one DEALER per worker, and the sessions run over them.

A ``WorkerLink`` (the DEALER to one worker) lives as long as the worker is a member of the
cluster: its heartbeats tell whether the worker's process is alive, across sessions. A
``RootLink`` is one session (one epoch) with some of those workers: the greeting, the weights,
the data plane and the forwards. When a worker is lost the root abandons the session and starts
another one, of a new epoch, with the workers left (``engine.cluster``).

Every wait watches the worker's connection, so a dead, frozen or absent worker ends the wait
with a message naming its address instead of a hang.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field as dataclass_field
from typing import Callable, Iterable

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from dllama.errors import DllamaError
from dllama.machine import file_backed, release_pages
from dllama.transport.links import (
    PLAINTEXT,
    LinkSecurity,
    endpoint,
    new_socket,
    parse_address,
)
from dllama.transport.mesh import Mesh, PeerFailed
from dllama.transport.zap import DATA, Gatekeeper
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
NET_TIMEOUT = -1.0  # recv's default: the link's net timeout
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class WorkerFailed(DllamaError):
    """A worker failed the session: ``nodes`` are the session's node indices to blame (empty
    when the failure names none)."""

    def __init__(self, message: str, nodes: Iterable[int] = ()):
        super().__init__(message)
        self.nodes = sorted(set(nodes))


@dataclass
class WorkerLink:
    """The DEALER to one worker, kept across sessions while the worker is alive."""

    address: str  # host:port as the user gave it
    host: str
    port: int
    sock: zmq.Socket
    monitor: zmq.Socket
    poller: zmq.Poller  # both of the above: what every wait on this worker watches
    up: bool = True  # False once its connection dropped: the process died, froze or is unreachable
    index: int = 0  # node index in the current session (the root is 0)
    data_port: int = 0
    memory: int = 0  # bytes of RAM it reported
    speed: object = None  # what it measured of its speed (a JSON value, checked by the cluster)
    weight_bytes_sent: int = 0
    errors: list = dataclass_field(default_factory=list)  # "error" replies that named failed nodes
    key: bytes | None = None  # its public key (CURVE links)
    refused: str = ""  # why its handshake failed, if it did

    def watch(self) -> None:
        """Note whether the connection dropped or its handshake failed (without waiting)."""
        while self.up and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.up = False
            elif event & HANDSHAKE_FAILED:
                self.up = False
                self.refused = ("refused this root: its key is not in the worker's --authorized-keys"
                                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else
                                "and this root could not agree on a secure link: the key given for the worker is "
                                "not its key, or only one side has keys (--key, --authorized-keys, HOST:PORT@KEY)")

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=STOP_LINGER_MS)


def open_worker(ctx: zmq.Context, address: str, heartbeat: float, security: LinkSecurity = PLAINTEXT,
                key: bytes | None = None) -> WorkerLink:
    """A DEALER connected (in the background, as ZeroMQ does) to the worker at ``address``;
    with CURVE, to the one that proves it holds ``key``."""
    try:
        host, port = parse_address(address)
    except ValueError as e:
        raise DllamaError(str(e)) from None
    sock = new_socket(ctx, zmq.DEALER, heartbeat, server=False, security=security)
    if security.public_key is not None and key is None:
        sock.close(linger=0)
        raise DllamaError(f"worker {address}: this root has a key, so every worker needs its public key "
                          f"(--workers HOST:PORT@KEY)")
    security.client(sock, key)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    try:
        sock.connect(endpoint(host, port))
    except zmq.ZMQError as e:
        monitor.close(linger=0)
        sock.close(linger=0)
        raise WorkerFailed(f"worker {address}: cannot connect: {e.strerror}") from None
    return WorkerLink(address, host, port, sock, monitor, poller, key=key)


class RootLink:
    """One session (``epoch``) with ``workers`` (node i is ``workers[i - 1]``)."""

    def __init__(self, ctx: zmq.Context, workers: list[WorkerLink], epoch: int, net_timeout: float,
                 heartbeat: float, security: LinkSecurity = PLAINTEXT, gatekeeper: Gatekeeper | None = None):
        self.ctx = ctx
        self.workers = workers
        self.epoch = epoch
        self.net_timeout = net_timeout
        self.heartbeat = heartbeat
        self.bytes_sent = 0
        self.bytes_received = 0
        self.stale = 0  # messages of another epoch, dropped
        for i, w in enumerate(workers, start=1):
            w.index = i
            w.weight_bytes_sent = 0
            w.errors = []
        self.security = security
        if gatekeeper is not None:  # the root's data plane admits this session's workers only
            gatekeeper.allow(DATA, [w.key for w in workers])
        self.mesh = Mesh(ctx, 0, net_timeout, heartbeat, epoch, security=security)
        self.closed = False

    def worker(self, node: int) -> WorkerLink:
        return self.workers[node - 1]

    def failed(self, err: PeerFailed) -> WorkerFailed:
        """A data-plane failure, told by worker address (the cluster decides who is lost)."""
        names = ", ".join(self.worker(n).address for n in err.nodes if 1 <= n <= len(self.workers))
        return WorkerFailed(f"worker {names or '?'} {err.reason}", err.nodes)

    # -- messages -----------------------------------------------------------------------------
    def send(self, w: WorkerLink, kind: str, meta: dict | None = None, *blobs) -> None:
        frames = pack(kind, {**(meta or {}), "epoch": self.epoch}, *blobs)
        self.bytes_sent += sum(len(f) for f in frames)
        try:
            w.sock.send_multipart(frames, copy=False)
        except zmq.Again:  # its queue stayed full for the send timeout: the link is down
            w.watch()  # a refused handshake drops the queue before the first send: say that
            raise WorkerFailed(f"worker {w.address} {w.refused or 'takes no messages'}", [w.index]) from None

    def recv(self, w: WorkerLink, kind: str, timeout: float | None = NET_TIMEOUT) -> tuple[dict, list]:
        """The next message of this session from worker ``w``, which must be ``kind``. Waits at
        most ``timeout`` seconds (default the net timeout; None: as long as the worker's link is up)."""
        timeout = self.net_timeout if timeout == NET_TIMEOUT else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WorkerFailed(f"worker {w.address} did not answer within {timeout:g} s "
                                   f"(is `dllama worker` running there? --net-timeout sets the limit)", [w.index])
            ready = dict(w.poller.poll(None if left is None else left * 1000))
            if w.monitor in ready:
                w.watch()
                if not w.up:
                    raise WorkerFailed(f"worker {w.address} {w.refused or 'disconnected'}", [w.index])
            if w.sock in ready:
                frames = w.sock.recv_multipart()
                self.bytes_received += sum(len(f) for f in frames)
                try:
                    got, meta, blobs = unpack(frames)
                except ProtocolError as e:
                    raise WorkerFailed(f"worker {w.address}: {e}", [w.index]) from None
                if meta.get("epoch") != self.epoch:
                    self.stale += 1  # from a session given up: refused
                    continue
                if got == "error":
                    failed = meta.get("failed")
                    if isinstance(failed, list):
                        blamed = [n for n in failed if isinstance(n, int) and 1 <= n <= len(self.workers)]
                        if blamed:
                            names = ", ".join(self.worker(n).address for n in blamed)
                            raise WorkerFailed(f"worker {names} stopped answering (noticed by worker "
                                               f"{w.address})", blamed)
                    raise WorkerFailed(f"worker {w.address}: {meta.get('message', 'error')}", [w.index])
                if got != kind:
                    raise WorkerFailed(f"worker {w.address} sent {got!r} where {kind!r} was due", [w.index])
                return meta, blobs

    def drain(self) -> None:
        """Read what the workers said since the failure (their reports name the nodes they lost)."""
        for w in self.workers:
            w.watch()
            while w.up and w.sock.poll(0):
                try:
                    got, meta, _ = unpack(w.sock.recv_multipart())
                except ProtocolError:
                    continue
                failed = meta.get("failed")
                if got == "error" and meta.get("epoch") == self.epoch and isinstance(failed, list):
                    w.errors += [n for n in failed if isinstance(n, int)]

    # -- session ------------------------------------------------------------------------------
    def hello(self, n_nodes: int) -> None:
        """Start the session on every worker; each learns its index, the epoch and the root's
        data-plane port, and says how much memory it has and how fast it is."""
        hello = {"version": PROTOCOL_VERSION, "n_nodes": n_nodes, "net_timeout": self.net_timeout,
                 "heartbeat": self.heartbeat, "root_port": self.mesh.port}
        if self.security.public_key is not None:  # who may join each node's data plane
            hello["keys"] = {"0": self.security.public_key.decode(), **{str(w.index): w.key.decode() for w in self.workers}}
        for w in self.workers:
            self.send(w, "hello", {**hello, "index": w.index})
        for w in self.workers:
            meta, _ = self.recv(w, "hello")
            try:
                version = field(meta, "version", int)
                w.data_port = field(meta, "data_port", int, 1)
                w.memory = field(meta, "memory", int, 0)
                w.speed = meta.get("speed")
            except ProtocolError as e:
                raise WorkerFailed(f"worker {w.address}: {e}", [w.index]) from None
            if version != PROTOCOL_VERSION:
                raise WorkerFailed(f"worker {w.address} speaks protocol version {version}, this root "
                                   f"{PROTOCOL_VERSION}: install the same dllama on both", [w.index])

    def configure(self, w: WorkerLink, config: dict) -> dict:
        """Send a worker its node's configuration; its answer says where its weights come from
        and which pieces it still needs."""
        self.send(w, "config", config)
        meta, _ = self.recv(w, "config", timeout=BUILD_TIMEOUT)  # it reads its model file or cache first
        return meta

    def send_pieces(self, w: WorkerLink, pieces: Iterable[np.ndarray], progress: Callable[[int], None]) -> None:
        """The bytes of each piece the worker asked for, in its order, in acknowledged chunks."""
        in_flight = 0
        seq = 0
        for i, array in enumerate(pieces):
            raw = memoryview(np.ascontiguousarray(array)).cast("B")
            for offset in range(0, len(raw), CHUNK_BYTES):
                chunk = raw[offset:offset + CHUNK_BYTES]
                self.send(w, "chunk", {"piece": i, "offset": offset, "seq": seq}, chunk)
                w.weight_bytes_sent += len(chunk)
                seq += 1
                in_flight += 1
                if in_flight == WINDOW:
                    self._ack(w, seq - in_flight)
                    in_flight -= 1
                progress(len(chunk))
            if file_backed(array):  # sent: its pages need not stay in this process's memory
                release_pages(array)
        for _ in range(in_flight):
            self._ack(w, seq - in_flight)
            in_flight -= 1

    def _ack(self, w: WorkerLink, seq: int) -> None:
        meta, _ = self.recv(w, "ack")
        if meta.get("seq") != seq:
            raise WorkerFailed(f"worker {w.address} acknowledged chunk {meta.get('seq')} where {seq} was due",
                               [w.index])

    def start_mesh(self) -> None:
        """Connect the data plane: every node subscribes to every other, proven by hellos."""
        mesh = self.mesh
        endpoints = {0: None}
        endpoints.update({w.index: endpoint(w.host, w.data_port) for w in self.workers})
        mesh.connect({i: e for i, e in endpoints.items() if i != 0}, {w.index: w.key for w in self.workers})
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
            silent = [w for w in self.workers if w.index in e.nodes or w.index not in ready]
            raise WorkerFailed(f"worker {', '.join(w.address for w in silent)} did not join the data plane within "
                               f"{self.net_timeout:g} s (can every node reach every other's data port?)",
                               [w.index for w in silent]) from None

    def send_all(self, kind: str) -> None:
        for w in self.workers:
            self.send(w, kind)

    def wait_built(self) -> list[dict]:
        """Every worker's report once it has built its node (long: it may compile kernels)."""
        return [self.recv(w, "built", timeout=BUILD_TIMEOUT)[0] for w in self.workers]

    def forward(self, fwd: int, rows: dict) -> None:
        """Start forward ``fwd`` of the batch ``rows`` describes (its slots, positions, logit rows)."""
        for w in self.workers:
            self.send(w, "forward", {"fwd": fwd, **rows})

    def logits(self, fwd: int) -> list[bytes]:
        """Every worker's slice of forward ``fwd``'s logits; waits as long as their links are up
        (a slow node is not a dead one: heartbeats tell them apart)."""
        out = []
        for w in self.workers:
            meta, blobs = self.recv(w, "logits", timeout=None)
            if meta.get("fwd") != fwd:
                raise WorkerFailed(f"worker {w.address} sent logits of forward {meta.get('fwd')} in "
                                   f"forward {fwd}", [w.index])
            if len(blobs) != 1:
                raise WorkerFailed(f"worker {w.address} sent logits without data", [w.index])
            out.append(blobs[0])
        return out

    def rows(self, fwd: int, rows: list[int]) -> list[bytes]:
        """Every worker's slice of rows ``rows`` of the last forward, ``fwd`` (a second round,
        where summaries of them could not decide a draw)."""
        for w in self.workers:
            self.send(w, "rows", {"fwd": fwd, "rows": rows})
        out = []
        for w in self.workers:
            meta, blobs = self.recv(w, "logits", timeout=None)
            if meta.get("fwd") != fwd or meta.get("rows") != rows or len(blobs) != 1:
                raise WorkerFailed(f"worker {w.address} sent other logits than rows {rows} of forward {fwd}",
                                   [w.index])
            out.append(blobs[0])
        return out

    def abandon(self) -> None:
        """Give the session up: every worker leaves its forward now (the next hello, of a new
        epoch, starts the next session); the worker links stay."""
        if self.closed:
            return
        self.closed = True
        try:
            self.mesh.abort()
        except zmq.ZMQError:
            pass
        self.mesh.close()

    def close(self) -> None:
        """Tell every worker the session is over (so it frees its memory); the links stay."""
        if self.closed:
            return
        for w in self.workers:
            if w.up:
                try:
                    w.sock.send_multipart(pack("stop", {"epoch": self.epoch}), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        self.abandon()
