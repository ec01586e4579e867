"""What bench/decode.py and bench/cluster.py share: paths, the models they measure (SmolLM2 and
the synthetic Llama-1B-shaped model), child-process environments, formatting, machine facts and
writing results. Each bench imports this module, never the other bench.

Importing it puts the repository on ``sys.path`` (``python bench/x.py`` without an installed
dllama) and imports no module that imports numba: a bench's parent process never starts numba,
each child configures it (threads, cache folder) before its first import.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# After the path bootstrap above.
from dllama.formats.mfile import (
    ArchType,
    HiddenAct,
    ModelHeader,
    ModelWriter,
    RopeType,
    tensor_plan,
)
from dllama.kernels.quants import Q40_BLOCK, FloatType

# numba and the BLAS libraries size their thread pools from these when they start.
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

LLAMA_LABEL = "synthetic Llama-1B Q40"
SMOL_LABEL = "SmolLM2-135M Q40"


def say(message: str) -> None:
    """Progress, on stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def fmt(value: Any, spec: str, missing: str = "-") -> str:
    """``format(value, spec)``, or ``missing`` for None (a figure this run did not measure)."""
    return missing if value is None else format(value, spec)


def tail(text: str, n: int = 15) -> str:
    """The last ``n`` lines of a child's output, for a failure report."""
    return "\n".join(text.strip().splitlines()[-n:])


# -- models ------------------------------------------------------------------------------------

@dataclass
class BenchModel:
    key: str  # as given to --models
    label: str
    path: Path
    tokenizer: Path | None  # None: random prompt tokens (decode.py's synthetic model has none)


def smollm2(key: str = "smollm2") -> BenchModel:
    """The default model, SmolLM2-135M Q40 (downloaded and converted into DLLAMA_HOME once)."""
    from dllama.default_model import ensure_default_model
    path, tokenizer = ensure_default_model(FloatType.Q40)
    return BenchModel(key, SMOL_LABEL, path, tokenizer)


def llama_1b_header(n_layers: int = 16, seq_len: int = 2048) -> ModelHeader:
    """Llama 3.2 1B's shape, with its rope (theta 500000, Llama 3.1 frequency scaling)."""
    return ModelHeader(arch=ArchType.LLAMA, dim=2048, hidden_dim=8192, n_layers=n_layers, n_heads=32,
                       n_kv_heads=8, vocab_size=128256, seq_len=seq_len, weight_type=FloatType.Q40,
                       hidden_act=HiddenAct.SILU, rope_theta=500000.0, rope_type=RopeType.LLAMA3_1,
                       rope_scaling_factor=32.0, rope_scaling_low_freq_factor=1.0,
                       rope_scaling_high_freq_factor=4.0, rope_scaling_orig_max_seq_len=8192,
                       head_dim=64, norm_epsilon=1e-5)


def llama_1b_label(n_layers: int = 16) -> str:
    return LLAMA_LABEL if n_layers == 16 else f"{LLAMA_LABEL}, {n_layers} layer(s)"


def random_q40(rng: np.random.Generator, stored_shape: tuple[int, ...], chunk_rows: int = 8192) -> np.ndarray:
    """Q40 blocks made directly (quantizing 1.2B floats would take minutes and gigabytes).

    Nibbles are uniform in 1..15, so values (nibble - 8) * d are symmetric around 0 with a
    standard deviation of about 4.3 d; d ~ 0.02 / 8 keeps a row's products with a unit-RMS input
    near 0.5 for dim 2048, so activations stay finite through 16 layers.
    """
    rows, nb = stored_shape
    out = np.empty((rows, nb), dtype=Q40_BLOCK)
    for start in range(0, rows, chunk_rows):  # bounded temporaries for the 128256-row head
        n = min(chunk_rows, rows - start)
        d = 0.02 / 8 * (1.0 + 0.1 * rng.standard_normal((n, nb), dtype=np.float32))
        lo = rng.integers(1, 16, (n, nb, 16), dtype=np.uint8)
        hi = rng.integers(1, 16, (n, nb, 16), dtype=np.uint8)
        out["d"][start:start + n] = d.astype(np.float16)
        out["qs"][start:start + n] = lo | (hi << 4)
    return out


def write_synthetic_model(path: Path, header: ModelHeader, seed: int = 0) -> None:
    """Random weights, written tensor by tensor: at most one tensor (the 1 GB embedding) in memory."""
    rng = np.random.default_rng(seed)
    with ModelWriter(path, header) as writer:
        for spec in tensor_plan(header):
            if spec.float_type == FloatType.Q40:
                values = random_q40(rng, spec.stored_shape)
            elif spec.name.endswith("norm"):
                values = (1.0 + 0.05 * rng.standard_normal(spec.shape, dtype=np.float32)).astype(np.float32)
            else:  # the embedding
                values = 0.02 * rng.standard_normal(spec.shape, dtype=np.float32)
            writer.write(spec.name, values)
            del values


def write_llama_1b(path: Path, n_layers: int = 16) -> ModelHeader:
    """The synthetic Llama-1B-shaped Q40 model at ``path`` (about 1.75 GB with 16 layers), with
    progress on stderr; its header."""
    header = llama_1b_header(n_layers=n_layers)
    say(f"· writing the synthetic Llama-1B-shaped model ({n_layers} layers) to {path}")
    t = time.perf_counter()
    write_synthetic_model(path, header)
    say(f"  {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
    return header


# -- child processes -------------------------------------------------------------------------------

def child_env(threads: int, **extra: str) -> dict[str, str]:
    """A child's environment: ours, the repository on PYTHONPATH, ``threads`` threads for numba
    and BLAS (fixed when they start), and ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    env.update(extra)
    return env


# -- machine and results -----------------------------------------------------------------------------

def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache Linux reports (None elsewhere)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def machine_info(bandwidth: dict[int, float] | None = None) -> dict:
    """The machine, the versions that matter and the date; the measured bandwidths when given."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("numba", "llvmlite", "pyzmq", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
            "last_level_cache_bytes": last_level_cache_bytes(),
            "python": platform.python_version(), "numpy": np.__version__, **versions,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if bandwidth is not None:
        info["bandwidth_gb_s"] = {str(k): v for k, v in bandwidth.items()}
    return info


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (ImportError without matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_results(out: Path, result: dict, draw: Callable[[Path], None] | None) -> None:
    """``result`` as JSON at ``out``, then ``draw(png)`` next to it (skipped with a note when
    matplotlib is missing; ``draw`` None: nothing to chart)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    wrote = f"wrote {out}"
    if draw is not None:
        png = out.with_suffix(".png")
        try:
            draw(png)
            wrote += f" and {png}"
        except ImportError:
            wrote += " (no matplotlib: no chart; pip install '.[bench]')"
    print(wrote)
