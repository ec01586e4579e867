"""Retrying lost workers: a thread that pings each with backoff, on links of its own.

A worker that answers idle (out of any session: restarted, woken up, its network back) is
marked *rejoining*; the cluster takes it back at its next forward (``engine.cluster``).
"""
from __future__ import annotations

import threading
import time

import zmq

from dllama.transport.links import PLAINTEXT, LinkSecurity, endpoint, new_socket, parse_address
from dllama.transport.protocol import ProtocolError, pack, unpack

PROBE_FIRST = 0.5
PROBE_MAX = 30.0


class Prober(threading.Thread):
    """Retries lost workers with backoff (a ping on a fresh link of its own); one that answers
    idle becomes rejoining. Never touches the cluster's sockets, so serving never waits on it."""

    def __init__(self, members: list, lock: threading.Lock, heartbeat: float, security: LinkSecurity = PLAINTEXT):
        super().__init__(name="dllama-prober", daemon=True)
        self.members = members  # engine.cluster.Member: state, address, probes, next_probe
        self.lock = lock
        self.heartbeat = heartbeat
        self.security = security
        self.ctx = zmq.Context()
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        self.ctx.term()

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            now = time.monotonic()
            with self.lock:
                due = [m for m in self.members if m.state == "lost" and m.next_probe <= now]
            for m in due:
                idle = self._probe(m.address, m.key)
                with self.lock:
                    if m.state != "lost":
                        continue
                    if idle:
                        m.state = "rejoining"
                    else:
                        m.probes += 1
                        m.next_probe = time.monotonic() + min(PROBE_MAX, PROBE_FIRST * 2 ** m.probes)

    def _probe(self, address: str, key: bytes | None) -> bool:
        """Whether the worker at ``address`` (holding ``key``) answers a ping, idle (out of any session)."""
        host, port = parse_address(address)
        sock = new_socket(self.ctx, zmq.DEALER, self.heartbeat, server=False)
        try:
            self.security.client(sock, key)
            sock.connect(endpoint(host, port))
            sock.send_multipart(pack("ping"))
            if not sock.poll(1000):
                return False
            kind, meta, _ = unpack(sock.recv_multipart())
            return kind == "pong" and meta.get("idle") is True
        except (zmq.ZMQError, ProtocolError):
            return False
        finally:
            sock.close(linger=0)
