"""The cluster with real worker processes on 127.0.0.1: identical results on 1..4 nodes,
uneven and weighted splits, the slice cache (also across plans), and failures (dead, frozen,
absent workers, strangers, garbage and stale epochs on a worker's port)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.utils.monitor

from dllama.engine.cluster import Cluster
from dllama.engine.sampler import Sampler
from dllama.engine.session import Outcome, Session, tokens_for_steps
from dllama.engine.tokenizer import Tokenizer
from dllama.formats.mfile import ModelFile
from dllama.kernels import nucleus
from dllama.kernels.quants import FloatType
from dllama.model.batch import Batch, Draw
from dllama.model.forward import Transformer
from dllama.model.slicing import node_cuts, plan_slices
from dllama.transport.links import HEARTBEAT_TIMEOUT
from dllama.transport.protocol import PROTOCOL_VERSION, pack, unpack
from dllama.transport.sync import DrawRow
from tests.helpers import PipeWatcher, tiny_header, write_random_model
from tests.processes import ROOT, Worker, free_port, workers_in
from tests.threaded_cluster import ThreadedCluster

PROMPT = "The capital of France is"
PARAGRAPH = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
             "after the engineer Gustave Eiffel, whose company designed and built the tower.")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with workers_in(tmp_path_factory.mktemp("workers")) as start:
        yield [start() for _ in range(3)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """6 heads on 2 KV heads (4 nodes replicate KV heads), 7 feed-forward blocks and 101
    vocabulary rows (no even split for 2, 3 or 4 nodes), Q40 weights; the SmolLM2 tokenizer
    is not needed: these tests feed token ids."""
    path = tmp_path_factory.mktemp("synthetic") / "m.m"
    h = tiny_header(FloatType.Q40, dim=128, hidden_dim=224, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=32,
                    vocab_size=101, seq_len=128)
    write_random_model(path, h, seed=7, scale=0.3)
    return path


def cluster_transformer(model: ModelFile, workers, split=None, buffer="f32", seq_len=128, timeout=10.0,
                        heartbeat=HEARTBEAT_TIMEOUT) -> Cluster:
    """A started cluster of the root and ``workers``: its ``transformer`` is the root's node."""
    buffer_type = FloatType.parse(buffer)
    cluster = Cluster(model, [w.address for w in workers], seq_len, buffer, timeout,
                      lambda share, sync: Transformer(share, seq_len=seq_len, buffer_type=buffer_type, sync=sync),
                      lambda message: None, split=split, heartbeat=heartbeat)
    cluster.start()
    return cluster


def greedy(transformer: Transformer, tokens: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens after ``tokens``, and the logits of every prompt position."""
    logits = transformer.forward(tokens, 0, all_logits=True)
    out, pos, last = [], len(tokens), logits[-1]
    for _ in range(n):
        token = int(np.argmax(last))
        out.append(token)
        last = transformer.forward([token], pos)
        pos += 1
    return out, logits


def scale_of(logits: np.ndarray) -> float:
    return float(np.abs(logits).max())


# float32 sums in another order (the o and w2 products are split by columns, then summed over
# nodes): measured differences are 1e-6 to 1e-5 of the logits' scale.
F32_TOLERANCE = 1e-4


def assert_cluster_equals_one_node(model: ModelFile, tokens: list[int], workers, n_tokens: int = 64,
                                   split=None, check_plan=None) -> None:
    """Greedy tokens and prompt logits of the cluster equal those of one node."""
    want_tokens, want = greedy(Transformer(model, seq_len=128), tokens, n_tokens)
    cluster = cluster_transformer(model, workers, split=split)
    try:
        if check_plan is not None:
            check_plan(cluster)
        got_tokens, got = greedy(cluster.transformer, tokens, n_tokens)
    finally:
        cluster.close()
    assert np.abs(got - want).max() <= F32_TOLERANCE * scale_of(want)
    assert got_tokens == want_tokens


@pytest.mark.parametrize("n_nodes", [2, 3, 4])
def test_synthetic_model_on_n_nodes_equals_one_node(synthetic, workers, n_nodes):
    def check_plan(cluster):
        if n_nodes == 4:  # more nodes than KV heads: query heads 2,2,1,1, groups cut in the middle
            assert [s.q_heads for s in cluster.plan] == [(0, 2), (2, 4), (4, 5), (5, 6)]
            assert [s.kv_heads for s in cluster.plan] == [(0, 1), (0, 2), (1, 2), (1, 2)]

    tokens = [3, 17, 42, 5, 5, 79, 0, 23, 61, 8, 11, 2]
    assert_cluster_equals_one_node(ModelFile(synthetic), tokens, workers[:n_nodes - 1], check_plan=check_plan)


@pytest.mark.parametrize("n_nodes", [2, 3, 4])
def test_smollm2_on_n_nodes_equals_one_node(smollm2, workers, n_nodes):
    tokens = Tokenizer.load(smollm2[1]).encode(PROMPT)
    assert_cluster_equals_one_node(ModelFile(smollm2[0]), tokens, workers[:n_nodes - 1])


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_converted_qwen3_on_real_workers_equals_one_node(tmp_path, workers, arch):
    """Qwen3 (q/k norms, NeoX rope, head dim apart from dim/heads) and Qwen3-MoE (experts sliced
    like the dense feed-forward) from a Hugging Face checkpoint, over ZeroMQ on 2 and 3 nodes."""
    from dllama.formats.hf_import import convert_hf
    from tests.hf_checkpoints import write_checkpoint

    write_checkpoint(tmp_path / "hf", arch, num_attention_heads=6, num_key_value_heads=3)
    model = ModelFile(convert_hf(tmp_path / "hf", tmp_path, FloatType.Q40, progress=False).model)
    tokens = [3, 17, 42, 5, 5, 79, 0, 23, 61, 8, 11, 2]
    for n_nodes in (2, 3):
        assert_cluster_equals_one_node(model, tokens, workers[:n_nodes - 1], n_tokens=16)


def test_split_gives_the_root_twice_the_rows(smollm2, workers):
    model = ModelFile(smollm2[0])
    h = model.header

    def check_plan(cluster):
        root, worker = cluster.plan
        assert root.hidden_dim == 2 * worker.hidden_dim == 2 * h.hidden_dim // 3
        assert root.vocab_size == 2 * h.vocab_size // 3
        hidden = cluster.transformer.node.hidden
        assert hidden[1] - hidden[0] == root.hidden_dim  # what it holds

    tokens = Tokenizer.load(smollm2[1]).encode(PROMPT)
    assert_cluster_equals_one_node(model, tokens, workers[:1], n_tokens=32, split=[2, 1], check_plan=check_plan)


def test_split_auto_gives_the_node_with_half_the_threads_less_work(tmp_path, smollm2):
    """--split auto: each worker measures its speed when it starts (2 threads stream Q40 weights
    faster than 1 on this machine) and reports it in the hello; the root plans by the speeds."""
    model = ModelFile(smollm2[0])
    logs: list[str] = []
    with workers_in(tmp_path) as start:
        slow = start()  # one thread
        fast = start("--nthreads", "2")
        cluster = Cluster(model, [slow.address, fast.address], 64, "f32", 10.0,
                          lambda share, sync: Transformer(share, seq_len=64, sync=sync), logs.append, split="auto")
        try:
            cluster.start()
            _, on_slow, on_fast = cluster.plan
            assert on_slow.vocab_size < on_fast.vocab_size and on_slow.hidden_dim < on_fast.hidden_dim, cluster.plan
            line = next(line for line in logs if line.startswith("💡 Split auto"))
            assert "expected at most" in line and "tokens/s" in line
            token = int(np.argmax(cluster.transformer.forward([1, 2, 3], 0)))
            assert 0 <= token < model.header.vocab_size
        finally:
            cluster.close()


# q80 sync: each part is rounded to Q80 blocks before the sum (as distributed-llama does): at
# most half a step, max|block| / 254, per value and sync (test_wire.py checks that bound). On
# SmolLM2, whose activations have large outliers, 60 such roundings move the logits by about
# 5 % (relative RMS) from one-node logits. What we check: the cluster computes exactly that
# (it equals an in-process simulation of Q80 parts summed in node order), and the drift from
# one node stays within 10 % RMS with the top token unchanged at 80 % of positions or more
# (measured: 5 % and 88 %).
def test_q80_sync_stays_within_its_bound(smollm2, workers):
    model = ModelFile(smollm2[0])
    tokens = Tokenizer.load(smollm2[1]).encode(PARAGRAPH)[:32]
    one = Transformer(model, seq_len=128, buffer_type=FloatType.Q80).forward(tokens, 0, all_logits=True)
    simulated = ThreadedCluster(model, [1, 1, 1], wire_q80=True, seq_len=128, buffer_type=FloatType.Q80)
    try:
        want = simulated.forward(tokens, 0, all_logits=True)
    finally:
        simulated.close()
    cluster = cluster_transformer(model, workers[:2], buffer="q80")
    try:
        got = cluster.transformer.forward(tokens, 0, all_logits=True)
    finally:
        cluster.close()
    assert np.abs(got - want).max() <= F32_TOLERANCE * scale_of(want)
    drift = got - one
    assert np.sqrt((drift ** 2).mean() / (one ** 2).mean()) <= 0.10
    assert (got.argmax(axis=1) == one.argmax(axis=1)).mean() >= 0.8


def test_worker_slice_cache_skips_the_transfer(tmp_path, synthetic):
    cache = tmp_path / "cache"
    w = Worker(tmp_path, "--cache-dir", str(cache))
    model = ModelFile(synthetic)
    h = model.header
    tokens = [1, 2, 3, 4]
    want = greedy(Transformer(model, seq_len=128), tokens, 8)[0]
    try:
        sent = []
        for source in ("root", "cache"):
            cluster = cluster_transformer(model, [w])
            (transfer,) = cluster.transfers
            assert (transfer.source, transfer.from_cache) == (source, source == "cache")
            sent.append(transfer.bytes_sent)
            assert greedy(cluster.transformer, tokens, 8)[0] == want
            cluster.close()
        assert sent[0] > 0 and sent[1] == 0
        # A corrupt entry is noticed and fetched again.
        (entry,) = [p for p in cache.iterdir() if p.is_dir()]
        data = bytearray((entry / "slice.bin").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (entry / "slice.bin").write_bytes(bytes(data))
        cluster = cluster_transformer(model, [w])
        assert (cluster.transfers[0].source, cluster.transfers[0].bytes_sent) == ("root", sent[0])
        assert greedy(cluster.transformer, tokens, 8)[0] == want
        cluster.close()
        # Another plan (the worker's share grows): the worker keeps what its cached slice holds
        # and the root sends exactly the bytes it lacks.
        old, new = plan_slices(h, [1, 1])[1], plan_slices(h, [1, 2])[1]
        assert new.hidden[0] < old.hidden[0] and new.vocab[0] < old.vocab[0]
        held = {c.name: c for c in node_cuts(h, old)}
        lacking = 0
        for c in node_cuts(h, new):
            o = held[c.name]
            common = max(0, min(c.hi, o.hi) - max(c.lo, o.lo))
            lacking += c.nbytes - common * (c.row_bytes if c.axis == 0 else c.rows)
        assert 0 < lacking < sent[0]
        cluster = cluster_transformer(model, [w], split=[1, 2])
        assert cluster.plan[1] == new
        (transfer,) = cluster.transfers
        assert (transfer.source, transfer.from_cache, transfer.bytes_sent) == ("cache+root", False, lacking)
        assert greedy(cluster.transformer, tokens, 8)[0] == want
        cluster.close()
    finally:
        w.stop()


# -- failures -----------------------------------------------------------------------------------
def run_root(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def root_cmd(smollm2, workers, steps=600, timeout=3, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dllama", "inference", "--model", str(smollm2[0]), "--tokenizer", str(smollm2[1]),
            "--prompt", "Once upon a time", "--steps", str(steps), "--temperature", "0.8", "--seed", "1",
            "--nthreads", "1", "--net-timeout", str(timeout), *extra, "--workers", *[w.address for w in workers]]


def generating(text: str) -> bool:
    """The root printed its prompt and then generated text (root_cmd's prompt)."""
    return text.startswith("Once upon a time") and len(text) > len("Once upon a time") + 10


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_with_on_worker_loss_fail_a_failing_worker_ends_the_root_within_the_heartbeat(tmp_path, smollm2, how):
    w = Worker(tmp_path)
    heartbeat = 2.0
    net_timeout = 60.0  # bounds set-up answers only: a forward waits on heartbeats, never on this
    root = None
    try:
        root = subprocess.Popen(root_cmd(smollm2, [w], 600, net_timeout, "--heartbeat-timeout", str(heartbeat),
                                         "--on-worker-loss", "fail"),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = PipeWatcher(root.stdout), PipeWatcher(root.stderr)
        out.wait_for(generating, timeout=120)  # tokens are flowing between root and worker
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        # Timed when the root says why it stops, not when its process is gone (exiting is not
        # part of noticing). A killed worker's connection drops at once; a frozen one's when
        # its heartbeats go unanswered for --heartbeat-timeout. A root that missed the failure
        # would wait forever (a frozen worker never replies), for TCP's own timeouts (minutes)
        # or for the net timeout: 8 s over the heartbeat timeout are a loaded machine's slack.
        # How --heartbeat-timeout becomes ZeroMQ's settings is checked exactly by
        # test_heartbeat_settings_fit_zeromq.
        seen = err.wait_for(lambda text: "error: worker" in text, timeout=net_timeout + 60)
        assert seen - t0 < heartbeat + 8.0, seen - t0
        assert root.wait(60) == 1
        err = err.join(60)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: worker 127.0.0.1:") and w.address in last, err
        assert "Traceback" not in err and "lost worker" not in err
        if how == "kill":
            w.stop()  # reaped: its port is free again
            w.start()  # on that port
        else:
            w.proc.send_signal(signal.SIGCONT)
            w.wait_for("waiting for a root", timeout=heartbeat + 20)
        result = run_root(root_cmd(smollm2, [w], steps=12))
        assert result.returncode == 0, result.stderr
    finally:
        if root is not None and root.poll() is None:
            root.kill()
            root.wait(10)
        w.stop()


@pytest.mark.timeout(300)
def test_an_absent_worker_fails_within_the_timeout(smollm2):
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    result = run_root(root_cmd(smollm2, [type("W", (), {"address": f"127.0.0.1:{port}"})], timeout=2))
    assert result.returncode == 1
    assert time.monotonic() - t0 < 60
    assert f"worker 127.0.0.1:{port} did not answer within 2 s" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("address", ["nonsense", "host:99999", "127.0.0.1:"])
def test_a_malformed_worker_address_is_one_line(smollm2, address):
    result = run_root(root_cmd(smollm2, [type("W", (), {"address": address})]))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: worker address {address!r} is not HOST:PORT"


def _config_for(model_path: Path, **changes) -> dict:
    """A real node configuration (node 1 of 2) of the model, with some fields changed."""
    from dllama.model.node import node_config

    m = ModelFile(model_path)
    config = node_config(m.header, plan_slices(m.header, [1, 1])[1], 64, "f32", "0" * 64, "1" * 64)
    config.update(changes)
    return config


def _hello(version=PROTOCOL_VERSION, root_port=1, **extra) -> list:
    return pack("hello", {"version": version, "epoch": 1, "index": 1, "n_nodes": 2, "net_timeout": 2.0,
                          "heartbeat": 2.0, "root_port": root_port, **extra})


@pytest.mark.timeout(300)
def test_garbage_and_strangers_do_not_hurt_a_worker(tmp_path, synthetic):
    w = Worker(tmp_path)
    ctx = zmq.Context()
    try:
        # Raw bytes that are not ZeroMQ at all.
        for payload in [b"GET / HTTP/1.1\r\n\r\n", os.urandom(5000), b"\xff" * 10 + b"\x00" * 100]:
            with socket.create_connection(("127.0.0.1", w.port)) as s:
                s.sendall(payload)
                time.sleep(0.05)

        def dealer():
            d = ctx.socket(zmq.DEALER)
            d.linger = 0
            d.connect(f"tcp://{w.address}")
            return d

        def exchange(d, frames):
            d.send_multipart(frames)
            assert d.poll(10000), f"no reply to {str(frames)[:200]}"
            return unpack(d.recv_multipart())

        # ZeroMQ peers breaking the protocol, each answered with an error: unknown kinds, bad or
        # deeply nested JSON, wrong order, too many frames, a wrong version.
        d = dealer()
        for frames in ([b"nonsense"], [b"hello", b"{not json"], [b"hello", b"[" * 100000], [b"forward", b"{}"],
                       [b"hello", b"[1]"], [b"hello", b"{}"] + [b"x"] * 50,
                       _hello(PROTOCOL_VERSION + 1), _hello(net_timeout=7000.0 * 1e9),
                       _hello(index=True), _hello(n_nodes=10**30), _hello(epoch=0), _hello(epoch=True),
                       _hello(epoch=2**32), _hello(epoch=None), _hello(heartbeat=None), _hello(heartbeat=0.01),
                       _hello(heartbeat=1e9)):
            kind, meta, _ = exchange(d, frames)
            assert kind == "error", meta
        assert f"protocol version {PROTOCOL_VERSION + 1}, this worker {PROTOCOL_VERSION}" in \
            exchange(d, _hello(PROTOCOL_VERSION + 1))[1]["message"]
        # Anyone may ping: the pong says whether the worker could start a session now.
        assert exchange(d, pack("ping")) == ("pong", {"idle": True}, [])
        # A stranger that says hello with a data port nobody listens on, then vanishes: the
        # worker gives up on it within the net timeout and serves the next root. Meanwhile it
        # is busy: a ping says so, and another root's hello is refused.
        kind, meta, _ = exchange(d, _hello(root_port=free_port()))
        assert kind == "hello" and meta["epoch"] == 1 and meta["memory"] > 0
        other = dealer()
        assert exchange(other, pack("ping"))[:2] == ("pong", {"idle": False})
        kind, meta, _ = exchange(other, _hello())
        assert kind == "error" and "busy" in meta["message"]
        other.close()
        d.close()
        w.wait_for("cannot reach the root's data port", timeout=10)
        # Configurations that would crash or exhaust a careless worker; each session ends with
        # an error reply. (A real data port so that the session lives long enough.) Stale
        # epochs and a newer hello: test_heal_transport.py.
        pub = ctx.socket(zmq.PUB)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        bad_configs = [
            _config_for(synthetic, seq_len=float("inf")),
            _config_for(synthetic, node={"index": 1, "n_nodes": 2, "q_heads": [3, 6], "kv_heads": [1, 2],
                                         "hidden": [100, 224], "vocab": [50, 101]}),  # not whole blocks
            _config_for(synthetic, node={"index": 1e400}),
            _config_for(synthetic, header="00"),
            _config_for(synthetic, seq_len=10**6),
        ]
        for config in bad_configs:
            d = dealer()
            assert exchange(d, _hello(root_port=port))[0] == "hello"
            kind, meta, _ = exchange(d, pack("config", {**config, "epoch": 1}))
            assert kind == "error", meta
            d.close()
        # Oversized frames drop the sender's connection: the sending end sees it close. (Its
        # monitor is attached before connecting, to see the connection come up first.)
        big = ctx.socket(zmq.DEALER)
        big.linger = 0
        events = big.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        big.connect(f"tcp://{w.address}")

        def next_event(timeout_s: float = 60) -> int:
            assert events.poll(timeout_s * 1000), "no connection event within the deadline"
            return zmq.utils.monitor.recv_monitor_message(events)["event"]

        assert next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        big.send_multipart([b"chunk", b"{}", b"\0" * (64 << 20)])
        assert next_event() == zmq.EVENT_DISCONNECTED
        big.disable_monitor()
        events.close()
        big.close()
        pub.close()
        assert w.proc.poll() is None
        assert "Traceback" not in w.output()
        # Still serving.
        cluster = cluster_transformer(ModelFile(synthetic), [w])
        greedy(cluster.transformer, [1, 2, 3], 4)
        cluster.close()
    finally:
        ctx.destroy(linger=0)  # every socket, also those a failed assertion left open
        w.stop()


def test_bad_cache_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_root([sys.executable, "-m", "dllama", "worker", "--cache-dir", str(tmp_path / "file" / "sub"),
                       "--port", str(free_port())])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot use --cache-dir {tmp_path / 'file' / 'sub'}")


def test_ipv6_worker_address(tmp_path, synthetic):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dllama", "worker", "--host", "::1", "--port", str(port),
                             "--nthreads", "1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        w = type("W", (), {"address": f"[::1]:{port}"})
        deadline = time.monotonic() + 60
        while True:  # the worker is up once it accepts a connection
            try:
                socket.create_connection(("::1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        model = ModelFile(synthetic)
        cluster = cluster_transformer(model, [w])
        got = greedy(cluster.transformer, [5, 6, 7], 8)[0]
        cluster.close()
        assert got == greedy(Transformer(model, seq_len=128), [5, 6, 7], 8)[0]
    finally:
        proc.kill()
        proc.wait()


def test_cli_cluster_run_prints_network_summary(smollm2, workers):
    result = run_root(root_cmd(smollm2, workers[:2], steps=16) + ["--verbose", "--split", "1", "2", "1"])
    assert result.returncode == 0, result.stderr
    assert "Network" in result.stdout and "nodes: 3" in result.stdout
    assert result.stderr.count("🔶") >= 8
    assert "Node 1 (127.0.0.1:" in result.stderr


def test_generation_with_workers_equals_one_node_text(smollm2, workers):
    model = ModelFile(smollm2[0])
    tokenizer = Tokenizer.load(smollm2[1])
    prompt = tokenizer.encode("Write a haiku about the sea.")
    texts = []
    for ws in ([], workers[:2]):
        if ws:
            cluster = cluster_transformer(model, ws, seq_len=256)
            session = Session(cluster.transformer, tokenizer, cluster=cluster)
        else:
            session = Session(Transformer(model, seq_len=256), tokenizer)
        try:
            texts.append(list(session.generate(prompt, Sampler(0.7, 0.9, 5), Outcome(),
                                               max_tokens=tokens_for_steps(len(prompt), 96, session.seq_len))))
        finally:
            session.close()
    assert texts[0] == texts[1]


def test_perplexity_with_workers_equals_one_node(smollm2, workers):
    cmd = [sys.executable, "-m", "dllama", "perplexity", "--model", str(smollm2[0]), "--tokenizer", str(smollm2[1]),
           "--prompt", PARAGRAPH, "--nthreads", "1"]
    alone = run_root(cmd)
    together = run_root(cmd + ["--workers", *[w.address for w in workers]])
    assert alone.returncode == 0 and together.returncode == 0, together.stderr
    assert alone.stdout == together.stdout  # four decimals of the same perplexity


@pytest.mark.timeout(300)
def test_a_worker_outlives_its_root(tmp_path, smollm2):
    w = Worker(tmp_path)
    try:
        root = subprocess.Popen(root_cmd(smollm2, [w]), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        PipeWatcher(root.stdout).wait_for(generating, timeout=120)  # killed mid-generation
        root.kill()
        root.wait()
        w.wait_for("session ended", timeout=10)
        w.wait_for("waiting for a root", timeout=10)
        result = run_root(root_cmd(smollm2, [w], steps=12))
        assert result.returncode == 0, result.stderr
    finally:
        w.stop()


# ZeroMQ sends a heartbeat's TTL in deciseconds in a 16-bit field: 6553.5 s at most. libzmq
# takes and reports it in milliseconds, rounded down to whole deciseconds.
ZMQ_MAX_TTL_MS = 0xFFFF * 100


@pytest.mark.parametrize("heartbeat, interval_ms, timeout_ms", [
    (0.01, 20, 80), (0.1, 20, 80), (0.1234, 24, 99), (2.0, 400, 1600), (2.5, 500, 2000), (10.0, 1000, 9000),
    (6553.5, 1000, 6552500), (6553.59, 1000, 6552500), (7000.0, 1000, 6552500), (86400.0, 1000, 6552500)])
def test_heartbeat_settings_fit_zeromq(heartbeat, interval_ms, timeout_ms):
    """A link pings every fifth of --heartbeat-timeout (every 20 ms to 1 s) and declares the peer
    dead when a ping goes unanswered for the rest of it, so a silent peer is noticed within the
    heartbeat timeout (at least 0.1 s, and at most what ZeroMQ's TTL field holds, instead of an
    error); it asks the peer to wait as long."""
    from dllama.transport.links import heartbeat_settings, new_socket

    assert heartbeat_settings(heartbeat) == (interval_ms, timeout_ms)
    assert interval_ms + timeout_ms == min(ZMQ_MAX_TTL_MS, max(100, int(heartbeat * 1000)))
    ctx = zmq.Context()
    try:
        for kind in (zmq.DEALER, zmq.ROUTER, zmq.PUB, zmq.SUB):
            sock = new_socket(ctx, kind, heartbeat, server=kind in (zmq.ROUTER, zmq.PUB))
            try:
                assert sock.getsockopt(zmq.HEARTBEAT_IVL) == interval_ms
                assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == timeout_ms
                ttl = sock.getsockopt(zmq.HEARTBEAT_TTL)
                assert ttl == timeout_ms // 100 * 100 and ttl <= ZMQ_MAX_TTL_MS
            finally:
                sock.close()
    finally:
        ctx.term()


def test_draws_from_worker_summaries_equal_draws_from_whole_rows(smollm2, workers):
    """Where a forward asks for draws, workers send summaries of their slices of the logits
    (``kernels.nucleus``), not the slices: the root receives far fewer bytes, and every draw
    equals the one from the whole row (fetched here in a second round to compare)."""
    model, tokenizer = ModelFile(smollm2[0]), Tokenizer.load(smollm2[1])
    cluster = cluster_transformer(model, workers[:2], seq_len=64)
    try:
        tr, sync = cluster.transformer, cluster.transformer._sync
        tokens, vocab = tokenizer.encode(PROMPT), tokenizer.vocab_size
        before = sync.stats().bytes_received
        whole = tr.forward_batch(tokens, Batch.run(len(tokens), 0))[0]
        full_bytes = sync.stats().bytes_received - before
        for temperature, topp in [(0.0, 0.9), (0.7, 0.9), (1.0, 1.0), (1.4, 0.5)]:
            before = sync.stats().bytes_received
            row = tr.forward_batch(tokens, Batch.run(len(tokens), 0, draw=Draw(temperature, topp, vocab)))[0]
            received = sync.stats().bytes_received - before
            assert isinstance(row, DrawRow)
            # Each worker's third of 49152 float32 logits does not travel; a summary does.
            assert full_bytes - received > 0.9 * 2 * (model.header.vocab_size // 3) * 4
            rounds = sync.second_rounds
            for coin in np.linspace(0, 0.999, 40):
                want = nucleus.draw_full(whole[:vocab], temperature, topp, float(coin))
                assert row.sample(temperature, topp, float(coin)) == want
            assert np.array_equal(row._whole(), whole)  # the second round brings the same row
            assert sync.second_rounds == rounds + 1  # once a row, whatever the draws from it
    finally:
        cluster.close()
