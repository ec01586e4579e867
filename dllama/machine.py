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
