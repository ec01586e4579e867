"""Secure links: key pairs (`dllama keygen`), workers that serve only the roots of their
--authorized-keys over CurveZMQ, roots that connect only to workers proving the keys they were
given, a data plane that admits the nodes of the session only, and what crosses the wire."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllama.engine.tokenizer import Tokenizer
from dllama.errors import DllamaError
from dllama.formats.mfile import ModelFile
from dllama.model.forward import Transformer
from dllama.transport.keys import authorized_keys, load_pair, public_key, worker_spec
from dllama.transport.links import CurveSecurity
from dllama.transport.mesh import Mesh
from dllama.transport.protocol import KINDS, PROTOCOL_VERSION, pack, unpack
from dllama.transport.worker import HANDSHAKE_SECONDS
from dllama.transport.zap import DATA, Gatekeeper
from tests.processes import ENV, ROOT, free_port, workers_in

PROMPT = "The capital of France is"


def dllama(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllama", *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def make_key(folder: Path) -> str:
    out = dllama("keygen", "--out", str(folder))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def root(smollm2, workers, *extra: str) -> subprocess.CompletedProcess:
    return dllama("inference", "--model", str(smollm2[0]), "--tokenizer", str(smollm2[1]), "--prompt", PROMPT,
                  "--steps", "24", "--temperature", "0", "--nthreads", "1", "--net-timeout", "20", *extra,
                  "--workers", *workers)


def text_of(stdout: str) -> str:
    return stdout.split("\nEvaluation\n")[0]


def test_keygen_writes_an_owner_only_secret_and_never_overwrites(tmp_path):
    key = make_key(tmp_path / "k")
    public, secret = tmp_path / "k" / "node.key", tmp_path / "k" / "node.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert public_key(str(public)) == key.encode() == load_pair(tmp_path / "k")[0]
    again = dllama("keygen", "--out", str(tmp_path / "k"))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert again.stderr.count("\n") == 1 and public_key(str(public)) == key.encode()
    with pytest.raises(DllamaError, match="keygen --out"):
        load_pair(tmp_path / "none")


def test_authorized_keys_and_worker_specs_are_read_strictly(tmp_path):
    a, b = (zmq.curve_keypair()[0] for _ in range(2))
    f = tmp_path / "authorized"
    f.write_text(f"# roots\n\n{a.decode()} laptop\n{b.decode()}\n")
    assert authorized_keys(f) == {a, b}
    f.write_text(f"{a.decode()}\nnot-a-key\n")
    with pytest.raises(DllamaError, match="line 2: not a public key"):
        authorized_keys(f)
    f.write_text("# nobody\n")
    with pytest.raises(DllamaError, match="no key in it"):
        authorized_keys(f)
    assert worker_spec("10.0.0.2:9998") == ("10.0.0.2:9998", None)
    assert worker_spec(f"10.0.0.2:9998@{a.decode()}") == ("10.0.0.2:9998", a)
    with pytest.raises(DllamaError, match="neither a public key"):
        worker_spec("10.0.0.2:9998@short")


@pytest.mark.timeout(600)
def test_only_authorized_roots_are_served_and_the_text_is_the_plaintext_one(smollm2, tmp_path):
    worker_key = make_key(tmp_path / "w")
    make_key(tmp_path / "other-worker")
    root_key, stranger_key = make_key(tmp_path / "r"), make_key(tmp_path / "s")
    (tmp_path / "authorized").write_text(f"{root_key} the root\n")
    with workers_in(tmp_path) as start:
        plain = start()
        secure = start("--key", str(tmp_path / "w"), "--authorized-keys", str(tmp_path / "authorized"))
        expected = root(smollm2, [plain.address])
        assert expected.returncode == 0, expected.stderr

        ok = root(smollm2, [f"{secure.address}@{worker_key}"], "--key", str(tmp_path / "r"))
        assert ok.returncode == 0, ok.stderr
        assert text_of(ok.stdout) == text_of(expected.stdout)

        refused = root(smollm2, [f"{secure.address}@{worker_key}"], "--key", str(tmp_path / "s"))
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1] == (
            f"error: worker {secure.address} refused this root: its key is not in the worker's --authorized-keys")
        plaintext = root(smollm2, [secure.address])
        assert plaintext.returncode == 1 and "could not agree on a secure link" in plaintext.stderr
        impostor = root(smollm2, [f"{secure.address}@{tmp_path / 'other-worker' / 'node.key'}"],
                        "--key", str(tmp_path / "r"))
        assert impostor.returncode == 1 and "the key given for the worker is not its key" in impostor.stderr
        unkeyed = root(smollm2, [f"{secure.address}@{worker_key}", plain.address], "--key", str(tmp_path / "r"))
        assert unkeyed.returncode == 1 and f"worker {plain.address}: give its public key" in unkeyed.stderr
        no_pair = root(smollm2, [f"{secure.address}@{worker_key}"], "--key", str(tmp_path / "empty"))
        assert no_pair.returncode == 1 and no_pair.stderr == (
            f"error: no key pair in {tmp_path / 'empty'}: create one with `python -m dllama keygen --out "
            f"{tmp_path / 'empty'}`\n")

        again = root(smollm2, [f"{secure.address}@{worker_key}"], "--key", str(tmp_path / "r"))
        assert again.returncode == 0 and text_of(again.stdout) == text_of(expected.stdout)  # still serving
        refusals = {line for line in secure.output().splitlines() if "🔒 refused" in line}
        expected = {"🔒 refused 127.0.0.1: it does not speak CURVE (no keys, or not dllama)",
                    "🔒 refused 127.0.0.1: its key is not in --authorized-keys"}
        # A connection gone before the worker looked it up is named "?" (its events come late).
        assert expected <= refusals <= expected | {"🔒 refused ?: it does not speak CURVE (no keys, or not dllama)"}, \
            refusals
    assert stranger_key != root_key


def test_the_data_plane_admits_the_nodes_of_the_session_only():
    """A node's PUB: its session's nodes get its parts; a client with another key gets nothing."""
    ctx = zmq.Context()
    keys = [zmq.curve_keypair() for _ in range(3)]
    lines: list[str] = []
    gate = Gatekeeper(ctx, lines.append, {DATA: "not a node of this session"})
    node0 = Mesh(ctx, 0, 5.0, 5.0, 1, "127.0.0.1", CurveSecurity(*keys[0]))
    members = []
    try:
        gate.allow(DATA, [keys[1][0]])
        for public, secret in keys[1:]:
            sub = ctx.socket(zmq.SUB)
            sub.linger = 0
            members.append(sub)
            CurveSecurity(public, secret).client(sub, keys[0][0])
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(f"tcp://127.0.0.1:{node0.port}")
        deadline = time.monotonic() + 10
        got = [False, False]
        while time.monotonic() < deadline and not got[0]:
            node0.publish(1, 1, b"part")
            for i, sub in enumerate(members):
                while sub.poll(50):
                    got[i] = got[i] or sub.recv().endswith(b"part")
        assert got == [True, False]
        assert gate.refused >= 1 and lines == ["🔒 refused 127.0.0.1: not a node of this session"]
    finally:
        for sub in members:
            sub.close()
        node0.close()
        gate.close()
        ctx.term()


class LoopbackCapture:
    """Every packet on the loopback interface while it runs (AF_PACKET: needs root)."""

    def __init__(self):
        self.packets: list[bytes] = []
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.packets.append(self.sock.recv(1 << 17))
            except socket.timeout:
                continue

    def close(self) -> bytes:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        return b"\n".join(self.packets)


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing packets needs root")
@pytest.mark.timeout(600)
def test_an_encrypted_run_shows_no_activation_on_the_wire(smollm2, tmp_path):
    """The root's embedded input (a known activation) crosses loopback in the clear without
    keys, and nowhere with them; the ZMTP greetings name CURVE. (The prompt itself never
    travels: the root tokenizes and embeds it.)"""
    worker_key, root_key = make_key(tmp_path / "w"), make_key(tmp_path / "r")
    (tmp_path / "authorized").write_text(root_key + "\n")
    tokens = Tokenizer.load(smollm2[1]).encode(PROMPT)
    row = Transformer(ModelFile(smollm2[0]), seq_len=64).blocks.start(np.asarray(tokens))[2]
    needle = np.ascontiguousarray(row, dtype=np.float32).tobytes()
    captured = {}
    with workers_in(tmp_path) as start:
        plain = start()
        secure = start("--key", str(tmp_path / "w"), "--authorized-keys", str(tmp_path / "authorized"))
        for name, workers, extra in (("plain", [plain.address], ()),
                                     ("curve", [f"{secure.address}@{worker_key}"], ("--key", str(tmp_path / "r")))):
            capture = LoopbackCapture()
            try:
                out = root(smollm2, workers, *extra)
            finally:
                captured[name] = capture.close()
            assert out.returncode == 0, out.stderr
    assert needle in captured["plain"] and b"NULL\0" in captured["plain"]
    assert needle not in captured["curve"] and needle[:64] not in captured["curve"]
    assert b"CURVE\0" in captured["curve"] and b"NULL\0\0\0" not in captured["curve"]


@pytest.mark.timeout(300)
def test_a_stranger_asking_for_a_day_holds_a_worker_for_seconds(smollm2, tmp_path):
    """A hello asking for a net timeout and heartbeat of 86400 s whose data port never comes
    up: the worker gives up within its handshake limit (not a day) and serves the next root."""
    with workers_in(tmp_path) as start:
        w = start()
        ctx = zmq.Context()
        d = ctx.socket(zmq.DEALER)
        d.linger = 0
        try:
            d.connect(f"tcp://{w.address}")
            d.send_multipart(pack("hello", {"version": PROTOCOL_VERSION, "epoch": 1, "index": 1, "n_nodes": 2,
                                            "net_timeout": 86400.0, "heartbeat": 86400.0,
                                            "root_port": free_port()}))
            assert d.poll(10000) and unpack(d.recv_multipart())[0] == "hello"
            t0 = time.monotonic()
        finally:
            d.close()
            ctx.term()
        w.wait_for("cannot reach the root's data port", timeout=HANDSHAKE_SECONDS + 10)
        assert time.monotonic() - t0 < HANDSHAKE_SECONDS + 5
        ok = root(smollm2, [w.address])
        assert ok.returncode == 0, ok.stderr


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = SCALAR | st.lists(SCALAR, max_size=4) | st.dictionaries(st.text(max_size=8), SCALAR, max_size=4)
FIELDS = st.sampled_from(["version", "epoch", "index", "n_nodes", "net_timeout", "heartbeat", "root_port", "keys",
                          "fwd", "rows", "piece", "offset", "seq", "peers", "slots", "positions"])
META = st.dictionaries(FIELDS, JSON, max_size=6).map(lambda m: json.dumps(m).encode()) | st.binary(max_size=64)
FRAMES = st.tuples(st.sampled_from(sorted(KINDS)).map(str.encode) | st.binary(max_size=12), META,
                   st.lists(st.binary(max_size=256), max_size=2)).map(lambda t: [t[0], t[1], *t[2]])


@pytest.mark.timeout(600)
def test_fuzzed_messages_from_strangers_and_from_the_root_leave_the_worker_serving(smollm2, tmp_path):
    """Messages of every kind with made-up contents, from a client whose key is not authorized
    (its handshake fails: nothing arrives) and from the authorized root's key (each answered
    with an error, or nothing for a late stop): the worker keeps serving, its memory bounded."""
    worker_key, root_key = make_key(tmp_path / "w"), make_key(tmp_path / "r")
    (tmp_path / "authorized").write_text(root_key + "\n")
    root_pair = load_pair(tmp_path / "r")
    with workers_in(tmp_path) as start:
        w = start("--key", str(tmp_path / "w"), "--authorized-keys", str(tmp_path / "authorized"))
        ctx = zmq.Context()
        peers = {}
        for name, pair in (("stranger", zmq.curve_keypair()), ("root", root_pair)):
            d = ctx.socket(zmq.DEALER)
            d.linger = 0
            CurveSecurity(*pair).client(d, worker_key.encode())
            d.connect(f"tcp://{w.address}")
            peers[name] = d
        try:
            assert peers["root"].send_multipart(pack("ping")) is None and peers["root"].poll(10000)
            assert unpack(peers["root"].recv_multipart())[0] == "pong"
            before = _rss(w.proc.pid)

            @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
            @given(FRAMES, st.booleans())
            def send(frames, as_root):
                d = peers["root" if as_root else "stranger"]
                try:  # the stranger's DEALER never gets a peer (its handshake is refused): it cannot send
                    d.send_multipart(frames, flags=0 if as_root else zmq.NOBLOCK)
                except zmq.Again:
                    assert not as_root
                    return
                if as_root and d.poll(3000):
                    kind, meta, _ = unpack(d.recv_multipart())
                    assert kind in ("error", "pong", "hello"), (frames, kind, meta)
                    if kind == "hello":  # made-up fields that make a session: it ends within seconds
                        d.send_multipart(pack("stop", {"epoch": meta.get("epoch")}))
            send()
            assert not peers["stranger"].poll(500)  # never answered: its handshake was refused
            peers["root"].send_multipart(pack("ping"))
            assert peers["root"].poll(15000) and unpack(peers["root"].recv_multipart())[0] == "pong"
            assert _rss(w.proc.pid) - before < 32 << 20
        finally:
            for d in peers.values():
                d.close()
            ctx.term()
        ok = root(smollm2, [f"{w.address}@{worker_key}"], "--key", str(tmp_path / "r"))
        assert ok.returncode == 0, ok.stderr + w.output()[-2000:]
        assert w.proc.poll() is None


def test_a_refusal_that_stops_the_first_send_is_named(tmp_path):
    """The worker refused the handshake before the hello could even be queued (seen on a loaded
    machine): the send times out, and the root says why, not only that the worker takes nothing."""
    import struct

    from dllama.transport.root import RootLink, WorkerFailed, WorkerLink

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # connected to nothing: a send waits, then times out
    sock.sndtimeo, sock.linger = 100, 0
    inject, monitor = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    inject.bind("inproc://fake-monitor")
    monitor.connect("inproc://fake-monitor")
    inject.send_multipart([struct.pack("=hi", zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400), b"tcp://127.0.0.1:1"])
    poller = zmq.Poller()
    link = WorkerLink("127.0.0.1:1", "127.0.0.1", 1, sock, monitor, poller)
    session = RootLink(ctx, [link], 1, 1.0, 5.0)
    try:
        with pytest.raises(WorkerFailed, match="refused this root: its key is not in the worker's --authorized-keys"):
            session.send(link, "hello", {})
    finally:
        session.mesh.close()
        for s in (sock, inject, monitor):
            s.close(linger=0)
        ctx.term()
