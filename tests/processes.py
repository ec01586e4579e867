"""Real dllama processes on 127.0.0.1 for the tests: free ports, `dllama worker` processes (which
can be killed, frozen and started again on their port) and `dllama api` servers, and the waits
on an API server's /health."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The environment of every process the tests start.
ENV = {**os.environ, "NUMBA_THREADING_LAYER": "omp"}
STARTUP_TIMEOUT = 120  # seconds for a worker to listen, or a server to print its URL
API_SEQ_LEN = 512  # the API servers' --max-seq-len
API_READY = "OpenAI-compatible API on http://"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """A `dllama worker` process (one thread) on a free port, or on ``port``, with ``extra``
    arguments; ready once it listens. It can be killed, frozen and started again on its port."""

    def __init__(self, tmp: Path, *extra: str, port: int | None = None, env: dict | None = None):
        self.tmp, self.extra, self.env = tmp, extra, env or ENV
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        """Start the process (again, after a kill: on the same port), with a fresh log."""
        self.log = self.tmp / f"worker-{self.port}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", str(self.port),
               "--nthreads", "1", *self.extra]
        with open(self.log, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        try:
            self.wait_for("Listening", timeout=STARTUP_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Until ``text`` stands ``count`` times in its log; fails if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, f"{text!r} not in worker output:\n{self.output()}"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL (a frozen one too), and wait until the process is gone (its port then refuses
        connections)."""
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:  # else poll() has reaped it
            self.kill()


@contextmanager
def workers_in(tmp: Path) -> Iterator[Callable[..., Worker]]:
    """``with workers_in(tmp) as start``: ``start(*extra, port=..., env=...)`` starts a Worker;
    every one started is stopped at the end (also when one fails to start)."""
    started: list[Worker] = []

    def start(*extra: str, **kw) -> Worker:
        started.append(Worker(tmp, *extra, **kw))
        return started[-1]
    try:
        yield start
    finally:
        for w in started:
            w.stop()


class Server:
    """A `dllama api` process (one thread, ``--max-seq-len API_SEQ_LEN``) on a free port, with
    ``extra`` arguments; ready once it prints its URL."""

    def __init__(self, tmp: Path, *extra: str):
        self.port = free_port()
        scheme = "https" if "--ssl-certfile" in extra else "http"
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        self.log = tmp / f"api-{self.port}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "dllama", "api", "--host", "127.0.0.1", "--port", str(self.port),
               "--nthreads", "1", "--max-seq-len", str(API_SEQ_LEN), *extra]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while API_READY.replace("http://", f"{scheme}://") not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the API server did not start:\n{self.output()}")
            time.sleep(0.05)
        self.model_id = re.search(r"\(model '([^']*)'\)", self.output()).group(1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def wait_health(http, condition, timeout: float, why: str) -> dict:
    """Poll an API server's /health (answered at once, also while the model generates) with the
    client ``http`` until ``condition``."""
    deadline = time.monotonic() + timeout
    while True:
        health = http.get("/health").json()
        if condition(health):
            return health
        assert time.monotonic() < deadline, f"{why}: {health}"
        time.sleep(0.02)


def wait_idle(http, timeout: float = 60) -> dict:
    return wait_health(http, lambda h: not h["busy"] and h["waiting"] == 0, timeout, "still busy")
