"""The worker's end of the control plane: a ROUTER that serves one root at a time.

The worker knows nothing of models until a root sends its configuration; a ``NodeFactory``
(the model side) turns configuration and received bytes into a runnable node. When the
session ends (the root says stop, dies, freezes, or breaks the protocol) everything of it is
dropped and the worker waits for the next root. A hello of a newer epoch from the same root
ends the session at once and starts the next one (the root planned the cluster again); the
root's abort on the data plane gets the worker out of a forward. Messages of another epoch are
stale and dropped. Messages from anyone else get an error reply (a ping, a pong); nothing they
send can end the session or grow memory beyond one bounded message.

The weights of a node come, cheapest first, from a local copy of the model file (the root then
sends only the configuration), from the slice cache (what earlier plans left there, the overlap
of every tensor kept), and for whatever is still missing from the root.
"""
from __future__ import annotations

import gc
import os
import re
import socket
import time
from typing import Callable, Protocol

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from dllama.errors import DllamaError
from dllama.formats.cuts import TensorCut
from dllama.machine import physical_memory, release_memory
from dllama.transport.keys import is_key
from dllama.transport.links import HEARTBEAT_TIMEOUT, PLAINTEXT, LinkSecurity, endpoint, new_socket
from dllama.transport.mesh import Abandoned, Mesh, PeerFailed
from dllama.transport.protocol import (
    MAX_EPOCH,
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
from dllama.transport.zap import CONTROL, CONTROL_PLAIN, DATA, Gatekeeper


class Node(Protocol):
    dim: int  # values per activation row
    wire_q80: bool  # activations travel as Q80 blocks
    weight_bytes: int
    kv_bytes: int

    def forward(self, x: np.ndarray, rows: dict, sync: ForwardSync) -> np.ndarray:
        """This node's slice of the logits of forward ``x``, whose ``rows`` (the forward
        message: slots, positions, logit rows) the node checks, meeting the others at ``sync``."""

    def reply(self, logits: np.ndarray) -> bytes:
        """What the root gets of the last forward's ``logits``: whole rows or summaries."""


class NodeFactory(Protocol):
    def tensor_cuts(self, config: dict) -> list[TensorCut]:
        """What the configuration's node holds of every tensor; DllamaError if invalid."""

    def local_tensors(self, config: dict) -> dict[str, np.ndarray] | None:
        """Every tensor's bytes cut from a local copy of the configuration's model, or None."""

    def build(self, config: dict, tensors: dict[str, np.ndarray]) -> Node: ...


MAX_NODES = 4096
# The root's data-plane link must come up this soon after its hello (a real root's does within
# milliseconds); until then the worker is held by a root that may never show up.
HANDSHAKE_SECONDS = 10.0
MAX_ASKED_SECONDS = 600.0  # the most net timeout or heartbeat timeout a root may ask for
_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")


class SessionEnded(Exception):
    pass


class NextSession(Exception):
    """The root started a new session (a new epoch): end this one, serve that one."""

    def __init__(self, identity: bytes, peer: str, hello: dict):
        super().__init__("the root planned the cluster again")
        self.identity, self.peer, self.hello = identity, peer, hello


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
                 log: Callable[[str], None] = print, security: LinkSecurity = PLAINTEXT,
                 heartbeat: float = HEARTBEAT_TIMEOUT, speed: dict | None = None,
                 authorized: frozenset[bytes] = frozenset()):
        self.factory = factory
        self.speed = speed  # what it measured of itself at start (``model.node_speed``), for --split auto
        self.cache = cache
        self.log = log
        self.security = security
        self.bind_host = "*" if host in ("0.0.0.0", "*") else host
        self.ctx = zmq.Context()
        self.gatekeeper: Gatekeeper | None = None
        if security.public_key is not None:  # before the sockets: no handshake goes unchecked
            self.gatekeeper = Gatekeeper(self.ctx, log, {CONTROL: "its key is not in --authorized-keys",
                                                         DATA: "not a node of this worker's session",
                                                         CONTROL_PLAIN: "it does not speak CURVE (no keys, or "
                                                                        "not dllama)"})
            self.gatekeeper.allow(CONTROL, authorized)
        self.root_keys: dict[bytes, bytes] = {}  # identity -> the key a root proved, from its hello
        self.router = new_socket(self.ctx, zmq.ROUTER, heartbeat, server=True, security=security, domain=CONTROL)
        # With CURVE: peers whose handshake fails before ZAP (plaintext, garbage) are logged too.
        self.handshakes = None if self.gatekeeper is None else self.router.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._accepted: list[str] = []  # peers accepted, whose handshake has not ended yet (oldest first)
        try:
            self.router.bind(f"tcp://{self.bind_host}:{port}")
        except zmq.ZMQError as e:
            raise DllamaError(f"cannot listen on {host}:{port}: {e}") from None
        self.sessions = 0
        self.stale = 0  # messages of an earlier epoch, dropped
        self._root_deadline = 0.0

    # -- messages ------------------------------------------------------------------------------
    def _reply(self, identity: bytes, kind: str, meta: dict | None = None, *blobs, epoch: int | None = None) -> None:
        meta = dict(meta or {})
        if epoch is not None:
            meta["epoch"] = epoch
        try:
            self.router.send_multipart([identity, *pack(kind, meta, *blobs)], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass  # the peer is gone or not reading: nothing to tell it

    def _read(self, owner: bytes | None) -> tuple | None:
        """One message from the ROUTER: (identity, peer address, kind, meta, blobs) when it is
        well-formed and its sender may speak now (``owner``, or anyone saying hello when there
        is no session); a ping gets a pong, everyone else an error reply, and None."""
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
        if self.gatekeeper is not None and len(frames) > 1:
            try:  # the key its handshake proved (the gatekeeper's answer)
                self.root_keys[identity] = frames[1].get("User-Id").encode()
            except zmq.ZMQError:
                pass
            while len(self.root_keys) > 64:  # roots come and go: keep the latest
                del self.root_keys[next(iter(self.root_keys))]
        try:
            kind, meta, blobs = unpack([f.bytes for f in frames[1:]])
        except ProtocolError as e:
            if identity == owner:
                raise  # the session's error reply says it
            self._reply(identity, "error", {"message": str(e)})
            return None
        epoch = meta.get("epoch") if isinstance(meta.get("epoch"), int) else None
        if kind == "ping":
            self._reply(identity, "pong", {"idle": owner is None}, epoch=epoch)
            return None
        if owner is not None and identity != owner:
            self._reply(identity, "error", {"message": "this worker is busy with another root"}, epoch=epoch)
            return None
        if owner is None and kind != "hello":
            if kind != "stop":  # a stop that arrives after its session ended needs no answer
                self._reply(identity, "error", {"message": f"{kind!r} before hello"}, epoch=epoch)
            return None
        return identity, peer, kind, meta, blobs

    def _next(self, owner: bytes | None, mesh: Mesh | None, epoch: int = 0) -> tuple:
        """The next message of session ``epoch`` that ``owner`` (anyone, for a hello, when None)
        may send. Waits as long as the root's data-plane link is up: a root that dies or freezes
        drops it. Until that link is up, waits at most the net timeout. A hello of a newer epoch
        from the owner raises ``NextSession``; the owner's messages of other epochs are dropped."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        if self.handshakes is not None:
            poller.register(self.handshakes, zmq.POLLIN)
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
            if self.handshakes is not None and self.handshakes in ready:
                self._note_handshakes()
            if self.router in ready:
                message = self._read(owner)
                if message is None:
                    continue
                if owner is None:
                    return message
                identity, peer, kind, meta, _ = message
                got = meta.get("epoch")
                if got == epoch:
                    return message
                if kind == "hello" and isinstance(got, int) and not isinstance(got, bool) and got > epoch:
                    raise NextSession(identity, peer, meta)
                self.stale += 1  # a session given up: refused

    def _note_handshakes(self) -> None:
        """Log the peers refused before the gatekeeper is asked (no CURVE, or not ZeroMQ at all):
        libzmq's handshake events name no peer, so accepted connections are matched, in order, with
        the handshakes that end (succeeded, refused by the gatekeeper, which logs those itself, or
        failed). Under many strangers at once the pairing is approximate."""
        while self.handshakes.poll(0):
            message = recv_monitor_message(self.handshakes)
            event = message["event"]
            if event == zmq.EVENT_ACCEPTED:
                try:
                    with socket.socket(fileno=os.dup(int(message["value"]))) as s:
                        host = s.getpeername()[0]
                except OSError:  # already gone
                    host = "?"
                self._accepted = (self._accepted + [host])[-256:]
                continue
            host = self._accepted.pop(0) if self._accepted else "?"
            if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.gatekeeper.note(CONTROL_PLAIN, host)

    def _expect(self, owner: bytes, mesh: Mesh, epoch: int, kind: str) -> tuple[dict, list]:
        _, _, got, meta, blobs = self._next(owner, mesh, epoch)
        self._check_kind(owner, got, kind, epoch)
        return meta, blobs

    def _check_kind(self, owner: bytes, got: str, kind: str, epoch: int) -> None:
        if got == "stop":
            self._reply(owner, "bye", epoch=epoch)
            raise SessionEnded("the root ended the session")
        if got != kind:
            raise ProtocolError(f"{got!r} where {kind!r} was due")

    # -- the loop ------------------------------------------------------------------------------
    def serve(self, max_sessions: int | None = None) -> None:
        following = None  # the hello of a session that ended the previous one
        while max_sessions is None or self.sessions < max_sessions:
            if following is None:
                owner, peer, _, meta, _ = self._next(None, None)
            else:
                owner, peer, meta = following.identity, following.peer, following.hello
                following = None
            self.sessions += 1
            try:
                self._session(owner, peer, meta)
            except NextSession as e:
                self.log(f"⭕ session ended: {e}")
                following = e
            except SessionEnded as e:
                self.log(f"⭕ session ended: {e}")
            except Exception as e:  # noqa: BLE001 - whatever a root sends, the worker serves on
                self.log(f"⭕ session ended: {_describe(e)}")
            finally:
                gc.collect()  # the node's weights and KV cache go now, not at the next session
            if following is None:
                self.log("💡 waiting for a root")

    def _session(self, owner: bytes, peer: str, hello: dict) -> None:
        """One root's session; on any failure the root hears why (and which peer failed)
        before the data plane closes, so that it can tell the user the real cause."""
        mesh = None
        epoch = hello.get("epoch")
        try:
            version = hello.get("version")
            if version != PROTOCOL_VERSION:
                raise ProtocolError(f"the root speaks protocol version {version}, this worker {PROTOCOL_VERSION}: "
                                    f"install the same dllama on both")
            epoch = field(hello, "epoch", int, 1)
            index = field(hello, "index", int, 1)
            n_nodes = field(hello, "n_nodes", int, 2)
            root_port = field(hello, "root_port", int, 1)
            # Clamped: a root (or a stranger, on plaintext links) cannot hold this worker for long.
            net_timeout = min(_seconds(hello, "net_timeout"), MAX_ASKED_SECONDS)
            heartbeat = min(_seconds(hello, "heartbeat"), MAX_ASKED_SECONDS)
            if index >= n_nodes or n_nodes > MAX_NODES or root_port > 65535 or epoch > MAX_EPOCH:
                raise ProtocolError("epoch, node index, node count or port out of range")
            keys = self._session_keys(owner, hello, index, n_nodes)
            mesh = Mesh(self.ctx, index, net_timeout, heartbeat, epoch, self.bind_host, self.security)
            self._run(owner, peer, epoch, index, n_nodes, root_port, net_timeout, mesh, keys)
        except (SessionEnded, NextSession):
            raise
        except Abandoned as e:
            raise SessionEnded(str(e)) from None
        except Exception as e:
            meta = {"message": _describe(e)}
            if isinstance(e, PeerFailed):
                meta["failed"] = e.nodes
            self._reply(owner, "error", meta, epoch=epoch if isinstance(epoch, int) else None)
            raise
        finally:
            if mesh is not None:
                mesh.close()

    def _session_keys(self, owner: bytes, hello: dict, index: int, n_nodes: int) -> dict[int, bytes]:
        """With CURVE: every node's public key as the root's hello names them (the root, whose
        own key its handshake proved, says who is in its session); the data plane admits them."""
        if self.gatekeeper is None:
            return {}
        named = hello.get("keys")
        if not isinstance(named, dict) or len(named) != n_nodes:
            raise ProtocolError("hello: the nodes' keys are missing")
        keys = {}
        for node, key in named.items():
            if not (isinstance(node, str) and node.isascii() and node.isdecimal() and int(node) < n_nodes
                    and isinstance(key, str) and is_key(key)):
                raise ProtocolError("hello: malformed node keys")
            keys[int(node)] = key.encode()
        if len(keys) != n_nodes or keys[0] != self.root_keys.get(owner) or keys[index] != self.security.public_key:
            raise ProtocolError("hello: the keys it names are not the root's and this worker's")
        self.gatekeeper.allow(DATA, [k for node, k in keys.items() if node != index])
        return keys

    def _run(self, owner, peer, epoch, index, n_nodes, root_port, net_timeout, mesh: Mesh,
             keys: dict[int, bytes]) -> None:
        self._root_deadline = time.monotonic() + min(net_timeout, HANDSHAKE_SECONDS)
        mesh.connect({0: endpoint(peer or "127.0.0.1", root_port)}, keys)
        self._reply(owner, "hello", {"version": PROTOCOL_VERSION, "data_port": mesh.port,
                                     "memory": physical_memory(), "speed": self.speed}, epoch=epoch)
        self.log(f"💡 root {peer or '?'} connected: this is node {index} of {n_nodes} (epoch {epoch})")

        config, _ = self._expect(owner, mesh, epoch, "config")
        cuts = self.factory.tensor_cuts(config)
        tensors, source, need, store = self._weights(config, cuts)
        self._reply(owner, "config", {"source": source, "need": [[c.name, c.lo, c.hi] for c in need]}, epoch=epoch)
        if need:
            self._receive_pieces(owner, mesh, epoch, cuts, need, tensors)
        received = sum(c.nbytes for c in need)
        self.log(f"💡 weights: {sum(c.nbytes for c in cuts) / 1e6:.1f} MB ({source}"
                 + (f", {received / 1e6:.1f} MB received)" if received else ")"))

        meta, _ = self._expect(owner, mesh, epoch, "mesh")
        mesh.connect(_peer_endpoints(meta, index, n_nodes), keys)
        reported = []

        def build_due(seen: set[int]) -> bool:
            if not reported and len(seen) == n_nodes - 1:
                self._reply(owner, "mesh_ready", epoch=epoch)
                reported.append(True)
            while reported and self.router.poll(0):  # the root says build once all are ready
                message = self._read(owner)
                if message is not None:
                    if message[3].get("epoch") != epoch:
                        if message[2] == "hello":
                            raise NextSession(message[0], message[1], message[3])
                        continue
                    self._check_kind(owner, message[2], "build", epoch)
                    return True
            return False

        mesh.handshake(build_due)
        key = config.get("cache_key")
        if store:
            try:  # while the root waits for "built", which may take long
                self.cache.store(key, cuts, tensors, config.get("model_digest"))
            except OSError as e:
                self.log(f"⚠️  cannot write the slice cache: {e.strerror or e}")
        node = self.factory.build(config, tensors)
        del tensors
        release_memory()  # the received slice and packing's temporaries, back to the system
        codec = WireCodec(node.wire_q80)  # compiles its kernels now, not in the first timed sync
        self._reply(owner, "built", {"weight_bytes": node.weight_bytes, "kv_bytes": node.kv_bytes}, epoch=epoch)
        self.log(f"💡 node ready: {node.weight_bytes / 1e6:.1f} MB of weights, KV cache {node.kv_bytes / 1e6:.1f} MB")
        self._expect(owner, mesh, epoch, "go")
        sync = MeshSync(mesh, codec, n_nodes, node.dim)
        last_fwd = 0
        logits = np.zeros((0, 0), dtype=np.float32)  # of the last forward, for a second round
        while True:
            _, _, kind, meta, _ = self._next(owner, mesh, epoch)
            if kind == "rows":  # whole rows of the last forward, where its summaries did not do
                wanted = field(meta, "rows", list)
                if meta.get("fwd") != last_fwd or not wanted or not all(
                        type(r) is int and 0 <= r < len(logits) for r in wanted):
                    raise ProtocolError(f"rows {wanted} of forward {meta.get('fwd')} asked for after forward {last_fwd}")
                self._reply(owner, "logits", {"fwd": last_fwd, "rows": wanted},
                            np.ascontiguousarray(logits[wanted], dtype=np.float32).data, epoch=epoch)
                continue
            self._check_kind(owner, kind, "forward", epoch)
            fwd = field(meta, "fwd", int, last_fwd + 1)
            rows = field(meta, "slots", list)
            last_fwd = fwd
            x, steps = sync.receive_input(fwd, len(rows))
            logits = node.forward(x, meta, steps)
            self._reply(owner, "logits", {"fwd": fwd}, node.reply(logits), epoch=epoch)

    def _weights(self, config: dict, cuts: list[TensorCut]) -> tuple[dict[str, np.ndarray], str, list[TensorCut], bool]:
        """The node's tensors as far as this worker has them (flat bytes), where they came from
        ("local", "cache", "cache+root" or "root"), the pieces still missing (to fill in, in the
        returned buffers), and whether the slice cache should keep them under this plan's key."""
        local = self.factory.local_tensors(config)
        if local is not None:
            return local, "local", [], False
        key = config.get("cache_key")
        digest = config.get("model_digest")
        if self.cache is None or not isinstance(key, str) or not isinstance(digest, str):
            return {c.name: np.empty(c.nbytes, np.uint8) for c in cuts}, "root", list(cuts), False
        tensors = self.cache.load(key, cuts)
        if tensors is not None:
            return tensors, "cache", [], False  # this plan's own entry
        tensors, need = self.cache.assemble(digest, cuts)
        kept = sum(c.nbytes for c in cuts) - sum(c.nbytes for c in need)
        return tensors, ("root" if not kept else "cache+root" if need else "cache"), need, True

    def _receive_pieces(self, owner, mesh, epoch, cuts: list[TensorCut], need: list[TensorCut],
                        tensors: dict[str, np.ndarray]) -> None:
        """Fill the ``need`` pieces of ``tensors`` from the root's chunks (in that order)."""
        cuts = {c.name: c for c in cuts}
        seq = 0
        for i, piece in enumerate(need):
            whole = cuts[piece.name]
            dest = whole.place(tensors[piece.name].reshape(whole.shape), piece.lo, piece.hi)
            # Rows land where they belong; columns (o and w2) pass through a buffer of one piece.
            direct = dest.flags.c_contiguous
            buf = dest.reshape(-1) if direct else np.empty(piece.nbytes, dtype=np.uint8)
            filled = 0
            while filled < len(buf):
                meta, blobs = self._expect(owner, mesh, epoch, "chunk")
                if meta.get("piece") != i or meta.get("seq") != seq or meta.get("offset") != filled or len(blobs) != 1:
                    raise ProtocolError(f"chunk {meta.get('seq')} of piece {meta.get('piece')} out of order")
                data = blobs[0]
                if not data or filled + len(data) > len(buf):
                    raise ProtocolError(f"chunk overruns piece {i} ({piece.name})")
                buf[filled:filled + len(data)] = np.frombuffer(data, dtype=np.uint8)
                filled += len(data)
                seq += 1
                self._reply(owner, "ack", {"seq": seq - 1}, epoch=epoch)
            if not direct:
                dest[...] = buf.reshape(piece.shape)

    def close(self) -> None:
        if self.handshakes is not None:
            self.router.disable_monitor()
            self.handshakes.close(linger=0)
        self.router.close(linger=0)
        if self.gatekeeper is not None:
            self.gatekeeper.close()
        self.ctx.term()


def _seconds(meta: dict, name: str) -> float:
    value = meta.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.1 <= value <= 86400:
        raise ProtocolError(f"{name} out of range")
    return float(value)
