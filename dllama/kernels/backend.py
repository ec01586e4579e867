"""Which kernels run: numba's JIT ones when numba imports, else the NumPy reference.

``DLLAMA_BACKEND=numba|numpy`` forces a backend; ``DLLAMA_CPU_PATH=avx512|vnni|avx2|portable`` forces
the SIMD path of the JIT kernels (default: the best this CPU has, see ``simd``).

numba's settings (cache folder, threading layer) are applied by ``configure_imported_numba``
when the kernels are first imported; only the thread count must reach the environment before
numba itself is imported (``configure_numba_environment``).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

NUMBA = "numba"
NUMPY = "numpy"

_chosen: str | None = None
# The sources whose compiled code the cache holds: numba only checks a cached function's own
# file, so a change to a kernel it calls in another file must start a new cache folder.
_JIT_SOURCES = ("kernels/jit.py", "kernels/simd.py", "model/jit_blocks.py")


def cache_dir() -> str:
    """The compiled-kernel cache for these exact kernel sources."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for rel in _JIT_SOURCES:
        path = package / rel
        if path.exists():
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


def backend() -> str:
    """The backend of this process, chosen once (with a one-line notice when numba is missing)."""
    global _chosen
    if _chosen is not None:
        return _chosen
    wanted = os.environ.get("DLLAMA_BACKEND", "").strip().lower()
    if wanted not in ("", NUMBA, NUMPY):
        raise ValueError(f"DLLAMA_BACKEND must be numba or numpy, got {wanted!r}")
    if wanted == NUMPY:
        _chosen = NUMPY
        return _chosen
    try:
        import llvmlite  # noqa: F401
        import numba  # noqa: F401
    except ImportError as e:
        if wanted == NUMBA:
            raise ValueError(f"DLLAMA_BACKEND=numba, but numba does not import: {e}") from None
        print(f"💡 numba is not available ({e}): using the NumPy kernels, which are much slower",
              file=sys.stderr)
        _chosen = NUMPY
        return _chosen
    _chosen = NUMBA
    return _chosen


def set_threads(n: int | None) -> None:
    """Threads of the JIT kernels (at most the NUMBA_NUM_THREADS numba started with)."""
    if n is None or backend() != NUMBA:
        return
    import numba
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


PATH_NAMES = ("portable", "avx2", "vnni", "avx512")  # indexed by simd.PATH_*


def cpu_path() -> int:
    """The SIMD path for this CPU (a simd.PATH_* value), or the one DLLAMA_CPU_PATH forces."""
    from dllama.kernels import simd
    available = {"portable": True, "avx2": simd.HOST_HAS_AVX2, "vnni": simd.HOST_HAS_VNNI,
                 "avx512": simd.HOST_HAS_AVX512}
    wanted = os.environ.get("DLLAMA_CPU_PATH", "").strip().lower()
    if wanted:
        if wanted not in available:
            raise ValueError(f"DLLAMA_CPU_PATH must be one of {', '.join(PATH_NAMES)}, got {wanted!r}")
        if not available[wanted]:
            raise ValueError(f"DLLAMA_CPU_PATH={wanted}, but this CPU lacks its instructions")
        return PATH_NAMES.index(wanted)
    best = next(name for name in reversed(PATH_NAMES) if available[name])
    return PATH_NAMES.index(best)


def describe() -> str:
    """One line for the start-up summary: backend, SIMD path and threads."""
    if backend() != NUMBA:
        return "numpy (set DLLAMA_BACKEND=numba for the JIT kernels)"
    import numba
    path = PATH_NAMES[cpu_path()]
    return f"numba {numba.__version__}, {path} path, {numba.get_num_threads()} threads"
