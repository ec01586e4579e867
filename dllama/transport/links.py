"""Sockets with the settings every link of a cluster needs.

Liveness: ZeroMQ's own heartbeats (ZMTP PING/PONG, answered by libzmq's I/O thread even while
Python computes) close a connection whose peer stops answering, so a killed or frozen node
shows up as a disconnect event within the heartbeat timeout, also when no message is due, and
a node that is only slow (a long forward on a small machine) keeps its links.

Security: every socket goes through a ``LinkSecurity``. ``PLAINTEXT`` (no keys given: for a
quick try on a trusted network) or ``CurveSecurity``: CurveZMQ, every link encrypted and both
ends proven by their keys; a client names the server key it expects, a server asks its
context's ``zap.Gatekeeper`` which client keys its domain allows.
"""
from __future__ import annotations

import zmq

from dllama.transport.protocol import MAX_MESSAGE_BYTES


class LinkSecurity:
    """Plaintext links: anyone who can reach a port can talk to it (use a trusted network)."""

    name = "plaintext"
    public_key: bytes | None = None

    def server(self, sock: zmq.Socket, domain: str) -> None:
        pass

    def client(self, sock: zmq.Socket, server_key: bytes | None) -> None:
        pass


class CurveSecurity(LinkSecurity):
    """CurveZMQ with this node's key pair (Z85): encrypted links; a server admits the clients
    its domain allows (``zap``), a client connects only to a server holding ``server_key``."""

    name = "curve"

    def __init__(self, public_key: bytes, secret_key: bytes):
        self.public_key, self.secret_key = public_key, secret_key

    def server(self, sock: zmq.Socket, domain: str) -> None:
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True
        sock.zap_domain = domain.encode()

    def client(self, sock: zmq.Socket, server_key: bytes | None) -> None:
        """Before each ``connect``: the key that peer must prove it holds."""
        if server_key is None:
            raise ValueError("a CURVE client needs the server's public key")
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_serverkey = server_key


PLAINTEXT = LinkSecurity()
MAX_HEARTBEAT_MS = 6_553_500
# Seconds without an answer to a heartbeat before a link is dropped (--heartbeat-timeout).
HEARTBEAT_TIMEOUT = 2.5


def endpoint(host: str, port: int) -> str:
    """``tcp://host:port``, with IPv6 addresses in brackets."""
    host = host.strip("[]")
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPV6]:PORT) as users write a worker's address."""
    host, sep, port = address.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c.isspace() or c in "/[]" for c in host) or not port.isdecimal() \
            or not 0 < int(port) < 65536:
        raise ValueError(f"worker address {address!r} is not HOST:PORT")
    return host, int(port)


def heartbeat_settings(heartbeat: float) -> tuple[int, int]:
    """(interval, timeout) in ms: a ping every interval; no answer within the timeout drops the
    link, so a silent peer is noticed within ``heartbeat`` seconds (interval + timeout). ZeroMQ's
    TTL field holds at most 6553.5 s; a longer heartbeat keeps that."""
    total_ms = min(MAX_HEARTBEAT_MS, max(100, int(heartbeat * 1000)))
    interval = max(20, min(1000, total_ms // 5))
    return interval, total_ms - interval


def new_socket(ctx: zmq.Context, kind: int, heartbeat: float, server: bool,
               security: LinkSecurity = PLAINTEXT, domain: str = "") -> zmq.Socket:
    """A socket with the cluster's settings; a ``server`` (it binds) is secured for ``domain``
    now, a client's connections one by one (``security.client`` before each connect)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.setsockopt(zmq.IPV6, 1)  # IPv4 and IPv6 both
    interval, timeout_ms = heartbeat_settings(heartbeat)
    sock.setsockopt(zmq.HEARTBEAT_IVL, interval)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, timeout_ms)
    # Lockstep keeps a handful of messages in flight; the marks only bound a broken peer.
    sock.sndhwm = 1000
    sock.rcvhwm = 1000
    if kind in (zmq.ROUTER, zmq.SUB):
        # A frame larger than this drops the sender's connection. ZeroMQ bounds frames, not
        # frames per message: the ROUTER also queues few messages per peer, and every message
        # with more frames than the protocol's is dropped as soon as it is read.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.rcvhwm = 8
    if server:
        security.server(sock, domain)
    return sock
