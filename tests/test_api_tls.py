"""The API over TLS with several keys: the real openai client, trusting a test CA, works with
any of the keys; a wrong key gets 401 in the OpenAI error shape; /health tells strangers the
status only; plain HTTP to the TLS port gets no answer; bad TLS flags are one line."""
from __future__ import annotations

import ssl
import subprocess
import sys

import httpx
import openai
import pytest

from tests.processes import ENV, ROOT, Server

TIMEOUT = 120


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, and a certificate for 127.0.0.1 that it signed (openssl)."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=d, check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=dllama test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return d


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("# the team\nsecond-key\n\nthird-key\n")
    s = Server(tmp_path_factory.mktemp("api"), "--ssl-certfile", str(pki / "server.pem"), "--ssl-keyfile",
               str(pki / "server.key"), "--api-key", "first-key", "--api-key-file", str(keys), "--parallel", "1")
    yield s
    s.stop()


def test_the_openai_client_over_tls_with_any_key(server, pki):
    assert server.base.startswith("https://")
    for key in ("first-key", "second-key", "third-key"):
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki / "ca.pem"))) as http, \
                openai.OpenAI(base_url=f"{server.base}/v1", api_key=key, max_retries=0, timeout=TIMEOUT,
                              http_client=http) as c:
            reply = c.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, temperature=0)
            assert reply.choices[0].message.content
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki / "ca.pem"))) as http, \
            openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT,
                          http_client=http) as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.models.list()
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


def test_health_tells_strangers_the_status_only(server, pki):
    with httpx.Client(base_url=server.base, verify=ssl.create_default_context(cafile=str(pki / "ca.pem")), timeout=TIMEOUT) as http:
        stranger = http.get("/health")
        assert stranger.status_code == 200 and stranger.json() == {"status": "ok"}
        member = http.get("/health", headers={"Authorization": "Bearer third-key"}).json()
        assert member["status"] == "ok" and member["nodes"] == 1 and "busy" in member
        page = http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
        httpx.get(server.base.replace("https://", "http://") + "/health", timeout=10)
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
        httpx.get(server.base + "/health", timeout=10)


@pytest.mark.parametrize("flags,message", [
    (["--ssl-certfile", "cert.pem"], "--ssl-certfile and --ssl-keyfile go together"),
    (["--ssl-certfile", "missing.pem", "--ssl-keyfile", "missing.key"], "--ssl-certfile/--ssl-keyfile: "),
    (["--api-key-file", "missing-keys"], "--api-key-file missing-keys: "),
    (["--api-key", "two words"], "an API key must be printable text without spaces"),
])
def test_bad_tls_and_key_flags_are_one_line(tmp_path, flags, message):
    flags = [str(tmp_path / f) if f.startswith("missing") or f.endswith(".pem") else f for f in flags]
    message = message.replace("missing-keys", str(tmp_path / "missing-keys"))
    out = subprocess.run([sys.executable, "-m", "dllama", "api", "--port", "1", *flags], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("error: " + message) and out.stderr.count("\n") == 1, \
        out.stderr
