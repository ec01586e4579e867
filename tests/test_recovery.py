"""A cluster that heals, with real processes on 127.0.0.1 and the real SmolLM2: workers killed
(SIGKILL) or frozen (SIGSTOP) during the prompt or the decode, one after the other, or again and
again; the root goes on with the nodes left and gives the same greedy text as without the
fault, takes a worker back when it returns, and says so when the nodes left cannot hold the model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dllama.formats.mfile import ModelFile
from dllama.model.slicing import node_kv_bytes, node_weight_bytes, plan_slices
from tests.helpers import PipeWatcher
from tests.processes import ENV, ROOT, Worker, workers_in

SHORT = "The capital of France is"
# About 1100 tokens: its evaluation takes seconds, so that a fault lands inside it.
LONG = " ".join(["The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris."] * 55)


@pytest.fixture
def workers(tmp_path):
    """``workers(*extra, port=..., env=...)`` starts a worker; every one is stopped after the test."""
    with workers_in(tmp_path) as start:
        yield start


class Root:
    """``inference`` on a cluster, greedy, its stdout and stderr watched as they come."""

    def __init__(self, smollm2, tmp: Path, workers: list[Worker], prompt: str, steps: int, *extra: str):
        self.stats_path = tmp / f"stats-{time.monotonic_ns()}.json"
        cmd = [sys.executable, "-m", "dllama", "inference", "--model", str(smollm2[0]), "--tokenizer",
               str(smollm2[1]), "--prompt", prompt, "--steps", str(steps), "--temperature", "0", "--nthreads", "1",
               "--max-seq-len", "2048", "--stats-json", str(self.stats_path), *extra,
               "--workers", *[w.address for w in workers]]
        self.prompt = prompt
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = PipeWatcher(self.proc.stdout)
        self.err = PipeWatcher(self.proc.stderr)

    def generated(self, chars: int, timeout: float = 120) -> None:
        """Wait until ``chars`` characters of generated text came out."""
        self.out.wait_for(lambda t: len(t) >= len(self.prompt) + chars, timeout)

    def started(self, timeout: float = 120) -> None:
        """Wait until the cluster is up and the prompt's evaluation begins."""
        self.err.wait_for(lambda t: "💡 Kernels:" in t, timeout)

    def finish(self, timeout: float = 240) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout)
        return rc, self.out.join(10), self.err.join(10)

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def text_of(stdout: str) -> str:
    """The generated text (the summary after it has timings)."""
    return stdout.split("\nEvaluation\n")[0]


def run(smollm2, tmp: Path, ws: list[Worker], prompt: str, steps: int,
        fault: Callable[[Root], None] | None = None) -> tuple[Root, int, str, str]:
    """``prompt`` on the root and the workers ``ws``, ``fault(root)`` done while it runs (None: no
    fault): the root, its exit status, its stdout and its stderr."""
    root = Root(smollm2, tmp, ws, prompt, steps)
    try:
        if fault is not None:
            fault(root)
        return (root, *root.finish())
    finally:
        root.kill()


def lose_worker_0(smollm2, tmp: Path, ws: list[Worker], steps: int) -> tuple[Root, int, str, str]:
    """SHORT on the root and ``ws``, worker 0 killed once 40 characters of text are out."""
    def kill_worker_0(root: Root) -> None:
        root.generated(40)
        ws[0].kill()
    return run(smollm2, tmp, ws, SHORT, steps, kill_worker_0)


_baselines: dict = {}


def baseline(smollm2, tmp: Path, workers, prompt: str, steps: int) -> str:
    """The fault-free text on 3 nodes (computed once per prompt)."""
    if (prompt, steps) not in _baselines:
        ws = [workers(), workers()]
        _, rc, out, err = run(smollm2, tmp, ws, prompt, steps)
        assert rc == 0, err
        _baselines[(prompt, steps)] = text_of(out)
        for w in ws:
            w.stop()
    return _baselines[(prompt, steps)]


def changes(root: Root) -> list[dict]:
    return root.stats()["network"]["changes"]


def faulted_run(smollm2, tmp, workers, prompt, steps, fault: str, during: str):
    """A 3-node run where worker 2 gets ``fault`` (kill or freeze) during the prompt or the decode."""
    expected = baseline(smollm2, tmp, workers, prompt, steps)
    ws = [workers(), workers()]

    def fault_worker_2(root: Root) -> None:
        if during == "prompt":
            root.started()
            time.sleep(1.0)
        else:
            root.generated(60)
        root.fault_unix = time.time()
        if fault == "kill":
            ws[1].kill()
        else:
            ws[1].proc.send_signal(signal.SIGSTOP)
            root.err.wait_for(lambda t: "lost worker" in t, 60)
            ws[1].proc.send_signal(signal.SIGCONT)
    root, rc, out, err = run(smollm2, tmp, ws, prompt, steps, fault_worker_2)
    assert rc == 0, err
    assert text_of(out) == expected
    lost = [line for line in err.splitlines() if "lost worker" in line]
    assert len(lost) == 1 and ws[1].address in lost[0] and "continuing on 2 nodes" in lost[0], err
    return root, ws, err


@pytest.mark.timeout(400)
@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_worker_lost_during_the_prompt(smollm2, tmp_path, workers, fault):
    root, ws, err = faulted_run(smollm2, tmp_path, workers, LONG, 1200, fault, "prompt")
    first = changes(root)[0]
    prompt_tokens = root.stats()["prompt_tokens"]
    assert first["kind"] == "lost" and first["workers"] == [ws[1].address]
    assert 0 < first["replayed_tokens"] < prompt_tokens  # it happened inside the prompt
    why = "its process is gone" if fault == "kill" else "stopped answering heartbeats"
    assert why in first["reason"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_worker_lost_during_the_decode(smollm2, tmp_path, workers, fault):
    root, ws, err = faulted_run(smollm2, tmp_path, workers, SHORT, 400, fault, "decode")
    stats = root.stats()
    first = changes(root)[0]
    assert first["replayed_tokens"] > stats["prompt_tokens"]
    if fault == "freeze":
        # The frozen worker, resumed, left the session it was in (the cluster had moved on to a
        # new epoch) and was taken back at a later forward, into yet another epoch.
        assert "✅ worker " + ws[1].address + " rejoined: 3 nodes" in err
        assert [c["kind"] for c in changes(root)] == ["lost", "rejoined"]
        log = ws[1].output()
        assert "(epoch 1)" in log and "session ended" in log and "(epoch 3)" in log
        assert stats["network"]["nodes"] == 3
    # A kill is seen at once; a freeze by heartbeats within the default 2.5 s (not the 10 s
    # --net-timeout), with a little room for a busy machine.
    detection = first["noticed_unix"] - root.fault_unix
    assert detection < (1.0 if fault == "kill" else 3.5), detection


@pytest.mark.timeout(400)
def test_both_workers_lost_one_after_the_other(smollm2, tmp_path, workers):
    expected = baseline(smollm2, tmp_path, workers, SHORT, 400)
    ws = [workers(), workers()]

    def kill_both(root: Root) -> None:
        root.generated(60)
        ws[0].kill()
        root.err.wait_for(lambda t: "lost worker" in t, 60)
        root.generated(300)
        ws[1].kill()
    root, rc, out, err = run(smollm2, tmp_path, ws, SHORT, 400, kill_both)
    assert rc == 0, err
    assert text_of(out) == expected
    assert "continuing on 2 nodes" in err and "continuing on 1 node," in err
    assert root.stats()["network"]["nodes"] == 1


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _stopped_after(smollm2, tmp: Path, ws: list[Worker], steps: int, until: Callable[[Root], None]) -> tuple[str, str]:
    """SHORT on the root and ``ws`` for up to ``steps`` tokens, killed once ``until(root)``
    returns: the text generated so far (its last characters dropped: a kill can cut a
    character's bytes) and stderr."""
    root = Root(smollm2, tmp, ws, SHORT, steps)
    try:
        until(root)
    finally:
        root.kill()
    return root.out.join(10)[:-8], root.err.join(10)


@pytest.mark.timeout(600)
def test_a_flapping_worker_changes_nothing_and_leaks_nothing(smollm2, tmp_path, workers):
    """Three kill and rejoin cycles of one worker; the run stops when they are done (a few
    hundred tokens on 2 nodes each), and its text is compared with a fault-free run stopped
    at the same length."""
    ws = [workers(), workers()]
    fds, rss = [], []

    def flap(root: Root) -> None:
        root.generated(40)
        for cycle in range(1, 4):
            ws[1].kill()
            root.err.wait_for(lambda t, c=cycle: t.count("lost worker") >= c, 60)
            ws[1].start()
            root.err.wait_for(lambda t, c=cycle: t.count("rejoined: 3 nodes") >= c, 120)
            time.sleep(0.3)
            fds.append(_fds(root.proc.pid))
            rss.append(_rss(root.proc.pid))
        root.generated(len(root.out.text) - len(root.prompt) + 40)  # and on 3 nodes again
    text, err = _stopped_after(smollm2, tmp_path, ws, 1600, flap)
    events = [line for line in err.splitlines() if "lost worker" in line or "rejoined: 3 nodes" in line]
    assert ["lost" if "lost worker" in line else "rejoined" for line in events] == ["lost", "rejoined"] * 3, err
    for w in ws:
        w.stop()
    clean = [workers(), workers()]
    expected, _ = _stopped_after(smollm2, tmp_path, clean, 1600, lambda root: root.out.wait_for(
        lambda t: len(t) >= len(text) + 8, 240))
    assert expected.startswith(text), "the text changed; faults came at tokens: see stderr\n" + err
    # Sockets and memory of the root: the same after the third cycle as after the first.
    assert fds[2] <= fds[0], fds
    assert rss[2] - rss[0] < 32 << 20, rss


@pytest.mark.timeout(300)
def test_nodes_left_too_small_for_the_model_fail_in_one_line(smollm2, tmp_path, workers):
    h = ModelFile(Path(smollm2[0])).header.with_seq_len(2048)
    three, two = plan_slices(h, [1.0] * 3), plan_slices(h, [1.0] * 2)
    need3 = node_weight_bytes(h, three[2]) + node_kv_bytes(h, three[2], 2048)
    need2 = node_weight_bytes(h, two[1]) + node_kv_bytes(h, two[1], 2048)
    assert need3 < need2
    small = {**ENV, "DLLAMA_MEMORY_BYTES": str((need3 + need2) // 2)}  # holds a third, not a half
    ws = [workers(), workers(env=small)]
    _, rc, _, err = lose_worker_0(smollm2, tmp_path, ws, 400)
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the 2 nodes left cannot hold the model") and ws[1].address in last, err
    assert "Traceback" not in err


@pytest.mark.timeout(300)
def test_workers_with_the_model_file_get_no_weights(smollm2, tmp_path, workers):
    """`worker --model`: the root sends the plan and the model's digest, never its weights, also
    when it plans again after a loss."""
    ws = [workers("--model", str(smollm2[0])), workers("--model", str(Path(smollm2[0]).parent))]
    root, rc, out, err = lose_worker_0(smollm2, tmp_path, ws, 300)
    assert rc == 0, err
    weights = root.stats()["network"]["weights"]
    assert [(w["address"], w["source"], w["bytes_sent"]) for w in weights] == [(ws[1].address, "local", 0)]
    assert "cut from its own model file" in err
    assert text_of(out) == baseline(smollm2, tmp_path, workers, SHORT, 300)


@pytest.mark.timeout(300)
def test_a_slice_cache_keeps_what_still_fits(smollm2, tmp_path, workers):
    """A worker with a slice cache only: after a loss it receives what its cached slices miss."""
    h = ModelFile(Path(smollm2[0])).header
    cache = tmp_path / "cache"
    ws = [workers(), workers("--cache-dir", str(cache))]
    root, rc, out, err = lose_worker_0(smollm2, tmp_path, ws, 300)
    assert rc == 0, err
    [w] = root.stats()["network"]["weights"]
    full = node_weight_bytes(h, plan_slices(h, [1.0, 1.0])[1])
    assert w["source"] == "cache+root" and 0 < w["bytes_sent"] < full, w
    assert text_of(out) == baseline(smollm2, tmp_path, workers, SHORT, 300)


@pytest.mark.timeout(300)
def test_perplexity_goes_on_through_a_lost_worker(smollm2, tmp_path, workers):
    def perplexity(ws: list[Worker], fault: bool) -> float:
        cmd = [sys.executable, "-m", "dllama", "perplexity", "--model", str(smollm2[0]), "--tokenizer",
               str(smollm2[1]), "--prompt", LONG, "--nthreads", "1", "--max-seq-len", "2048",
               "--workers", *[w.address for w in ws]]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = PipeWatcher(proc.stdout), PipeWatcher(proc.stderr)
        try:
            if fault:
                err.wait_for(lambda t: "💡 Kernels:" in t, 120)
                time.sleep(1.0)  # inside the evaluation of ~1100 tokens
                assert proc.poll() is None
                ws[1].kill()
            assert proc.wait(240) == 0, err.join(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        if fault:
            assert "lost worker " + ws[1].address in err.join(10)
        return float(out.join(10).split("perplexity:")[1])

    clean = perplexity([workers(), workers()], fault=False)
    assert perplexity([workers(), workers()], fault=True) == pytest.approx(clean, rel=1e-4)


@pytest.mark.timeout(300)
def test_a_worker_lost_in_a_second_round_costs_a_pause(smollm2, workers):
    """A worker killed while the root fetches a row of logits whole (a draw its summaries could
    not decide): the cluster goes on with the nodes left, evaluates the row again, and the draw
    is the one the row gives without the fault."""
    from dllama.engine.cluster import Cluster
    from dllama.engine.session import Session
    from dllama.engine.tokenizer import Tokenizer
    from dllama.model.batch import Batch, Draw
    from dllama.model.forward import Transformer
    from dllama.transport.sync import DrawRow

    model, tokenizer = ModelFile(smollm2[0]), Tokenizer.load(smollm2[1])
    ws = [workers(), workers()]
    cluster = Cluster(model, [w.address for w in ws], 64, "f32", 10.0,
                      lambda share, sync: Transformer(share, seq_len=64, sync=sync), lambda message: None)
    cluster.start()
    session = Session(cluster.transformer, tokenizer, cluster=cluster)
    try:
        tokens, vocab = tokenizer.encode(SHORT), tokenizer.vocab_size
        draw = Batch.run(len(tokens), 0, draw=Draw(0.8, 0.9, vocab))
        # Without the fault: the row, fetched whole (other settings than the summaries' force it).
        session.rewind(0)
        whole = session.run(tokens, draw)[0]
        assert isinstance(whole, DrawRow)
        coins = [float(c) for c in np.linspace(0, 0.999, 25)]
        expected = [whole.sample(1.0, 1.0, c) for c in coins]
        # Again, with worker 2 killed as the second round starts.
        session.rewind(0)
        row = session.run(tokens, draw)[0]
        link = cluster.transformer._sync.link
        fetch = link.rows

        def rows_after_a_kill(fwd, wanted):
            ws[1].kill()
            return fetch(fwd, wanted)

        link.rows = rows_after_a_kill
        assert [row.sample(1.0, 1.0, c) for c in coins] == expected
        assert len(cluster.up) == 1 and cluster.transformer is session.transformer
        assert np.allclose(row._whole(), whole._whole(), rtol=1e-4, atol=1e-3)
        # The generation goes on: the next position on the 2 nodes left.
        nxt = session.run([expected[0]], Batch.run(1, len(tokens)))
        assert np.argmax(nxt[0][:vocab]) == np.argmax(Transformer(model, seq_len=64).forward(
            tokens + [expected[0]], 0)[:vocab])
    finally:
        session.close()
