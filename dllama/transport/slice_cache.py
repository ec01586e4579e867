"""A worker's slices on disk, so that a restarted root sends configuration only.

One directory per key (a digest of the model and the slice plan, chosen by the root):
``slice.bin`` holds the tensors back to back, ``meta.json`` their names, sizes and the
SHA-256 of ``slice.bin``. ``meta.json`` is written last, atomically, so an entry without it is
partial; an entry whose bytes do not match its digest is corrupt. Both are removed and the
slices fetched again.

When the root plans the cluster again (a node was lost or came back) the new slice has no entry
yet, but the entries of the same model (``meta.json`` names its digest and every tensor's
``TensorCut``) hold parts of it: ``assemble`` copies what they cover and says what is missing,
which is all the root then sends.
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
from dllama.formats.cuts import TensorCut, missing, overlap
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

    def load(self, key: str, cuts: list[TensorCut]) -> dict[str, np.ndarray] | None:
        """The tensors of entry ``key`` (memory-mapped bytes), or None when it is absent,
        partial, corrupt or holds other tensors than ``cuts``."""
        specs = [(c.name, c.nbytes) for c in cuts]
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

    def assemble(self, model_digest: str, cuts: list[TensorCut]) -> tuple[dict[str, np.ndarray], list[TensorCut]]:
        """New buffers for ``cuts`` holding whatever the entries of model ``model_digest`` have of
        them, and the pieces still missing. An entry's bytes are checked against its digest
        once, when it first has something to give."""
        held = list(self._entries_of(model_digest))
        tensors, need = {}, []
        for want in cuts:
            out = np.empty(want.shape, dtype=np.uint8)
            have = []
            for entry in held:
                got = entry.cuts.get(want.name)
                span = overlap(want, got[0]) if got else None
                if span is None or entry.bytes() is None:
                    continue
                cut, offset = got
                stored = entry.bytes()[offset:offset + cut.nbytes].reshape(cut.shape)
                want.place(out, *span)[...] = cut.place(stored, *span)
                have.append(cut)
            tensors[want.name] = out.reshape(-1)
            need += [want._replace(lo=lo, hi=hi) for lo, hi in missing(want, have)]
        return tensors, need

    def _entries_of(self, model_digest: str):
        """Every entry of the model whose metadata is whole (its bytes are checked on use)."""
        for meta_path in sorted(self.dir.glob("*/meta.json")):
            try:
                meta = json.loads(meta_path.read_text())
                if meta.get("model") != model_digest:
                    continue
                cuts, offset = {}, 0
                for value in meta["cuts"]:
                    cut = TensorCut.from_json(value)
                    cuts[cut.name] = (cut, offset)
                    offset += cut.nbytes
                yield _Entry(meta_path.parent / "slice.bin", offset, str(meta.get("sha256")), cuts)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue

    def store(self, key: str, cuts: list[TensorCut], tensors: dict[str, np.ndarray],
              model_digest: str | None = None) -> None:
        specs = [(c.name, c.nbytes) for c in cuts]
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
        tmp.write_text(json.dumps({"tensors": [list(s) for s in specs], "sha256": h.hexdigest(),
                                   "model": model_digest, "cuts": [c.to_json() for c in cuts]}))
        os.replace(tmp, entry / "meta.json")


class _Entry:
    """A cached slice that may give parts of a new one."""

    def __init__(self, data: Path, size: int, sha256: str, cuts: dict[str, tuple[TensorCut, int]]):
        self.data, self.size, self.sha256, self.cuts = data, size, sha256, cuts
        self._bytes: np.ndarray | None = None
        self._checked = False

    def bytes(self) -> np.ndarray | None:
        """Its bytes (memory-mapped), or None when they are not what its metadata says."""
        if not self._checked:
            self._checked = True
            try:
                if self.data.stat().st_size == self.size and sha256_file(self.data) == self.sha256 and self.size:
                    self._bytes = np.memmap(self.data, dtype=np.uint8, mode="r")
            except OSError:
                pass
        return self._bytes
