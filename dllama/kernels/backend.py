"""Which kernels run: numba's JIT ones when numba imports, else the NumPy reference. The one
place that picks the backend (``backend``) and hands out its operations (``ops``).

``DLLAMA_BACKEND=numba|numpy`` forces a backend; ``DLLAMA_CPU_PATH=avx512|vnni|avx2|dotprod|neon|portable``
forces the SIMD path of the JIT kernels (default: the best this CPU has, see ``jit.vector_ir``).

numba's settings before it starts (cache folder, threading layer, thread pool size) are
``numba_config``'s; ``set_threads`` changes the threads a running numba uses.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

NUMBA = "numba"
NUMPY = "numpy"

_chosen: str | None = None


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


PATH_NAMES = ("portable", "avx2", "vnni", "avx512", "neon", "dotprod")  # indexed by simd.PATH_*


def cpu_path() -> int:
    """The SIMD path for this CPU (a simd.PATH_* value), or the one DLLAMA_CPU_PATH forces."""
    from dllama.kernels.jit import simd
    available = {"portable": True, "avx2": simd.HOST_HAS_AVX2, "vnni": simd.HOST_HAS_VNNI,
                 "avx512": simd.HOST_HAS_AVX512, "neon": simd.HOST_HAS_NEON, "dotprod": simd.HOST_HAS_DOTPROD}
    wanted = os.environ.get("DLLAMA_CPU_PATH", "").strip().lower()
    if wanted:
        if wanted not in available:
            raise ValueError(f"DLLAMA_CPU_PATH must be one of {', '.join(PATH_NAMES)}, got {wanted!r}")
        if not available[wanted]:
            raise ValueError(f"DLLAMA_CPU_PATH={wanted}, but this CPU lacks its instructions")
        return PATH_NAMES.index(wanted)
    best = next(name for name in reversed(PATH_NAMES) if available[name])
    return PATH_NAMES.index(best)


def kernels_cached() -> bool:
    """Whether the numba kernels of these sources were compiled on this machine before (their
    cache folder holds an index): if not, the first calls compile them."""
    from pathlib import Path

    from dllama.kernels.numba_config import cache_dir

    folder = Path(os.environ.get("NUMBA_CACHE_DIR") or cache_dir())
    return folder.is_dir() and any(folder.rglob("*.nbi"))


def describe() -> str:
    """One line for the start-up summary: backend, SIMD path and threads."""
    if backend() != NUMBA:
        return "numpy (set DLLAMA_BACKEND=numba for the JIT kernels)"
    import numba
    path = PATH_NAMES[cpu_path()]
    return f"numba {numba.__version__}, {path} path, {numba.get_num_threads()} threads"


@dataclass(frozen=True)
class Ops:
    """The operations the engine calls outside the forward's blocks, from one backend; both
    backends' functions take and return the same things (tests hold them equal)."""

    name: str
    argmax: Callable[[np.ndarray], int]
    q80_wire_encode_into: Callable[[np.ndarray, np.ndarray], None]
    q80_wire_sum: Callable[[np.ndarray, np.ndarray, int, int, int], np.ndarray]


def ops(name: str | None = None) -> Ops:
    """The operations of backend ``name`` (default: this process's backend)."""
    name = name or backend()
    if name == NUMBA:
        from dllama.kernels.jit import sampling, wire

        return Ops(NUMBA, sampling.argmax, wire.q80_wire_encode_into, wire.q80_wire_sum)
    if name != NUMPY:
        raise ValueError(f"no kernel backend {name!r} (numba or numpy)")
    from dllama.kernels import reference

    return Ops(NUMPY, reference.argmax, reference.q80_wire_encode_into, reference.q80_wire_sum)


def q40_quantizer(name: str | None = None) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    """The Q40 scale search ``(values, per-column importance or None) -> blocks`` of backend
    ``name`` (default: this process's): the same bytes on both (tests hold them equal), the
    JIT one many times faster, which converting a model needs. Apart from ``ops``: a converter
    loads no other kernel."""
    name = name or backend()
    if name == NUMBA:
        from dllama.kernels.jit.quantize import quantize_q40

        return quantize_q40
    if name != NUMPY:
        raise ValueError(f"no kernel backend {name!r} (numba or numpy)")
    from dllama.kernels.quants import quantize_q40

    return quantize_q40
