"""Run dllama on an emulated ARM64 CPU: Debian's qemu-user-static runs an aarch64 Python from a
Debian userland built by mmdebstrap, with aarch64 wheels of dllama's dependencies unzipped into
a folder on PYTHONPATH and this checkout's sources beside them.

    python tests/arm64/emulate.py setup                   # build the userland and the wheels (cached)
    python tests/arm64/emulate.py pytest --path neon -- tests/test_jit_kernels.py -k neon
    python tests/arm64/emulate.py python --path dotprod -- -m dllama inference --prompt Hi --steps 8
    python tests/arm64/emulate.py generate                # SmolLM2's greedy text on ARM == on x86

Everything is cached in ``$DLLAMA_ARM64_DIR`` (default ``~/.cache/dllama/arm64``); each part is
built in a temporary folder and renamed when complete, so an interrupted build is never used.

A forced ARM path runs on the CPU it is meant for (``PATH_CPUS``, or ``--cpu``): qemu emulates
that core, so an instruction it lacks (``sdot`` on a Cortex-A72) stops the process with SIGILL,
and numba compiles for it (``NUMBA_CPU_NAME``). Under qemu, llvmlite reads the x86 host's
/proc/cpuinfo and reports CPU ``generic`` with no features whatever core is emulated (the
kernel's AT_HWCAP is right), so without a CPU name numba compiles for a generic ARMv8 core.
Other paths run on ``-cpu max``.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
PYTHON = "python3.11"  # bookworm's; the wheels are chosen for it
DEBS = ("python3.11", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1", "zlib1g", "libffi8",
        "libgomp1")  # libgomp1: numba's omp threading layer, the one dllama prefers
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")
TEST_REQUIREMENTS = ("pytest", "hypothesis", "pytest-timeout")
# The core qemu emulates and numba compiles for, per forced path: a Raspberry Pi 5's has the
# dot-product extension, a Raspberry Pi 4's does not. Other paths run on qemu's "max" core.
PATH_CPUS = {"dotprod": "cortex-a76", "neon": "cortex-a72"}
ARM_PATHS = ("neon", "dotprod")
PROMPT = "The capital of France is"


class EmulationError(Exception):
    """An expected failure (a missing tool, a failed download): one line, no traceback."""


def say(message: str) -> None:
    print(f"🦾 {message}", file=sys.stderr, flush=True)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Reports how long the stage took (the point of the harness is knowing what costs what)."""
    start = time.monotonic()
    yield
    say(f"{name}: {time.monotonic() - start:.1f} s")


def cache_dir() -> Path:
    return Path(os.environ.get("DLLAMA_ARM64_DIR") or Path.home() / ".cache" / "dllama" / "arm64")


def check_tools() -> None:
    missing = [t for t in ("qemu-aarch64-static", "mmdebstrap") if shutil.which(t) is None]
    if missing:
        raise EmulationError(f"{' and '.join(missing)} not found: apt-get install qemu-user-static mmdebstrap")


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


@contextmanager
def _atomic_folder(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final``, renamed to it when the block completes, removed if not."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not another run having finished the same build first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_tool(cmd: Sequence[str], what: str) -> None:
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        raise EmulationError(f"{what} failed ({cmd[0]} exited with {done.returncode}):\n{tail}")


def ensure_root(cache: Path) -> Path:
    """The aarch64 Debian userland, built once."""
    root = cache / f"root-{SUITE}-{_digest(DEBS)}"
    if root.is_dir():
        return root
    with stage("arm64 userland (mmdebstrap)"), _atomic_folder(root) as tmp:
        _run_tool(["mmdebstrap", "--variant=extract", "--arch=arm64", f"--include={','.join(DEBS)}", SUITE,
                   str(tmp)], "mmdebstrap")
        # qemu takes a path from the userland when it exists there: /tmp would be its empty one.
        shutil.rmtree(tmp / "tmp", ignore_errors=True)
    return root


def requirements() -> list[str]:
    """dllama's dependencies and the tests', pinned to the versions this interpreter has (the
    emulated run then tests the same numba and llvmlite as the native one)."""
    from importlib import metadata

    try:
        import tomllib
        names = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    except ImportError:  # Python 3.10: the installed package's metadata says the same
        names = [r for r in metadata.requires("dllama") or [] if "extra ==" not in r]
    out = []
    for spec in [*names, *TEST_REQUIREMENTS]:
        name = re.match(r"[A-Za-z0-9._-]+", spec).group()
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(spec)
    return out


def ensure_site(cache: Path) -> Path:
    """aarch64 wheels of ``requirements()``, unzipped into one folder for PYTHONPATH, once."""
    reqs = requirements()
    site = cache / f"site-{_digest(reqs, PLATFORMS, PYTHON)}"
    if site.is_dir():
        return site
    with stage("aarch64 wheels (pip download, unzip)"), _atomic_folder(site) as tmp:
        wheels = tmp / ".wheels"
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        _run_tool([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                   "--only-binary=:all:", *platforms, "--python-version", PYTHON.removeprefix("python"),
                   "--implementation", "cp", "-d", str(wheels), *reqs], "pip download")
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(tmp)
        shutil.rmtree(wheels)
    return site


def numba_cache(cache: Path) -> Path:
    """A kernel cache per version of the kernels' sources, as dllama keys its own (numba itself
    only checks the file of each cached function), found by dllama's own rule."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_numba_config", REPO / "dllama" / "kernels" / "numba_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)  # only the standard library: the kernels need not import here
    return cache / "numba-cache" / config.sources_digest(config.kernel_sources())[:16]


def emulated_env(cache: Path, root: Path, site: Path, path: str | None = None, cpu: str | None = None) -> dict:
    """The environment of the emulated Python."""
    env = dict(os.environ)
    for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONHOME", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES",
                 "DLLAMA_CPU_PATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(site), str(REPO)]),
        PYTHONNOUSERSITE="1",  # ~/.local may hold x86 packages for this same Python version
        # Bytecode: numba imports in 7 s without it, 2 s with; kept out of the checkout.
        PYTHONPYCACHEPREFIX=str(cache / "pycache"),
        NUMBA_CACHE_DIR=str(numba_cache(cache)),
        NUMBA_THREADING_LAYER="omp" if any((root / "usr/lib/aarch64-linux-gnu").glob("libgomp.so.1")) else "workqueue",
    )
    if path:
        env["DLLAMA_CPU_PATH"] = path
    if path_cpu(path, cpu):
        env["NUMBA_CPU_NAME"] = path_cpu(path, cpu)
    return env


@functools.lru_cache(maxsize=None)
def qemu_cpus() -> frozenset[str]:
    """The cores qemu can emulate (``-cpu help``: a title line, then one name a line)."""
    done = subprocess.run(["qemu-aarch64-static", "-cpu", "help"], stdout=subprocess.PIPE, text=True)
    return frozenset(line.split()[0] for line in done.stdout.splitlines()[1:] if line.strip())


def python_command(root: Path, args: Sequence[str], cpu: str | None = None) -> list[str]:
    """qemu running the userland's Python; on ``cpu`` if qemu knows that core (not ``apple-m1``:
    numba still compiles for it, on qemu's ``max``, which has all its instructions)."""
    core = cpu if cpu in qemu_cpus() else "max"
    return ["qemu-aarch64-static", "-cpu", core, "-L", str(root), str(root / "usr" / "bin" / PYTHON), *args]


def path_cpu(path: str | None, cpu: str | None = None) -> str | None:
    return cpu or PATH_CPUS.get(path or "")


def setup() -> tuple[Path, Path, Path]:
    """(cache folder, userland, site folder), built if needed."""
    check_tools()
    cache = cache_dir()
    return cache, ensure_root(cache), ensure_site(cache)


def run_python(args: Sequence[str], path: str | None = None, cpu: str | None = None, capture: bool = False,
               timeout: float | None = None, label: str | None = None) -> subprocess.CompletedProcess:
    """Runs the emulated ``python3.11 ARGS`` in the checkout's root."""
    cache, root, site = setup()
    label = label or " ".join(" ".join(args).split())
    label = (label[:70] + " ...") if len(label) > 70 else label
    where = ", ".join(filter(None, (path and f"path {path}", f"cpu {path_cpu(path, cpu) or 'max'}")))
    with stage(f"emulated python {label} ({where})"):
        return subprocess.run(python_command(root, args, path_cpu(path, cpu)), cwd=REPO,
                              env=emulated_env(cache, root, site, path, cpu),
                              stdout=subprocess.PIPE if capture else None, text=True, timeout=timeout)


PROBE = """
import ctypes, os, platform, sys
import llvmlite.binding as ll
hwcap = ctypes.CDLL(None).getauxval
hwcap.restype = ctypes.c_ulong
features = dict(ll.get_host_cpu_features())
print(f"uname {os.uname().machine}, platform {platform.machine()}, Python {platform.python_version()}; "
      f"llvmlite: CPU {ll.get_host_cpu_name()!r}, features {features}; "
      f"AT_HWCAP: asimd {bool(hwcap(16) & 1 << 1)}, asimddp {bool(hwcap(16) & 1 << 20)}")
"""


def probe(cpu: str | None = None) -> str:
    """What the emulated process sees of its CPU."""
    done = run_python(["-c", PROBE], cpu=cpu, capture=True, label="(what the CPU reports)")
    if done.returncode != 0:
        raise EmulationError("the emulated Python does not start (see above)")
    return done.stdout.strip()


def _model(weights: str) -> tuple[Path, Path]:
    """The default SmolLM2 model in ``weights`` (made natively, once: converting under emulation
    would take long and prove nothing more)."""
    code = ("from dllama.default_model import ensure_default_model; from dllama.kernels.quants "
            f"import FloatType; print(*ensure_default_model(FloatType.{weights.upper()}), sep='\\n')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise EmulationError(f"cannot make the default model in {weights} (see above)")
    model, tokenizer = done.stdout.splitlines()[-2:]
    return Path(model), Path(tokenizer)


def _generated_text(run: Callable[[list[str]], subprocess.CompletedProcess], args: list[str]) -> str | None:
    """The text an ``inference`` run generated (its --stats-json: stdout adds timings), or None."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        done = run([*args, "--stats-json", str(stats)])
        if done.returncode != 0 or not stats.is_file():
            return None
        return json.loads(stats.read_text())["text"]


def _run_native(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL)


def generate(paths: Sequence[str], weights: Sequence[str], steps: int, prompt: str) -> bool:
    """SmolLM2's greedy text on each emulated ARM path against the native x86 one."""
    same = True
    for w in weights:
        model, tokenizer = _model(w)
        args = ["-m", "dllama", "inference", "--model", str(model), "--tokenizer", str(tokenizer), "--prompt", prompt,
                "--steps", str(steps), "--temperature", "0", "--nthreads", str(min(2, os.cpu_count() or 1))]
        with stage(f"native x86 generation ({w})"):
            native = _generated_text(_run_native, args)
        if native is None:
            raise EmulationError(f"the native generation failed ({w}; see above)")
        say(f"x86 ({w}): {native!r}")
        for path in paths:
            arm = _generated_text(lambda a, p=path: run_python(a, path=p, capture=True), args)
            verdict = "same" if arm == native else ("FAILED" if arm is None else "DIFFERENT")
            same &= verdict == "same"
            say(f"arm64 {path} ({w}): {arm!r} -> {verdict}")
    return same


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="build the userland and the wheels, and say what the emulated CPU reports")
    for name in ("pytest", "python"):
        s = sub.add_parser(name, help=f"run {name} under emulation (its arguments after --)")
        s.add_argument("--path", help="force this SIMD path (DLLAMA_CPU_PATH)")
        s.add_argument("--cpu", help="the core qemu emulates and numba compiles for (default: the path's, "
                                     f"{', '.join(f'{k}: {v}' for k, v in PATH_CPUS.items())}; else qemu's max)")
        s.add_argument("args", nargs=argparse.REMAINDER)
    g = sub.add_parser("generate", help="SmolLM2's greedy text on each ARM path must equal the x86 text")
    g.add_argument("--paths", nargs="+", default=list(ARM_PATHS))
    g.add_argument("--weights", nargs="+", choices=["q40", "q80"], default=["q40"])
    g.add_argument("--steps", type=int, default=16, help="positions, prompt included")
    g.add_argument("--prompt", default=PROMPT)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "setup":
            with stage("setup"):
                cache, root, site = setup()
            say(f"userland {root}, wheels {site}")
            for cpu in (None, *PATH_CPUS.values()):
                say(f"{cpu or 'max'}: {probe(cpu)}")
            return 0
        if args.command in ("pytest", "python"):
            rest = args.args[1:] if args.args[:1] == ["--"] else args.args
            command = ["-m", "pytest", *rest] if args.command == "pytest" else rest
            return run_python(command, args.path, args.cpu).returncode
        return 0 if generate(args.paths, args.weights, args.steps, args.prompt) else 1
    except EmulationError as e:
        print(f"❌ {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
