"""CurveZMQ key pairs of the nodes, and the lists of keys a node trusts.

A node's pair is two files in one folder, as pyzmq's certificate helpers write them (and read
them back): ``node.key`` holds the public key (give it to the other side), ``node.key_secret``
the public and the secret key (readable by its owner only; never leaves the machine). Keys are
Z85 text, 40 characters for 32 bytes. ``$DLLAMA_HOME/keys`` is every node's default folder.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import zmq
import zmq.auth

from dllama.errors import DllamaError

PUBLIC_FILE = "node.key"
SECRET_FILE = "node.key_secret"
KEY_CHARS = 40  # Z85 of 32 bytes
_Z85 = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


def default_key_dir() -> Path:
    return Path(os.environ.get("DLLAMA_HOME") or Path.home() / ".cache" / "dllama") / "keys"


def keygen(folder: Path) -> tuple[Path, Path]:
    """A new pair in ``folder`` (made if missing, owner-only): the public and the secret file.
    Refuses to replace a pair: nodes that trust its public key would be locked out."""
    public, secret = folder / PUBLIC_FILE, folder / SECRET_FILE
    for path in (public, secret):
        if path.exists():
            raise DllamaError(f"{path} exists: refusing to overwrite a key pair (remove it first, or --out elsewhere)")
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        public_key, secret_key = zmq.curve_keypair()
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        # The secret is created owner-only: it is never readable by others, not even for a moment.
        _write_new(secret, f"#   dllama node key pair, {stamp}: keep secret, never copy it elsewhere\n"
                           f"metadata\ncurve\n    public-key = \"{public_key.decode()}\"\n"
                           f"    secret-key = \"{secret_key.decode()}\"\n", 0o600)
        _write_new(public, f"#   dllama node public key, {stamp}: give it to the nodes that should trust this one\n"
                           f"metadata\ncurve\n    public-key = \"{public_key.decode()}\"\n", 0o644)
    except OSError as e:
        raise DllamaError(f"cannot write a key pair in {folder}: {e.strerror or e}") from None
    return public, secret


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)


def load_pair(folder: Path) -> tuple[bytes, bytes]:
    """(public, secret) of the pair in ``folder``; one line naming ``keygen`` when there is none."""
    secret_file = folder / SECRET_FILE
    if not secret_file.is_file():
        raise DllamaError(f"no key pair in {folder}: create one with `python -m dllama keygen"
                          + ("`" if folder == default_key_dir() else f" --out {folder}`"))
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as e:
        raise DllamaError(f"{secret_file}: not a key pair ({e})") from None
    if secret is None or not is_key(public) or not is_key(secret):
        raise DllamaError(f"{secret_file}: not a key pair (it needs a public-key and a secret-key line)")
    return public, secret


def is_key(key: bytes | str) -> bool:
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    return len(text) == KEY_CHARS and set(text) <= _Z85


def public_key(text: str) -> bytes:
    """A public key given on the command line: its 40 Z85 characters, or a ``node.key`` file."""
    if is_key(text):
        return text.encode()
    path = Path(text).expanduser()
    if path.is_file():
        try:
            key, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise DllamaError(f"{path}: not a public key file ({e})") from None
        if is_key(key):
            return key
    raise DllamaError(f"{text!r} is neither a public key (40 Z85 characters) nor a node.key file")


def authorized_keys(path: Path) -> frozenset[bytes]:
    """The public keys of ``path``: one per line, anything after it a comment, as are blank
    lines and those starting with ``#`` (that are not a key: Z85 uses ``#`` too)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DllamaError(f"--authorized-keys {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    keys = set()
    for number, line in enumerate(lines, start=1):
        words = line.split()
        if words and is_key(words[0]):  # Z85 has "#": a key may start with it
            keys.add(words[0].encode())
            continue
        if words and not words[0].startswith("#"):
            raise DllamaError(f"--authorized-keys {path}, line {number}: not a public key (40 Z85 characters)")
    if not keys:
        raise DllamaError(f"--authorized-keys {path}: no key in it (no root could connect)")
    return frozenset(keys)


def worker_spec(text: str) -> tuple[str, bytes | None]:
    """``HOST:PORT`` or ``HOST:PORT@KEY`` (KEY: the worker's public key, or its ``node.key``
    file) as the address and the key."""
    address, at, key = text.partition("@")  # Z85 has "@" too: the first one ends the address
    return address, (public_key(key) if at else None)


def worker_specs(texts: list[str], root_has_key: bool) -> list[tuple[str, bytes | None]]:
    """``worker_spec`` of each, all with keys when the root has a pair, else none."""
    specs = [worker_spec(t) for t in texts]
    for address, key in specs:
        if key is None and root_has_key:
            raise DllamaError(f"worker {address}: give its public key (HOST:PORT@KEY): this root has a key pair, "
                              f"so every link is encrypted")
        if key is not None and not root_has_key:
            raise DllamaError(f"worker {address} has a key, so this root needs a key pair too "
                              f"(--key DIR, or `python -m dllama keygen`)")
    return specs
