"""Files appear whole or not at all: write to a temporary file beside the target, then rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO


def open_temporary(path: Path) -> tuple[BinaryIO, Path]:
    """A new temporary file in ``path``'s folder, open for writing, and its path."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    return os.fdopen(fd, "wb"), Path(tmp)


def publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the usual permissions (mkstemp makes it 0600) and move it to ``path``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    f, tmp = open_temporary(path)
    try:
        with f:
            f.write(payload)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
