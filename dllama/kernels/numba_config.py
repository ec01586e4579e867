"""numba's settings: the compiled-kernel cache folder, the threading layer, the thread pool's size.

They are applied by ``configure_imported_numba`` when the JIT kernels are first imported
(``kernels.jit`` does it before any kernel is defined); only the thread count must reach the
environment before numba itself is imported (``configure_numba_environment``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

AT_HWCAP = 16
HWCAP_ASIMDDP = 1 << 20  # Linux arm64: the CPU runs sdot/udot
HOST_IS_ARM64 = platform.machine().lower() in ("aarch64", "arm64")


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
    _stamp_kernels_by_content()
    # omp: a parallel loop launch costs ~3 us there, 76 to 166 us with numba's workqueue.
    priority = os.environ.get("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb workqueue")
    numba.config.THREADING_LAYER_PRIORITY = priority.split()
    _target_dotprod(numba)


@functools.lru_cache(maxsize=1)
def cpu_has_dotprod() -> bool:
    """Whether this CPU runs AArch64's int8 dot products (sdot): every Apple M chip; on Linux,
    as the kernel says (AT_HWCAP), which stays true under qemu where /proc/cpuinfo does not."""
    if not HOST_IS_ARM64:
        return False
    if sys.platform == "darwin":
        return True
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return False
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return bool(getauxval(AT_HWCAP) & HWCAP_ASIMDDP)


def _target_dotprod(numba) -> None:
    """numba compiles for the features LLVM finds on the host, and LLVM may not find dotprod
    where the CPU has it (macOS; qemu, whose /proc/cpuinfo is the x86 host's): add it then, so
    that the dotprod path is compiled. Features the user set (NUMBA_CPU_FEATURES) stay as set."""
    if not cpu_has_dotprod() or numba.config.CPU_FEATURES is not None:
        return
    from numba.core.codegen import get_host_cpu_features

    features = [f for f in get_host_cpu_features().split(",") if f and f != "-dotprod"]
    if "+dotprod" not in features:
        numba.config.CPU_FEATURES = ",".join([*features, "+dotprod"])


@functools.lru_cache(maxsize=None)
def _content_stamp(path: str, mtime: float, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def content_stamp(path: str) -> str:
    """A source file's freshness for the kernel cache: its contents' digest, whatever its mtime."""
    st = os.stat(path)
    return _content_stamp(path, st.st_mtime, st.st_size)


def _stamp_kernels_by_content() -> None:
    """numba before 0.68 judged a cached kernel stale when its source file's mtime changed, so
    reinstalling the same version (``pip install '.[test]'`` after ``pip install .``) threw the
    compiled kernels away. Our kernels' files are stamped by their contents on every version."""
    from numba.core import caching

    # Named with a leading underscore before numba 0.68.
    base = getattr(caching, "UserProvidedCacheLocator", None) or getattr(caching, "_UserProvidedCacheLocator", None)
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if base is None or not isinstance(getattr(impl, "_locator_classes", None), list):
        return  # a numba laid out otherwise: its own stamps apply
    kernels = str(Path(__file__).resolve().parent)

    class KernelCacheLocator(base):  # type: ignore[misc, valid-type]
        def get_source_stamp(self):
            return content_stamp(self._py_file)

        @classmethod
        def from_function(cls, py_func, py_file):
            if not os.path.abspath(py_file).startswith(kernels + os.sep):
                return None  # not ours: numba's own locators decide
            return super().from_function(py_func, py_file)

    classes = impl._locator_classes
    if not any(c.__name__ == KernelCacheLocator.__name__ for c in classes):
        classes.insert(0, KernelCacheLocator)
