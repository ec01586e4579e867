"""numba's settings: the compiled-kernel cache folder, the threading layer, the thread count.

They are applied by ``configure_imported_numba`` when the JIT kernels are first imported
(``kernels.jit`` does it before any kernel is defined); only the thread count must reach the
environment before numba itself is imported (``configure_numba_environment``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def kernel_sources() -> list[Path]:
    """Every source file of the kernels, in a fixed order. numba only checks a cached function's
    own file, so a change to a kernel it calls in another file must start a new cache folder:
    the folder is named after all of them (kernels import nothing else from the package, and
    no jitted code is cached outside it)."""
    return sorted(Path(__file__).resolve().parent.rglob("*.py"))


def cache_dir() -> str:
    """The compiled-kernel cache for these exact kernel sources."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in kernel_sources():
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    # default_model.dllama_home() spells the same default; kernels import nothing of the package.
    home = os.environ.get("DLLAMA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "dllama")
    return os.path.join(home, "numba-cache", digest.hexdigest()[:16])


def configure_numba_environment(threads: int) -> None:
    """The size of numba's thread pool, which numba reads once, when it is imported."""
    os.environ["NUMBA_NUM_THREADS"] = str(threads)


def configure_imported_numba() -> None:
    """The same settings for a numba that was imported before us (its config is already read).

    Must run before the first cached kernel is defined: numba picks a function's cache folder
    when it is decorated."""
    import numba
    numba.config.CACHE_DIR = os.environ.get("NUMBA_CACHE_DIR") or cache_dir()
    # omp: a parallel loop launch costs ~3 us there, 76 to 166 us with numba's workqueue.
    priority = os.environ.get("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb workqueue")
    numba.config.THREADING_LAYER_PRIORITY = priority.split()
