"""SHA-256 of a file, the one checksum dllama computes over files (downloads, cached slices, models).

A leaf module (nothing else from dllama): anything may import it without pulling in NumPy.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Large reads: hashing runs at disk speed instead of paying a call per small block (models are GBs).
CHUNK_BYTES = 16 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of the file at ``path``, as 64 lower-case hex digits (read in ``CHUNK_BYTES`` pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def remembered_sha256(path: Path, memo_path: Path) -> str:
    """The SHA-256 of ``path``, remembered in ``memo_path`` per (path, size, mtime) so that a
    large model file is read once, not at every start."""
    from dllama.formats.atomic import write_bytes_atomic

    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    if isinstance(memo.get(key), str):
        return memo[key]
    memo[key] = sha256_file(path)
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(memo_path, json.dumps(memo).encode())
    except OSError:
        pass  # only a memo
    return memo[key]
