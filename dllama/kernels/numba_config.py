"""numba's settings: the compiled-kernel cache folder, the threading layer, the thread pool's size.

They are applied by ``configure_imported_numba`` when the JIT kernels are first imported
(``kernels.jit`` does it before any kernel is defined); only the thread count must reach the
environment before numba itself is imported (``configure_numba_environment``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def kernel_sources() -> dict[str, Path]:
    """Every source file of the kernels, by its name under ``kernels/``. numba only checks a cached
    function's own file, so a change to a kernel it calls in another file must start a new cache
    folder: the folder is named after all of them (kernels import nothing else from the package,
    and no jitted code is cached outside it)."""
    root = Path(__file__).resolve().parent
    return {path.relative_to(root).as_posix(): path for path in sorted(root.rglob("*.py"))}


def sources_digest(sources: dict[str, Path]) -> str:
    """SHA-256 of the files' names and contents, in name order."""
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode() + b"\0")
        digest.update(sources[name].read_bytes())
    return digest.hexdigest()


def cache_dir() -> str:
    """The compiled-kernel cache for these exact kernel sources."""
    # default_model.dllama_home() spells the same default; kernels import nothing of the package.
    home = os.environ.get("DLLAMA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "dllama")
    return os.path.join(home, "numba-cache", sources_digest(kernel_sources())[:16])


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
