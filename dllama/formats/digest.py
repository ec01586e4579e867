"""SHA-256 of a file, the one checksum dllama computes over files (downloads, cached slices, models).

A leaf module (nothing else from dllama): anything may import it without pulling in NumPy.
"""
from __future__ import annotations

import hashlib
import os

# Large reads: hashing runs at disk speed instead of paying a call per small block (models are GBs).
CHUNK_BYTES = 16 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of the file at ``path``, as 64 lower-case hex digits (read in ``CHUNK_BYTES`` pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
