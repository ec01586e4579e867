"""What this machine has."""
from __future__ import annotations

import os


def physical_memory() -> int:
    """Bytes of RAM on this machine (8 GiB when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30
