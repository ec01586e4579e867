"""Joining a model published in parts into one ``.m``, resumably, with room for one part only.

The parts are appended in order to the model's temporary file (the downloader's ``<model>.part``)
and each is deleted as soon as it is appended, so the join needs free space for one part, not for
the whole model again. ``<model>.join`` records the parts appended so far, written after their
bytes reach the disk and before the part is deleted: an interrupted join goes on where it stopped.
Checking the joined file and giving it its final name is the caller's (the downloader's) job.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from dllama.errors import DllamaError
from dllama.hub.catalog import human_bytes

READ_BYTES = 8 << 20  # large reads: the join runs at disk speed


def join_log_path(model: Path) -> Path:
    """The record of an unfinished join of a split model: the parts already in ``<model>.part``."""
    return model.with_name(model.name + ".join")


def resume_point(parts: list[Path], model: Path, tmp: Path, say: Callable[[str], None]) -> tuple[int, int]:
    """How many of ``parts`` an interrupted join appended to ``tmp`` (and deleted), and how many
    bytes they are. (0, 0) when there is no usable record: the join starts over."""
    log = join_log_path(model)
    if not log.exists():
        return 0, 0
    try:
        record = json.loads(log.read_text())
        names, size = list(record["parts"]), int(record["size"])
        usable = names == [p.name for p in parts[:len(names)]] and tmp.stat().st_size >= size
    except (OSError, ValueError, KeyError, TypeError):
        usable = False
    if not usable:
        say(f"the interrupted join of {model.name} cannot go on: starting over "
            f"(the parts it had joined are downloaded again)")
        tmp.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        return 0, 0
    for p in parts[:len(names)]:  # appended and recorded, but the run stopped before deleting them
        p.unlink(missing_ok=True)
    return len(names), size


def append_parts(parts: list[Path], model: Path, tmp: Path, joined: int, size: int, say: Callable[[str], None],
                 bar: Callable[[int, int, str], Any]) -> None:
    """Append the parts from ``joined`` on, in order, to ``tmp`` (which holds ``size`` bytes of the
    parts before), deleting each once recorded in the join log. ``bar(total, initial, desc)`` makes
    the progress bar."""
    log = join_log_path(model)
    left = parts[joined:]
    try:
        sizes = [p.stat().st_size for p in left]
        with open(tmp, "r+b" if joined else "wb") as out:
            out.truncate(size)  # bytes of a part whose append was interrupted: appended again
        free = shutil.disk_usage(model.parent).free
    except OSError as e:
        raise DllamaError(f"{tmp}: cannot join the parts: {e.strerror or e}") from None
    need = max(sizes, default=0)
    if free < need:
        raise DllamaError(f"{model.parent}: joining the parts of {model.name} needs {human_bytes(need)} of free "
                          f"disk space (each part is deleted once appended), {human_bytes(free)} is free")
    if left:
        say(f"joining {len(parts)} parts into {model.name}" + (f" (going on after part {joined})" if joined else ""))
    progress = bar(size + sum(sizes), size, f"joining {model.name}")
    done = [p.name for p in parts[:joined]]
    try:
        with open(tmp, "r+b") as out:
            out.seek(size)
            for p in left:
                with open(p, "rb") as src:
                    for chunk in iter(lambda: src.read(READ_BYTES), b""):
                        out.write(chunk)
                        progress.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())  # on the disk before the record says so and the part goes
                done.append(p.name)
                _write_log(log, done, out.tell())
                p.unlink()
    except OSError as e:
        raise DllamaError(f"{tmp}: cannot join the parts: {e.strerror or e} ({_parts(len(done))} joined so "
                          f"far are kept in it: run the same command again to go on)") from None
    except KeyboardInterrupt:
        say(f"interrupted: {tmp} keeps {_parts(len(done))} joined so far: run the same command again to go on")
        raise
    finally:
        progress.close()


def _write_log(log: Path, parts: list[str], size: int) -> None:
    """Record, durably and atomically, that ``<model>.part`` holds ``parts`` (``size`` bytes)."""
    tmp = log.with_name(log.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"parts": parts, "size": size}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, log)
    try:  # the rename itself on the disk too, before the part is deleted
        fd = os.open(log.parent, os.O_RDONLY)
    except OSError:  # not on every system (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parts(n: int) -> str:
    return f"{n} part{'' if n == 1 else 's'}"
