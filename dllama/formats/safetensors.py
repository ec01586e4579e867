"""Safetensors files (Hugging Face), read through memory maps without PyTorch.

Layout: uint64 little-endian ``N``; ``N`` bytes of UTF-8 JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the
header; an optional ``"__metadata__"`` entry holds strings); then the tensors' raw bytes,
little-endian, row-major. A checkpoint is one ``model.safetensors`` or several shards listed
by ``model.safetensors.index.json`` (``{"weight_map": {name: shard_file}}``).

Tensors are returned as float32 copies of one tensor at a time, and the mapped pages of each are
released once copied, so converting a model needs memory for its largest tensor, not for the
model (file pages would be reclaimable anyway, but they count as the process's resident memory).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllama.errors import FormatError

# Bigger headers mean a corrupt length field (real ones are well under a megabyte per shard).
MAX_HEADER_BYTES = 100 << 20
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Source dtypes we convert; bf16 is widened by hand (NumPy has no bfloat16).
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int  # absolute file offsets
    end: int


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32: they are the upper halves of float32s."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(f"{path}: not a safetensors file or truncated (header of {n} bytes, file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if name == "__metadata__":
            continue
        def is_int(x: object) -> bool:
            return type(x) is int and x >= 0

        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError):
            raise FormatError(f"{path}: tensor {name}: malformed header entry") from None
        if not (isinstance(dtype, str) and isinstance(shape, list) and all(map(is_int, shape))
                and isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))):
            raise FormatError(f"{path}: tensor {name}: malformed header entry")
        shape, (begin, end) = tuple(shape), offsets
        if begin > end:
            raise FormatError(f"{path}: tensor {name}: invalid offsets")
        if data_start + end > size:
            raise FormatError(f"{path}: file is truncated: tensor {name} ends at byte {data_start + end}, "
                              f"the file has {size}")
        itemsize = _DTYPES[dtype].itemsize if dtype in _DTYPES else None
        if itemsize is not None and end - begin != itemsize * math.prod(shape):
            raise FormatError(f"{path}: tensor {name}: {end - begin} bytes do not hold {dtype} {list(shape)}")
        out[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    # As the safetensors library demands: the tensors tile the data exactly, so no two share bytes.
    at = data_start
    for info in sorted(out.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != at:
            raise FormatError(f"{path}: tensor {info.name} starts at data byte {info.begin - data_start}, "
                              f"expected {at - data_start} (overlapping or gapped offsets)")
        at = info.end
    if at != size:
        raise FormatError(f"{path}: {size - at} bytes after the last tensor")
    return out


class Checkpoint:
    """All tensors of a Hugging Face checkpoint folder (sharded or not), by name."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self._shards():
            for name, info in read_header(shard).items():
                if name in self.tensors:
                    raise FormatError(f"{shard}: tensor {name} is also in {self.tensors[name].path.name}")
                self.tensors[name] = info
        self._maps: dict[Path, mmap.mmap] = {}

    def _shards(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()), key=str)
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError,
                    RecursionError) as e:
                raise FormatError(f"{index}: unreadable safetensors index ({e})") from None
            shards = []
            for name in files:
                if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                    raise FormatError(f"{index}: shard {name!r} is not a .safetensors file name in the folder")
                path = self.folder / name
                if not path.exists():
                    raise FormatError(f"{index}: shard {name} is missing")
                shards.append(path)
            return shards
        shards = sorted(p for p in self.folder.glob("*.safetensors") if not p.name.startswith("."))
        if not shards:
            raise FormatError(f"{self.folder}: no *.safetensors files")
        return shards

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def check_dtype(self, name: str) -> np.dtype:
        """The stored dtype of a tensor we can convert (FormatError for others, e.g. F8_E4M3)."""
        info = self.tensors[name]
        dtype = _DTYPES.get(info.dtype)
        if dtype is None:
            raise FormatError(f"{info.path}: tensor {name} is {info.dtype}; only BF16, F16, F32 and F64 "
                              f"weights can be converted")
        return dtype

    def float32(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array."""
        info = self.tensors[name]
        dtype = self.check_dtype(name)
        if info.end == info.begin:
            return np.zeros(info.shape, dtype=np.float32)
        m = self._maps.get(info.path)
        if m is None:
            try:
                with open(info.path, "rb") as f:
                    m = self._maps[info.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise FormatError(f"{info.path}: cannot map: {e.strerror or e}") from None
        raw = np.frombuffer(m, dtype=dtype, count=(info.end - info.begin) // dtype.itemsize,
                            offset=info.begin).reshape(info.shape)
        out = bf16_to_float32(raw) if info.dtype == "BF16" else raw.astype(np.float32)
        del raw
        if hasattr(mmap, "MADV_DONTNEED"):
            start = info.begin - info.begin % mmap.PAGESIZE
            m.madvise(mmap.MADV_DONTNEED, start, info.end - start)
        return out

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # an array still views it; it is unmapped when that array goes
                pass
        self._maps.clear()
