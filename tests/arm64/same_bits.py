"""The ARM paths give the x86 paths' bits: weight products (Q40 and Q80 weights against Q80
activations, 1 to 9 tokens, so every token tile runs; F16 weights), the Q80 activation
quantizer inside them, and the Q80 wire codec.

    python tests/arm64/same_bits.py write CASES.npz [FORMAT ...]   # here, on x86: inputs, results
    python tests/arm64/emulate.py python --path dotprod -- tests/arm64/same_bits.py check CASES.npz [PATH ...]

``write`` takes the formats to cover (default Q40 Q80 F16; the wire codec always). ``check``
recomputes every case on each path named (default: this process's, DLLAMA_CPU_PATH) and prints
one line per case that differs in any bit; it exits 1 if one does.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dllama.kernels.backend import PATH_NAMES, cpu_path, ops  # noqa: E402
from dllama.kernels.jit import matmul, simd  # noqa: E402
from dllama.kernels.jit.packing import pack  # noqa: E402
from dllama.kernels.quants import FloatType, from_float32  # noqa: E402

FORMATS = (FloatType.Q40, FloatType.Q80, FloatType.F16)
TOKENS = range(1, 10)


def _inputs(seed: int, ft: FloatType, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, n = int(rng.integers(1, 23)), 32 * int(rng.integers(1, 9))
    w = from_float32((rng.standard_normal((rows, n)) * 0.1).astype(np.float32), ft)
    x = (rng.standard_normal((n_tokens, n)) * float(rng.choice([1e-3, 1.0, 1e3]))).astype(np.float32)
    return w, x


def results(path: int, formats: list[FloatType]) -> dict[str, np.ndarray]:
    """Every case's output on ``path`` (the cases' inputs come from their names' seeds)."""
    out = {}
    for ft in formats:
        for n_tokens in TOKENS:
            for seed in range(3):
                w, x = _inputs(1000 * n_tokens + seed, ft, n_tokens)
                out[f"{ft.name}-{n_tokens}-{seed}"] = matmul.linear(x, pack(w, ft), w.shape[0], ft, True, path)
    codec = ops()
    frames = np.zeros((5, 2048 // 32 * 34), np.uint8)
    for seed in range(len(frames)):
        codec.q80_wire_encode_into((np.random.default_rng(seed).standard_normal(2048) * 10).astype(np.float32),
                                   frames[seed])
        out[f"wire-encoded-{seed}"] = frames[seed].copy()
    out["wire-sum"] = codec.q80_wire_sum(frames, np.array([2, 0, 4, 1, 3]), 0, 1, 2048)
    return out


def _runnable(name: str) -> int:
    """The path named, if this CPU runs it (a path it lacks would quietly run the portable body)."""
    os.environ["DLLAMA_CPU_PATH"] = name
    return cpu_path()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("write", "check"):
        print("usage: same_bits.py write FILE.npz [FORMAT ...] | check FILE.npz [PATH ...]", file=sys.stderr)
        return 2
    action, file, names = argv[0], argv[1], argv[2:]
    if action == "write":
        path = simd.PATH_AVX2 if simd.HOST_HAS_AVX2 else cpu_path()
        formats = [FloatType[name] for name in names] if names else list(FORMATS)
        np.savez(file, **results(path, formats))
        print(f"wrote {file} on the {PATH_NAMES[path]} path")
        return 0
    want = np.load(file)
    formats = [ft for ft in FORMATS if any(name.startswith(f"{ft.name}-") for name in want.files)]
    try:
        paths = [_runnable(name) for name in names] or [cpu_path()]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = False
    for path in paths:
        got = results(path, formats)
        differ = [name for name in want.files if got[name].tobytes() != want[name].tobytes()]
        for name in differ:
            print(f"{name}: other bits on the {PATH_NAMES[path]} path")
        print(f"{len(want.files) - len(differ)} of {len(want.files)} cases have the same bits "
              f"on the {PATH_NAMES[path]} path")
        failed = failed or bool(differ)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
