"""The data plane: an all-gather over PUB/SUB between every pair of nodes.

Each node binds one PUB socket and subscribes to every peer's. A part is tagged with the
forward number, step and sender; a node waits (in ``zmq.poll``, never spinning) until it holds
the part of every peer for the step it needs. Peers may run at most one step ahead, so parts
of later steps are kept until asked for; a part of an earlier step, a duplicate, or one from
a node that is not a peer is a protocol error, never silently mixed in.

A peer that dies or freezes makes its connection drop (heartbeats, see ``links``): the
disconnect raises ``PeerFailed`` naming the node. A wait has no deadline of its own while every
peer's link is up, so a slow node is never taken for a dead one. Frames of another epoch (a
session the root has given up) are dropped; the root's ``ABORT_STEP`` raises ``Abandoned``.
"""
from __future__ import annotations

import time

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from dllama.errors import DllamaError
from dllama.transport.links import PLAINTEXT, LinkSecurity, new_socket
from dllama.transport.zap import DATA
from dllama.transport.protocol import (ABORT_STEP, DATA_HEADER, DATA_MAGIC, HELLO_FWD, ProtocolError, data_frame,
                                       parse_data)

# Parts buffered ahead of the step being gathered; lockstep needs at most one step per peer.
MAX_PENDING = 256
HEADER = DATA_HEADER.size
HELLO_INTERVAL = 0.02
# A waiting gather looks at connection events this often (milliseconds).
WATCH_MS = 100
ABORT_LINGER_MS = 200


class PeerFailed(DllamaError):
    def __init__(self, nodes: list[int], reason: str):
        self.nodes = nodes
        self.reason = reason
        super().__init__(f"node(s) {nodes} {reason}")


class Abandoned(DllamaError):
    """The root gave up the session's forward (a node was lost): leave it, a new session follows."""


class Mesh:
    def __init__(self, ctx: zmq.Context, index: int, net_timeout: float, heartbeat: float, epoch: int = 0,
                 bind_host: str = "*", security: LinkSecurity = PLAINTEXT):
        self.index = index
        self.epoch = epoch
        self.net_timeout = net_timeout  # for the handshake: links that never come up
        self.security = security
        self.pub = new_socket(ctx, zmq.PUB, heartbeat, server=True, security=security, domain=DATA)
        self.port = self.pub.bind_to_random_port(f"tcp://{bind_host}")
        self.sub = new_socket(ctx, zmq.SUB, heartbeat, server=False, security=security)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.peers: dict[str, int] = {}  # endpoint -> node
        self.connected: set[int] = set()
        self.peer_nodes: set[int] = set()
        self.sub.rcvtimeo = WATCH_MS
        self.pending: dict[tuple[int, int, int], bytes] = {}  # whole frames of later steps
        # Frames are received in place (``recv_into``), this node's own built in place: no
        # allocation per part. As wide as the largest part asked for.
        self._shape_frames(HEADER)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.stale = 0  # frames of another epoch, dropped
        self._last: tuple[int, int] = (0, -1)  # the latest step gathered

    def connect(self, peers: dict[int, str], keys: dict[int, bytes] | None = None) -> None:
        """Subscribe to every peer's PUB endpoint (``tcp://host:port``); with CURVE, ``keys``
        holds the public key each must prove it holds."""
        for node, endpoint in peers.items():
            self.peers[endpoint] = node
            self.peer_nodes.add(node)
            self.security.client(self.sub, (keys or {}).get(node))
            self.sub.connect(endpoint)
        self._shape_frames(self.frames.shape[1])

    def handshake(self, is_done) -> None:
        """Publish hellos (one per ``HELLO_INTERVAL``) until ``is_done(seen)`` says every needed
        subscription is live (``seen``: the peers whose hello arrived). Covers ZeroMQ's slow
        joiner: a part published before a subscription is in place would be lost. Other parts
        that arrive meanwhile (a peer that finished first may already have started) are kept."""
        seen: set[int] = set()
        deadline = time.monotonic() + self.net_timeout
        next_hello = 0.0
        while not is_done(seen):
            now = time.monotonic()
            if now >= next_hello:
                self.pub.send(data_frame(self.epoch, HELLO_FWD, 0, self.index, b""))
                next_hello = now + HELLO_INTERVAL
            if now > deadline:
                missing = sorted(self.peer_nodes - seen)
                raise PeerFailed(missing, f"did not join the data plane within {self.net_timeout:g} s")
            if self.sub.poll(max(1, int((next_hello - now) * 1000))):
                while self.sub.poll(0):
                    frame = self.sub.recv()
                    epoch, fwd, step, node, _ = parse_data(frame)
                    if node not in self.peer_nodes or epoch != self.epoch:
                        continue
                    if step == ABORT_STEP and node == 0:
                        raise Abandoned("the root abandoned the session")
                    if fwd == HELLO_FWD:
                        seen.add(node)
                    elif len(self.pending) < MAX_PENDING:
                        self.bytes_received += len(frame)
                        self.pending[(fwd, step, node)] = frame
            self.check_peers()

    def publish(self, fwd: int, step: int, payload: bytes) -> None:
        frame = data_frame(self.epoch, fwd, step, self.index, payload)
        self.pub.send(frame)  # copying a small frame is cheaper than pyzmq's zero-copy tracking
        self.bytes_sent += len(frame)

    def own_part(self, size: int) -> np.ndarray:
        """The payload of this node's next part, ``size`` bytes to fill in place, then send with
        ``publish_part``; it stays row 0 of ``frames`` until the next ``own_part``."""
        self._reserve(size)
        return self.frames[0, HEADER:HEADER + size]

    def publish_part(self, fwd: int, step: int, size: int) -> None:
        frame = self.frames[0, :HEADER + size]
        DATA_HEADER.pack_into(frame, 0, DATA_MAGIC, self.epoch, fwd, step, self.index)
        self.pub.send(frame)
        self.bytes_sent += HEADER + size

    def gather_parts(self, fwd: int, step: int, size: int) -> np.ndarray:
        """Every node's part of (fwd, step), ``size`` bytes each, this node's own (published with
        ``publish_part``) included: per node, the row of ``frames`` that holds its part, the
        payload from byte ``HEADER`` on. Valid until the next ``own_part`` or gather."""
        self._reserve(size)
        self.order[self.index] = 0
        self._collect(fwd, step, self.peer_nodes, HEADER + size)
        for node in self.peer_nodes:
            if self.lengths[self.order[node]] != HEADER + size:
                raise ProtocolError(f"node {node} sent a part of {self.lengths[self.order[node]] - HEADER} bytes "
                                    f"for {size}")
        return self.order

    def gather(self, fwd: int, step: int, sources: list[int], max_size: int = 1 << 16) -> dict[int, memoryview]:
        """The parts of ``sources`` for (fwd, step), each at most ``max_size`` bytes (views valid
        until the next gather)."""
        self._reserve(max_size)
        self._collect(fwd, step, sources, HEADER + max_size)
        return {node: memoryview(self.frames[self.order[node], HEADER:self.lengths[self.order[node]]])
                for node in sources}

    def _reserve(self, size: int) -> None:
        if self.frames.shape[1] < HEADER + size:
            self._shape_frames(HEADER + size)

    def _shape_frames(self, width: int) -> None:
        """A row for every node's frame of up to ``width`` bytes (row 0: this node's own), and one
        for a frame that turns out to be of a later step."""
        width = -(-width // 64) * 64  # float32 views of the payloads stay aligned
        self.frames = np.zeros((len(self.peer_nodes) + 2, width), dtype=np.uint8)
        self.lengths = np.zeros(len(self.frames), dtype=np.int64)  # bytes of the frame in each row
        self.order = np.zeros(max(self.peer_nodes | {self.index}) + 1, dtype=np.int64)  # per node, its row

    def _collect(self, fwd: int, step: int, sources, limit: int) -> None:
        """Receive the frames of ``sources`` for (fwd, step), each of at most ``limit`` bytes,
        into rows of ``frames`` (from 1 on); ``order[node]`` says which."""
        if (fwd, step) <= self._last:
            raise ProtocolError(f"step {fwd}.{step} gathered twice")
        self._last = (fwd, step)
        row, missing = 1, set(sources)
        for node in sources if self.pending else ():
            part = self.pending.pop((fwd, step, node), None)
            if part is not None:
                if len(part) > limit:
                    raise ProtocolError(f"node {node} sent a frame of {len(part)} bytes, more than {limit}")
                self.frames[row, :len(part)] = np.frombuffer(part, dtype=np.uint8)
                self.lengths[row], self.order[node] = len(part), row
                row += 1
                missing.discard(node)
        while missing:
            buf = self.frames[row]
            try:  # a blocking receive (in C, without the GIL) is the fastest wake-up pyzmq has
                n = self.sub.recv_into(buf)
            except zmq.Again:  # every WATCH_MS: did a peer's link drop?
                self.check_peers()
                continue
            self.bytes_received += n
            if n < HEADER:
                raise ProtocolError("data frame too short")
            magic, e, f, s, node = DATA_HEADER.unpack_from(buf)
            if magic != DATA_MAGIC:
                raise ProtocolError("data frame with a wrong magic")
            if e != self.epoch:
                self.stale += 1
                continue
            if f == HELLO_FWD:
                continue  # a late handshake message
            if s == ABORT_STEP and node == 0:
                raise Abandoned(f"the root abandoned forward {fwd}")
            if node not in self.peer_nodes:
                raise ProtocolError(f"a part from node {node}, which is not a peer")
            if n > limit:  # recv_into kept the first ``limit`` bytes only
                raise ProtocolError(f"node {node} sent a frame of {n} bytes, more than {limit}")
            if (f, s) == (fwd, step) and node in sources:
                if node not in missing:
                    raise ProtocolError(f"node {node} sent step {f}.{s} twice")
                self.lengths[row], self.order[node] = n, row
                row += 1
                missing.discard(node)
            elif (f, s) > (fwd, step):
                if (f, s, node) in self.pending or len(self.pending) >= MAX_PENDING:
                    raise ProtocolError(f"node {node} sent step {f}.{s} out of order")
                self.pending[(f, s, node)] = buf[:n].tobytes()
            else:
                raise ProtocolError(f"node {node} sent step {f}.{s} while {fwd}.{step} was due")

    def abort(self) -> None:
        """The root: every node leaves the forward it is in (they wait for nothing else)."""
        self.pub.send(data_frame(self.epoch, 0, ABORT_STEP, self.index, b""))

    def check_peers(self) -> None:
        """Note new connections; raise PeerFailed when a peer's connection dropped (it died, or
        stopped answering heartbeats)."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            node = self.peers.get(event["endpoint"].decode(errors="replace"))
            if node is None:
                continue
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connected.add(node)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                raise PeerFailed([node], "disconnected")

    def close(self) -> None:
        try:
            self.sub.disable_monitor()
        except zmq.ZMQError:
            pass
        for s in (self.monitor, self.sub):
            s.close(linger=0)
        self.pub.close(linger=ABORT_LINGER_MS)  # an abort just published still leaves
