"""The weight products' property tests on the ARM paths, on an emulated ARM64 CPU (qemu user
mode, with a Debian arm64 userland and aarch64 wheels that tests/arm64/emulate.py builds once
and caches in $DLLAMA_ARM64_DIR, default ~/.cache/dllama/arm64).

numba compiling the kernels under qemu is nearly all the cost (about two minutes on two cores
with a cold cache, seconds warm), and one compile holds every path's body, so a single process
runs the Q40 products on both ARM paths: on a Cortex-A76, which has the dot-product extension
that the dotprod path needs. `python tests/arm64/emulate.py pytest --path neon` runs the neon
path on a Cortex-A72, which lacks it (an sdot there stops the process), and the whole kernel
test file; `emulate.py generate` compares SmolLM2's text with x86's.

qemu-user-static and mmdebstrap come from Debian (.ci/run installs them); without them this
test fails, unless DLLAMA_SKIP_ARM64=1.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.arm64 import emulate
from tests.processes import ENV, ROOT

ARM_PATHS = ("neon", "dotprod")  # ids of tests/test_jit_kernels.py's cases (tests/helpers.py: simd_paths)
PROCESS_PATH = "dotprod"  # the process's own path, and its CPU (emulate.PATH_CPUS)
# Q40 weights times Q80 activations on each path: the int8 bodies. (Float32 activations take
# the float body, the same IR on every CPU but for fcvtl, which test_arm64_codegen.py checks;
# compiling it here too would cost a minute of CI.)
SELECT = f"test_linear_matches_reference and Q40-q80 and ({' or '.join(ARM_PATHS)})"
EXPECTED_PASSED = len(ARM_PATHS)
TIMEOUT_S = 540  # under pytest's own deadline (pyproject.toml), so a hang reports the run's output


def _tools() -> None:
    if os.environ.get("DLLAMA_SKIP_ARM64") == "1":
        pytest.skip("DLLAMA_SKIP_ARM64=1")
    try:
        emulate.check_tools()
    except emulate.EmulationError as e:
        pytest.fail(f"{e} (.ci/run does), or set DLLAMA_SKIP_ARM64=1 to skip this test")


def test_weight_products_on_emulated_arm64():
    _tools()
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_jit_kernels.py", "-k", SELECT]
    try:
        done = emulate.run_python(args, path=PROCESS_PATH, capture=True, timeout=TIMEOUT_S)
    except emulate.EmulationError as e:
        pytest.fail(str(e))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the emulated tests took over {TIMEOUT_S} s:\n{(e.stdout or '')[-3000:]}")
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-5000:]
    # A case skipped or missing (a renamed id, a path the emulated CPU is said to lack) proves nothing.
    assert summary.startswith(f"{EXPECTED_PASSED} passed") and "skipped" not in summary, done.stdout[-5000:]


def test_the_arm_paths_give_the_x86_bits(tmp_path):
    """Q40 products on both ARM paths, with the Q80 quantizer of activations inside them, and the wire codec:
    the same bits as this host's AVX2 path (tests/arm64/same_bits.py; the README's Kernels
    section says why they must be). The products' kernels are the ones the test above compiled."""
    _tools()
    cases = tmp_path / "cases.npz"
    written = subprocess.run([sys.executable, "tests/arm64/same_bits.py", "write", str(cases), "Q40"], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert written.returncode == 0, written.stderr
    try:
        done = emulate.run_python(["tests/arm64/same_bits.py", "check", str(cases), *ARM_PATHS], path=PROCESS_PATH,
                                  capture=True, timeout=TIMEOUT_S)
    except emulate.EmulationError as e:
        pytest.fail(str(e))
    assert done.returncode == 0, done.stdout[-5000:]
    assert done.stdout.count("have the same bits") == len(ARM_PATHS), done.stdout
