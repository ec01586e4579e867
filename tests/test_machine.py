"""``machine``: the madvise helpers behind the KV cache's small pages and the release of stored weights."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from dllama.machine import release_pages, small_pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise flags are Linux's")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError("no mapping holds the address")


@linux
def test_small_pages_marks_the_whole_array_no_huge_pages():
    a = np.zeros((3, 1 << 20), dtype=np.float32)  # 12 MiB: NumPy asks for huge pages
    small_pages(a)
    start = a.ctypes.data
    for address in (start, start + a.nbytes // 2, start + a.nbytes - 1):
        assert "nh" in _vm_flags(address)
    a[:] = 1.0  # still an ordinary array
    assert float(a.sum()) == a.size
    small_pages(np.zeros(0, dtype=np.float32))  # nothing to advise


@linux
def test_release_pages_zeroes_only_whole_pages_inside():
    a = np.ones(5 << 20, dtype=np.uint8)
    view = a[100:-100]
    release_pages(view)
    assert a[:100].all() and a[-100:].all()  # outside the view: kept
    page = 4096
    first = -(-(a.ctypes.data + 100) // page) * page - a.ctypes.data
    assert first >= 100 and not a[first:first + page].any()  # a whole page inside: given back, reads zeros
