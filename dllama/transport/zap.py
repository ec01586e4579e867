"""Who may connect: ZeroMQ's authentication protocol (ZAP, RFC 27) for CURVE links.

Every CURVE server socket of a node (a worker's control ROUTER, every node's data-plane PUB)
names a domain; during each handshake libzmq asks this node's ``Gatekeeper`` whether the
client's public key (already proven by the handshake) is allowed in that domain. A refused
client gets nothing: its handshake fails. The refusing node logs one line naming the address
(at most one a minute per address and domain, so that a flood of attempts cannot flood the log).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import zmq
import zmq.utils.z85

ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq sends the ZAP requests of a context
CONTROL = "control"  # a worker's ROUTER: the roots of --authorized-keys
DATA = "data"  # every node's PUB: the nodes of its session
CONTROL_PLAIN = "control, no CURVE"  # a worker's ROUTER, peers refused before ZAP (logged by the worker)
LOG_EVERY = 60.0


class Gatekeeper:
    """The ZAP handler of one ZeroMQ context, in a thread of its own (libzmq waits for its
    answer during the handshake, never while messages flow)."""

    def __init__(self, ctx: zmq.Context, log: Callable[[str], None], why: dict[str, str] | None = None):
        self.log = log
        self.why = why or {}  # per domain, the reason a refusal gives
        self._allowed: dict[str, frozenset[bytes]] = {}
        self._logged: dict[tuple[str, str], float] = {}
        self.refused = 0
        self._stop = threading.Event()
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(ctx, ready, failure), name="zap", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def allow(self, domain: str, keys) -> None:
        """From now on, ``keys`` (binary or Z85) and only they may connect in ``domain``."""
        self._allowed[domain] = frozenset(k if len(k) == 32 else zmq.utils.z85.decode(k) for k in keys)

    def _serve(self, ctx: zmq.Context, ready: threading.Event, failure: list) -> None:
        sock = ctx.socket(zmq.REP)
        sock.linger = 0
        try:
            sock.bind(ENDPOINT)
        except zmq.ZMQError as e:
            failure.append(e)
            ready.set()
            sock.close()
            return
        ready.set()
        try:
            while not self._stop.is_set():
                if sock.poll(100):
                    sock.send_multipart(self._answer(sock.recv_multipart()))
        except zmq.ZMQError:  # the context is terminating
            pass
        finally:
            sock.close()

    def _answer(self, request: list[bytes]) -> list[bytes]:
        """RFC 27: version, request id, domain, address, identity, mechanism, credentials."""
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _, mechanism = request[:6]
        credentials = request[6:]
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"unknown ZAP version", b"", b""]
        key = credentials[0] if mechanism == b"CURVE" and len(credentials) == 1 else b""
        name = domain.decode("utf-8", "replace")
        if len(key) == 32 and key in self._allowed.get(name, ()):
            return [b"1.0", request_id, b"200", b"OK", zmq.utils.z85.encode(key), b""]
        self.refused += 1
        self.note(name, address.decode("utf-8", "replace"))
        return [b"1.0", request_id, b"400", b"not authorized", b"", b""]

    def note(self, domain: str, address: str) -> None:
        """Log a refusal in ``domain`` of the peer at ``address`` (rate-limited)."""
        address = address.removeprefix("::ffff:") or "?"  # IPv4 as IPv4
        now = time.monotonic()
        if now - self._logged.get((domain, address), -LOG_EVERY) >= LOG_EVERY:
            self._logged[(domain, address)] = now
            if len(self._logged) > 10_000:  # a flood from many addresses: forget the oldest
                self._logged = dict(sorted(self._logged.items(), key=lambda kv: kv[1])[-5_000:])
            self.log(f"🔒 refused {address}: {self.why.get(domain, 'its key is not allowed here')}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
