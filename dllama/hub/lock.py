"""One download of a model into a folder at a time: a lock file next to the model's files.

Two ``launch`` runs for the same model would write the same ``.part`` files; the second one is
told to let the first finish instead.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from dllama.default_model import _say
from dllama.errors import DllamaError


@contextmanager
def exclusive(folder: Path, name: str, say: Callable[[str], None] = _say) -> Iterator[None]:
    """One download of a model into a folder at a time (POSIX ``flock``; elsewhere no lock).

    The holder deletes the lock file while it still holds the lock; a process that locked the
    file it had opened before then finds another file (or none) under the name, and tries again:
    two processes never both hold a lock on what is under the name.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = folder / f".{name}.lock"
    while True:
        try:
            f = open(path, "a")  # noqa: SIM115 (closed below: kept open while locked)
        except OSError as e:
            raise DllamaError(f"{path}: cannot create the download's lock file: {e.strerror or e}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DllamaError(f"{folder}: another dllama is downloading {name} there; let it finish") from None
            # e.g. ENOLCK on a network file system: go on, unguarded.
            say(f"⚠️  {path}: cannot lock it ({e.strerror or e}): nothing keeps a second dllama from "
                f"downloading {name} there at the same time")
            f = None
            break
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
        except OSError:
            same = False
        if same:
            break
        f.close()  # the orphan of a holder that has finished: lock the file under the name
    try:
        yield
    finally:
        if f is not None:
            try:
                path.unlink(missing_ok=True)  # still locked: see above
            except OSError:
                pass
            f.close()
