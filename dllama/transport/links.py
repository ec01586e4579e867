"""Sockets with the settings every link of a cluster needs.

Liveness: ZeroMQ's own heartbeats (ZMTP PING/PONG, answered by libzmq's I/O thread even while
Python computes) close a connection whose peer stops answering, so a killed or frozen node
shows up as a disconnect event within the net timeout, also when no message is due.

Security: every socket goes through a ``LinkSecurity``; plaintext today. CurveZMQ (encrypted,
authenticated links) slots in as another ``LinkSecurity`` that sets the curve keys on the
server and client ends.
"""
from __future__ import annotations

import zmq

from dllama.transport.protocol import MAX_MESSAGE_BYTES


class LinkSecurity:
    """Plaintext links: anyone who can reach a port can talk to it (use a trusted network)."""

    name = "plaintext"

    def server(self, sock: zmq.Socket) -> None:
        pass

    def client(self, sock: zmq.Socket) -> None:
        pass


PLAINTEXT = LinkSecurity()


def new_socket(ctx: zmq.Context, kind: int, net_timeout: float, server: bool,
               security: LinkSecurity = PLAINTEXT) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    timeout_ms = max(100, int(net_timeout * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(50, min(1000, timeout_ms // 4)))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, timeout_ms)
    # Lockstep keeps a handful of messages in flight; the marks only bound a broken peer.
    sock.sndhwm = 1000
    sock.rcvhwm = 1000
    if kind in (zmq.ROUTER, zmq.SUB):
        # Whatever a stranger sends cannot grow our memory past one message of this size.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    (security.server if server else security.client)(sock)
    return sock
