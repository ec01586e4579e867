"""A worker's slices on disk, so that a restarted root sends configuration only.

One directory per key (a digest of the model and the slice plan, chosen by the root):
``slice.bin`` holds the tensors back to back, ``meta.json`` their names, sizes and the
SHA-256 of ``slice.bin``. ``meta.json`` is written last, atomically, so an entry without it is
partial; an entry whose bytes do not match its digest is corrupt. Both are removed and the
slices fetched again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from dllama.errors import DllamaError
from dllama.formats.digest import sha256_file

_KEY = re.compile(r"[0-9a-f]{64}")


class SliceCache:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise DllamaError(f"cannot use --cache-dir {directory}: {e.strerror or e}") from None

    def _entry(self, key: str) -> Path | None:
        return self.dir / key if _KEY.fullmatch(key) else None

    def load(self, key: str, specs: list[tuple[str, int]]) -> dict[str, np.ndarray] | None:
        """The tensors of entry ``key`` (memory-mapped bytes), or None when it is absent,
        partial, corrupt or holds other tensors than ``specs`` (name, bytes)."""
        entry = self._entry(key)
        if entry is None or not entry.is_dir():
            return None
        data = entry / "slice.bin"
        try:
            meta = json.loads((entry / "meta.json").read_text())
            if meta.get("tensors") != [list(s) for s in specs]:
                return None  # another layout under this key: not ours to judge, leave it
            valid = data.stat().st_size == sum(n for _, n in specs) and meta.get("sha256") == sha256_file(data)
        except (OSError, ValueError, AttributeError):
            valid = False
        if not valid:  # partial or corrupt
            shutil.rmtree(entry, ignore_errors=True)
            return None
        raw = np.memmap(data, dtype=np.uint8, mode="r") if data.stat().st_size else np.zeros(0, np.uint8)
        out, offset = {}, 0
        for name, nbytes in specs:
            out[name] = raw[offset:offset + nbytes]
            offset += nbytes
        return out

    def store(self, key: str, specs: list[tuple[str, int]], tensors: dict[str, np.ndarray]) -> None:
        entry = self._entry(key)
        if entry is None:
            return
        shutil.rmtree(entry, ignore_errors=True)
        entry.mkdir(parents=True)
        h = hashlib.sha256()
        with open(entry / "slice.bin", "wb") as f:
            for name, _ in specs:
                buf = memoryview(np.ascontiguousarray(tensors[name])).cast("B")
                h.update(buf)
                f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        tmp = entry / "meta.json.tmp"
        tmp.write_text(json.dumps({"tensors": [list(s) for s in specs], "sha256": h.hexdigest()}))
        os.replace(tmp, entry / "meta.json")
