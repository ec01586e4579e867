"""The transport's part in healing: epochs (stale messages and frames are refused), a new
session that ends the current one, pings, the root's abort, and heartbeats that tell a slow
peer (kept) from a dead one."""
from __future__ import annotations

import threading
import time

import pytest
import zmq

from dllama.transport.links import heartbeat_settings, new_socket
from dllama.transport.mesh import HEADER, Abandoned, Mesh, PeerFailed
from dllama.transport.protocol import PROTOCOL_VERSION, ProtocolError, data_frame, pack, unpack
from tests.processes import Worker


def _mesh_pair(ctx, heartbeat: float, epoch: int = 3) -> tuple[Mesh, Mesh]:
    """Nodes 0 and 1, joined; the net timeout (for the handshake only) is 1 s."""
    a = Mesh(ctx, 0, 1.0, heartbeat, epoch, "127.0.0.1")
    b = Mesh(ctx, 1, 1.0, heartbeat, epoch, "127.0.0.1")
    a.connect({1: f"tcp://127.0.0.1:{b.port}"})
    b.connect({0: f"tcp://127.0.0.1:{a.port}"})
    # Each keeps saying hello until both have heard the other (a subscription comes up late).
    heard = {0: threading.Event(), 1: threading.Event()}

    def done(me: int):
        def is_done(seen: set[int]) -> bool:
            if seen:
                heard[me].set()
            return heard[0].is_set() and heard[1].is_set()
        return is_done
    other = threading.Thread(target=b.handshake, args=(done(1),))
    other.start()
    a.handshake(done(0))
    other.join()
    return a, b


def test_a_slow_peer_is_waited_for_however_long_it_takes():
    """Heartbeats of 0.3 s, a net timeout of 1 s, a part that comes after 2 s: the gather waits;
    a slow peer is not a dead one."""
    ctx = zmq.Context()
    a, b = _mesh_pair(ctx, heartbeat=0.3)
    try:
        timer = threading.Timer(2.0, lambda: b.publish(1, 1, b"late"))
        timer.start()
        t0 = time.monotonic()
        parts = a.gather(1, 1, [1])
        assert bytes(parts[1]) == b"late" and time.monotonic() - t0 >= 1.9
        timer.join()
    finally:
        a.close(), b.close()
        ctx.term()


def test_frames_of_another_epoch_are_dropped_and_the_abort_ends_a_gather():
    ctx = zmq.Context()
    a, b = _mesh_pair(ctx, heartbeat=2.0, epoch=3)
    try:
        # Node 1's PUB, speaking for an old session (epoch 2) and then for the current one.
        b.pub.send(data_frame(2, 1, 1, 1, b"stale"))
        b.publish(1, 1, b"fresh")
        assert bytes(a.gather(1, 1, [1])[1]) == b"fresh"
        assert a.stale == 1
        a.abort()  # the root (node 0) gives the session up: node 1 leaves the forward it waits in
        with pytest.raises(Abandoned):
            b.gather(1, 2, [0])
    finally:
        a.close(), b.close()
        ctx.term()


def test_a_closed_peer_fails_the_gather_at_once():
    ctx = zmq.Context()
    a, b = _mesh_pair(ctx, heartbeat=2.0)
    try:
        b.close()
        t0 = time.monotonic()
        with pytest.raises(PeerFailed) as e:
            a.gather(1, 1, [1])
        assert e.value.nodes == [1] and time.monotonic() - t0 < 1.5
    finally:
        a.close()
        ctx.term()


@pytest.mark.parametrize("heartbeat, interval, timeout", [(2.5, 500, 2000), (0.1, 20, 80), (1e9, 1000, 6_552_500)])
def test_heartbeat_settings_notice_a_silent_peer_within_the_heartbeat(heartbeat, interval, timeout):
    assert heartbeat_settings(heartbeat) == (interval, timeout)
    ctx = zmq.Context()
    sock = new_socket(ctx, zmq.DEALER, heartbeat, server=False)
    try:
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == interval
        assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == timeout
    finally:
        sock.close()
        ctx.term()


def _hello(epoch: int, root_port: int) -> list:
    return pack("hello", {"version": PROTOCOL_VERSION, "epoch": epoch, "index": 1, "n_nodes": 2,
                          "net_timeout": 5.0, "heartbeat": 2.5, "root_port": root_port})


@pytest.mark.timeout(120)
def test_a_worker_refuses_stale_epochs_and_follows_a_newer_hello(tmp_path):
    w = Worker(tmp_path)
    ctx = zmq.Context()
    root = ctx.socket(zmq.DEALER)
    stranger = ctx.socket(zmq.DEALER)
    pub = ctx.socket(zmq.PUB)  # the root's data port, so that the session stays up
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        for s in (root, stranger):
            s.linger = 0
            s.connect(f"tcp://{w.address}")

        def ask(sock, frames, timeout_ms=10_000):
            sock.send_multipart(frames)
            assert sock.poll(timeout_ms), "no answer"
            return unpack(sock.recv_multipart())

        kind, meta, _ = ask(stranger, pack("ping"))
        assert (kind, meta.get("idle")) == ("pong", True)
        kind, meta, _ = ask(root, _hello(5, port))
        assert (kind, meta["epoch"]) == ("hello", 5) and meta["memory"] > 0
        kind, meta, _ = ask(stranger, pack("ping"))
        assert (kind, meta.get("idle")) == ("pong", False)  # in a session now
        # A message of an older epoch is refused without an answer; the session goes on.
        root.send_multipart(pack("config", {"epoch": 4}))
        assert not root.poll(500)
        # A hello of a newer epoch from the same root ends the session and starts the next one.
        kind, meta, _ = ask(root, _hello(6, port))
        assert (kind, meta["epoch"]) == ("hello", 6)
        w.wait_for("(epoch 6)")
        assert "session ended: the root planned the cluster again" in w.output()
        kind, meta, _ = ask(stranger, pack("hello", {"version": PROTOCOL_VERSION, "epoch": 1}))
        assert kind == "error" and "busy" in meta["message"]
    finally:
        for s in (root, stranger, pub):
            s.close(linger=0)
        ctx.term()
        w.stop()


def test_parts_land_in_place_in_node_order_and_misfits_are_refused():
    """``gather_parts``: each node's part in a row of ``frames`` (its own in row 0), parts of a
    later step kept until asked for, and a part of the wrong size, or larger than any row,
    refused by name instead of read short or past its end."""
    ctx = zmq.Context()
    a, b = _mesh_pair(ctx, heartbeat=2.0)
    try:
        b.publish(1, 2, b"L" * 64)  # a step ahead of the one a gathers first
        b.publish(1, 1, b"N" * 64)
        for step, fill in ((1, b"N"), (2, b"L")):
            a.own_part(64)[:] = 7
            a.publish_part(1, step, 64)
            order = a.gather_parts(1, step, 64)
            assert order[0] == 0 and bytes(a.frames[order[1], HEADER:HEADER + 64]) == fill * 64
            assert bytes(b.gather(1, step, [0])[0]) == bytes([7]) * 64
        b.publish(1, 3, b"s" * 32)
        with pytest.raises(ProtocolError, match="node 1 sent a part of 32 bytes for 64"):
            a.gather_parts(1, 3, 64)
        b.publish(1, 4, b"x" * (a.frames.shape[1] + 10))
        with pytest.raises(ProtocolError, match="node 1 sent a frame of .* bytes, more than"):
            a.gather_parts(1, 4, 64)
    finally:
        a.close(), b.close()
        ctx.term()
