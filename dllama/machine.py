"""What this machine has."""
from __future__ import annotations

import os


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


def release_pages(array) -> None:
    """Hand the pages under ``array`` (its whole extent, for a strided view) back to the system;
    what lies there must never be read again unless it maps a file. Used on a weight's stored
    copy once its packed copy exists, so that a node holds one copy of its share: pages of a
    mapped file are read again from the file if touched, pages of memory received from the root
    would read as zeros (nothing reads them: the node computes with the packed copy). Whole pages
    strictly inside the extent only; a no-op where the system has no ``madvise``."""
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
    first = -(-start // page) * page
    last = end // page * page
    if last <= first:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
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
