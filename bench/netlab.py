"""An emulated home LAN on this machine: each node in its own Linux network namespace, joined
through a veth pair to a bridge, every link shaped with ``tc tbf`` to a chosen rate.

    python bench/netlab.py                         # 2 nodes at 1 Gbit/s and 100 Mbit/s: TCP rate per link
    python bench/netlab.py --nodes 3 --rates 100mbit

Used by the benches and tests as ``with Lan(2, "100mbit") as lan: lan.popen(0, [...])``: node i
has the address ``lan.addresses[i]`` on its ``eth0``. The bridge sits in a namespace of its own
(the hub), so nothing is added to the machine's own network and nothing leaves it. Each link
is shaped both ways (tbf on the node's ``eth0`` and on the hub's end), with a 50 ms queue: past
it, packets are dropped, as a home router does. This kernel has no ``netem``, so no delay is
added: a link's latency is what queueing and serialization at its rate give.

Needs root. Everything a ``Lan`` creates is removed when it closes, also on Ctrl-C, SIGTERM and
errors; namespaces left by a process that was killed outright (SIGKILL) are removed by the next
``Lan`` (their names carry the creator's process id).
"""
from __future__ import annotations

import argparse
import atexit
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

PREFIX = "dllan"  # namespace names: dllan<pid>h (hub), dllan<pid>n<i> (nodes)
SUBNET = "10.77.0"  # private, and only inside the namespaces
QUEUE_MS = 50
NO_DELAY_NOTE = ("no added delay: this kernel has no netem, so a link's latency is its queueing and "
                 "serialization at the shaped rate only")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$")


class LanError(RuntimeError):
    """The emulated LAN could not be built (not root, no ``ip``, ...)."""


def rate_bits(rate: str) -> float:
    """Bits per second of a ``tc`` rate such as ``100mbit`` or ``1gbit``."""
    m = _RATE.match(rate.strip().lower())
    if not m:
        raise ValueError(f"bad rate {rate!r}: expected e.g. 100mbit or 1gbit")
    return float(m.group(1)) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise LanError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")


def _namespaces() -> list[str]:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise LanError(f"cannot list network namespaces: {e}") from None
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove the namespaces of LANs whose creator is gone; the names removed."""
    removed = []
    for ns in _namespaces():
        m = re.match(rf"^{PREFIX}(\d+)[hn]", ns)
        if m and not _alive(int(m.group(1))):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            removed.append(ns)
    return removed


def _shape(ns: str, dev: str, rate: str) -> None:
    bits = rate_bits(rate)
    # tbf's bucket must hold at least a few full-size frames and what the rate sends in one
    # timer tick; its queue holds QUEUE_MS of traffic, beyond which it drops.
    burst = max(32 * 1024, int(bits / 8 / 500))
    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", str(burst), "latency", f"{QUEUE_MS}ms"], check=True, capture_output=True)


class Lan:
    """``nodes`` namespaces on one bridge, each link shaped to ``rate`` (None: unshaped)."""

    def __init__(self, nodes: int, rate: str | None = "100mbit") -> None:
        if os.geteuid() != 0:
            raise LanError("an emulated LAN needs root (network namespaces and tc)")
        if not 1 <= nodes <= 200:
            raise ValueError("1 to 200 nodes")
        if rate is not None:
            rate_bits(rate)
        sweep_stale()
        self.rate = rate
        pid = os.getpid()
        self.hub = f"{PREFIX}{pid}h{id(self) % 100000}"
        self.namespaces = [f"{PREFIX}{pid}n{id(self) % 100000}-{i}" for i in range(nodes)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(nodes)]
        self.processes: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._closed = False
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in [self.hub, *self.namespaces]:
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, (ns, address) in enumerate(zip(self.namespaces, self.addresses)):
            port = f"p{i}"
            _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.hub, "link", "set", port, "master", "br0")
            _ip("-n", self.hub, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            if self.rate is not None:
                _shape(ns, "eth0", self.rate)  # node -> LAN
                _shape(self.hub, port, self.rate)  # LAN -> node

    def command(self, node: int, cmd: Sequence[str]) -> list[str]:
        """``cmd`` as run inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[node], *cmd]

    def popen(self, node: int, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` in node ``node``; it is stopped when the LAN closes, if still running."""
        proc = subprocess.Popen(self.command(node, cmd), **kwargs)
        self.processes.append(proc)
        return proc

    def run(self, node: int, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(node, cmd), **kwargs)

    def close(self) -> None:
        """Stop the processes started in the LAN, then remove every namespace it made (their
        links and shaping go with them). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        atexit.unregister(self.close)

    def __enter__(self) -> Lan:
        self._previous_term = signal.getsignal(signal.SIGTERM)
        if self._previous_term in (signal.SIG_DFL, None):  # SIGTERM unwinds through close()
            signal.signal(signal.SIGTERM, _raise_exit)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            if signal.getsignal(signal.SIGTERM) is _raise_exit:
                signal.signal(signal.SIGTERM, self._previous_term or signal.SIG_DFL)


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


# -- measuring a link -------------------------------------------------------------------------------

_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""

_SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
block = b"x" * (1 << 20)
for _ in range(int(sys.argv[3])): c.sendall(block)
c.close()
"""


def tcp_rate(lan: Lan, sender: int, receiver: int, megabytes: int = 16, port: int = 5201) -> float:
    """Bits per second of one TCP stream from node ``sender`` to node ``receiver``."""
    sink = lan.popen(receiver, [sys.executable, "-c", _SINK, lan.addresses[receiver], str(port)],
                     stdout=subprocess.PIPE, text=True)
    if sink.stdout.readline().strip() != "ready":
        raise LanError("the TCP sink did not start")
    lan.run(sender, [sys.executable, "-c", _SOURCE, lan.addresses[receiver], str(port), str(megabytes)],
            check=True, timeout=600)
    n, seconds = sink.communicate(timeout=60)[0].split()
    return int(n) * 8 / float(seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"])
    p.add_argument("--megabytes", type=int, default=None, help="per measurement (default: 2 s at the rate)")
    args = p.parse_args(argv)
    try:
        for rate in args.rates:
            megabytes = args.megabytes or max(4, int(rate_bits(rate) * 2 / 8 / 1e6))
            t0 = time.perf_counter()
            with Lan(args.nodes, rate) as lan:
                built = time.perf_counter() - t0
                print(f"{args.nodes} nodes at {rate} (built in {built:.2f} s): {', '.join(lan.addresses)}")
                for i in range(1, args.nodes):
                    up = tcp_rate(lan, i, 0, megabytes)
                    down = tcp_rate(lan, 0, i, megabytes)
                    print(f"  node {i} -> node 0: {up / 1e6:.0f} Mbit/s TCP ({up / rate_bits(rate):.0%} of the link); "
                          f"node 0 -> node {i}: {down / 1e6:.0f} Mbit/s ({down / rate_bits(rate):.0%})")
        print(NO_DELAY_NOTE)
    except (LanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
