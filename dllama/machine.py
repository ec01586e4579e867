"""What this machine has."""
from __future__ import annotations

import os
import sys


def physical_memory() -> int:
    """Bytes of RAM on this machine (8 GiB when the system does not say). ``DLLAMA_MEMORY_BYTES``
    says less: a worker then takes (and reports to its root) only that much."""
    limit = os.environ.get("DLLAMA_MEMORY_BYTES", "")
    if limit.isdecimal():
        return int(limit)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def release_memory() -> None:
    """Give freed memory back to the system now: after a cluster is planned again, the old
    share's arrays are garbage, and glibc would otherwise keep their pages in its heap."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator decides


_MADV_DONTNEED = 4  # Linux (and the BSDs, where it is only a hint)
_MADV_NOHUGEPAGE = 15  # Linux


def release_pages(array) -> None:
    """Hand the pages under ``array`` (its whole extent, for a strided view) back to the system;
    what lies there must never be read again unless it maps a file. Used on a weight's stored
    copy once its packed copy exists, so that a node holds one copy of its share: pages of a
    mapped file are read again from the file if touched, pages of memory received from the root
    would read as zeros (nothing reads them: the node computes with the packed copy). Whole pages
    strictly inside the extent only; a no-op where the system has no ``madvise``."""
    _advise(array, _MADV_DONTNEED, inside=True)


def small_pages(array) -> None:
    """Keep the memory under ``array`` in small (4 KiB) pages, never transparent huge ones:
    for an array filled a little at a time, such as a KV cache. NumPy asks for huge pages
    (2 MiB) on every array of 4 MiB or more, so the first write to each 2 MiB stretch of a KV
    cache cleared all of it (and committed it) at once: measured on SmolLM2-135M's 26-token
    prompt, 30 such faults cost 8 ms, or 190 ms when the system had to find the huge pages,
    where the small pages the prompt writes cost 1 ms. Call it before anything is written to
    the array; a no-op but on Linux."""
    if sys.platform.startswith("linux"):
        _advise(array, _MADV_NOHUGEPAGE, inside=False)


def _advise(array, advice: int, inside: bool) -> None:
    """``madvise`` over the pages under ``array`` (its whole extent, for a strided view): those
    strictly inside it (``inside``), else every page it touches."""
    import ctypes

    import numpy as np

    a = np.asarray(array)
    if a.size == 0:
        return
    page = _page_size()
    start = end = a.__array_interface__["data"][0]
    for n, stride in zip(a.shape, a.strides):
        if stride < 0:
            start += (n - 1) * stride
        else:
            end += (n - 1) * stride
    end += a.itemsize
    if inside:
        first, last = -(-start // page) * page, end // page * page
    else:
        first, last = start // page * page, -(-end // page) * page
    if last <= first:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice)
    except (OSError, AttributeError):
        pass


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return 0


def file_backed(array) -> bool:
    """Whether ``array`` is a view of a memory-mapped file (its pages can be read again)."""
    import mmap

    import numpy as np

    a = array
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False
