"""dllama.commands.http_extras: the access log (in process, on a small Starlette app whose routes
fill ``request.state.usage_log`` as the generation handlers do), and a real `dllama api` on a
tiny random model: the chat page at / without a key, CORS with and without --cors-origin, one
log line per request, and a bad --cors-origin as a one-line error."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
import sys
import time

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

try:
    import httpx
except ImportError:  # some environments ship httpx's successor under this name
    import httpx2 as httpx

from dllama.commands.http_extras import AccessLog, OncePerMinute
from dllama.kernels.quants import FloatType
from tests.helpers import tiny_header, write_random_model, write_tiny_chat_tokenizer
from tests.processes import ENV, ROOT, Server

KEY = "extras-key"
ORIGIN = "http://allowed.example"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3}|-) "
                  r"in=(?P<tokens_in>\d+|-) out=(?P<tokens_out>\d+|-) (?P<seconds>\d+\.\d\d)s "
                  r"wait=(?P<wait>\d+\.\d\ds|-)(?P<cut> \(client left\)| \(unfinished\))?$")


# -- the access log, in process ---------------------------------------------------------------
async def generate(request):
    usage = request.state.usage_log
    usage["queue_seconds"] = 0.25
    usage["prompt_tokens"] = 27
    usage["completion_tokens"] = 64
    return JSONResponse({"ok": True})


async def stream(request):
    usage = request.state.usage_log

    async def body():
        usage["prompt_tokens"] = 5
        for i in range(3):
            await asyncio.sleep(0.05)
            yield f"data: {i}\n\n"
        usage["completion_tokens"] = 3  # known only once the stream is over

    return StreamingResponse(body(), media_type="text/event-stream")


async def plain(request):
    return JSONResponse({})


async def broken(request):
    raise RuntimeError("boom")


@pytest.fixture
def logged():
    """(client, lines): a small app behind the access log, and the lines it wrote."""
    lines: list[str] = []
    app = Starlette(routes=[Route("/gen", generate, methods=["POST"]), Route("/stream", stream),
                            Route("/plain{rest:path}", plain), Route("/broken", broken)],
                    middleware=[Middleware(AccessLog, say=lines.append)])
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, lines


def test_a_line_per_request_with_the_handlers_figures(logged):
    client, lines = logged
    assert client.post("/gen").status_code == 200
    assert client.get("/plain").status_code == 200
    assert client.get("/nowhere").status_code == 404
    assert len(lines) == 3, lines
    gen, plain_, missing = (LINE.match(line) for line in lines)
    assert gen and plain_ and missing, lines
    assert (gen["method"], gen["path"], gen["status"]) == ("POST", "/gen", "200")
    assert (gen["tokens_in"], gen["tokens_out"], gen["wait"]) == ("27", "64", "0.25s")
    # a route that records nothing: every figure is "-"
    assert (plain_["tokens_in"], plain_["tokens_out"], plain_["wait"]) == ("-", "-", "-")
    assert (missing["path"], missing["status"]) == ("/nowhere", "404")


def test_a_stream_is_logged_once_its_body_has_ended(logged):
    client, lines = logged
    with client.stream("GET", "/stream") as r:
        assert not lines  # nothing yet: the stream has only begun
        assert r.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    (line,) = lines
    m = LINE.match(line)
    assert m and m["tokens_in"] == "5" and m["tokens_out"] == "3" and not m["cut"], line
    assert float(m["seconds"]) >= 0.14  # the whole body's time


def test_a_failing_handler_logs_500(logged):
    client, lines = logged
    assert client.get("/broken").status_code == 500
    (line,) = lines
    assert LINE.match(line)["status"] == "500", line


def test_a_path_cannot_forge_a_log_line(logged):
    client, lines = logged
    client.get("/plain%0A2026-01-01%2000:00:00%20GET%20/forged%20200")
    (line,) = lines
    assert "\n" not in line and LINE.match(line), line
    assert LINE.match(line)["path"].startswith("/plain\\x0a2026")


def test_a_repeated_warning_passes_once_a_minute_and_counts_the_rest():
    now = [0.0]
    gate = OncePerMinute(clock=lambda: now[0])

    def passes(message: str) -> str | None:
        record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, message, None, None)
        return record.getMessage() if gate.filter(record) else None

    assert passes("Invalid HTTP request received.") == "Invalid HTTP request received."
    assert [passes("Invalid HTTP request received.") for _ in range(5)] == [None] * 5
    assert passes("another warning") == "another warning"  # each message on its own clock
    now[0] = 61.0
    assert passes("Invalid HTTP request received.") == \
        "Invalid HTTP request received. (5 more like it in the last minute)"
    assert passes("Invalid HTTP request received.") is None


# -- a real server on a tiny model --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random model with a chat template: answers in milliseconds, gibberish."""
    root = tmp_path_factory.mktemp("tiny")
    model, tokenizer = root / "tiny.m", root / "tiny.t"
    write_random_model(model, tiny_header(FloatType.F32, vocab_size=40, seq_len=256), scale=0.4)
    write_tiny_chat_tokenizer(tokenizer)
    return model, tokenizer


def tiny_server(tmp_path_factory, tiny_model, *extra: str) -> Server:
    model, tokenizer = tiny_model
    return Server(tmp_path_factory.mktemp("api"), "--model", str(model), "--tokenizer", str(tokenizer),
                  "--api-key", KEY, *extra)


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory, tiny_model):
    s = tiny_server(tmp_path_factory, tiny_model, "--cors-origin", ORIGIN, "--cors-origin", "http://other.example")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory, tiny_model):
    s = tiny_server(tmp_path_factory, tiny_model)
    yield s
    s.stop()


def preflight(base: str, origin: str):
    return httpx.options(f"{base}/v1/chat/completions", timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def log_lines(server: Server) -> list[re.Match]:
    return [m for line in server.output().splitlines() if (m := LINE.match(line))]


def new_lines(server: Server, before: int, count: int) -> list[re.Match]:
    """The log lines after the first ``before``, once there are ``count`` (a line is written as
    its reply ends, which the client may see a moment earlier)."""
    deadline = time.monotonic() + 10
    while len(lines := log_lines(server)[before:]) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines


def test_the_page_needs_no_key_and_the_api_still_does(plain_server):
    r = httpx.get(f"{plain_server.base}/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>dllama chat</title>" in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]  # loads nothing from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text)  # no CDN, no web fonts
    assert httpx.get(f"{plain_server.base}/v1/models", timeout=30).status_code == 401


def test_without_the_flag_no_cors_headers(plain_server):
    r = preflight(plain_server.base, ORIGIN)
    assert r.status_code == 405  # as before: OPTIONS is no route's method
    assert not any(h.startswith("access-control-") for h in r.headers)
    r = httpx.get(f"{plain_server.base}/health", headers={"Origin": ORIGIN}, timeout=30)
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)


def test_a_preflight_from_an_allowed_origin_is_answered(cors_server):
    for origin in (ORIGIN, "http://other.example"):
        r = preflight(cors_server.base, origin)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == origin
        assert "POST" in r.headers["access-control-allow-methods"]
        allowed = r.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
        assert "access-control-allow-credentials" not in r.headers  # bearer keys, no cookies


def test_a_preflight_from_another_origin_is_refused(cors_server):
    r = preflight(cors_server.base, "http://evil.example")
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers


def test_an_allowed_origin_can_read_replies_errors_included(cors_server):
    r = httpx.post(f"{cors_server.base}/v1/chat/completions", timeout=60, headers={
        "Origin": ORIGIN, "Authorization": f"Bearer {KEY}"},
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(f"{cors_server.base}/v1/models", headers={"Origin": ORIGIN}, timeout=30)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN  # the page sees why
    r = httpx.get(f"{cors_server.base}/v1/models", headers={"Origin": "http://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in r.headers


def test_the_log_has_a_line_per_request(plain_server):
    before = len(log_lines(plain_server))
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}
    plain = httpx.post(f"{plain_server.base}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert plain.status_code == 200, plain.text
    with httpx.stream("POST", f"{plain_server.base}/v1/chat/completions", headers=headers, timeout=60,
                      json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")
    assert httpx.get(f"{plain_server.base}/v1/models", timeout=30).status_code == 401
    lines = new_lines(plain_server, before, 3)
    # A stream's line comes once its response has closed, which may be after the client's next request.
    assert sorted((m["method"], m["path"], m["status"]) for m in lines) == [
        ("GET", "/v1/models", "401"), ("POST", "/v1/chat/completions", "200"),
        ("POST", "/v1/chat/completions", "200")], plain_server.output()
    models = next(m for m in lines if m["path"] == "/v1/models")
    assert models["tokens_in"] == "-" and models["wait"] == "-"


def test_garbage_from_a_stranger_is_logged_once_and_the_server_keeps_serving(plain_server):
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", plain_server.port), timeout=10) as raw:
            raw.sendall(b"\x16\x03\x01garbage" * 64)
            assert raw.recv(100).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{plain_server.base}/health", timeout=30).status_code == 200
    assert plain_server.output().count("Invalid HTTP request received.") == 1, plain_server.output()


def test_the_log_line_has_the_usage_figures(plain_server):
    """The generation handlers' figures (request.state.usage_log) reach the line."""
    before = len(log_lines(plain_server))
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}
    usages = [httpx.post(f"{plain_server.base}/v1/chat/completions", json=body, timeout=60,
                         headers=headers).json()["usage"]]
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{plain_server.base}/v1/chat/completions", json=streamed, headers=headers,
                      timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    usages.append(json.loads(events[-1][len("data: "):])["usage"])
    lines = new_lines(plain_server, before, 2)
    assert len(lines) == 2
    for line, usage in zip(lines, usages):
        assert (line["tokens_in"], line["tokens_out"]) == (str(usage["prompt_tokens"]),
                                                           str(usage["completion_tokens"])), line.string
        assert line["wait"] != "-" and not line["cut"], line.string


@pytest.mark.parametrize("origin", ["", "example.com", "http://example.com/", "https://example.com:443",
                                    "ftp://example.com"])
def test_a_bad_cors_origin_is_a_one_line_error(origin):
    r = subprocess.run([sys.executable, "-m", "dllama", "api", "--cors-origin", "http://fine.example",
                        "--cors-origin", origin], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cors-origin" in lines[0] and repr(origin) in lines[0], r.stderr
