"""How fast this node decodes: the rate at which its kernels multiply Q40 weights streamed from
memory (what a decode step does, so it folds memory bandwidth and compute into one figure), and
the rate on weights that fit the cache (compute alone). Measured once when a node starts, in
a fraction of a second; ``--split auto`` sizes the slices by the first figure."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dllama.formats.mfile import ModelHeader
from dllama.model.slicing import NodeSlice, node_weight_bytes, plan_slices

AUTO = "auto"  # --split auto

# Weights streamed per measurement: past any cache (64 MB still partly fit this machine's L3);
# filling them and 8 passes take 0.12-0.3 s here.
STREAM_BYTES = 256 << 20
CACHED_BYTES = 512 << 10
DIM = 2048  # the activation's width (a 1B model's)


@dataclass(frozen=True)
class NodeSpeed:
    stream: float  # bytes of Q40 weights multiplied per second, streamed from memory
    cached: float  # the same from the cache: compute alone

    def to_json(self) -> dict:
        return {"stream": self.stream, "cached": self.cached}

    @classmethod
    def from_json(cls, meta) -> NodeSpeed:
        """From a hello reply (untrusted: ValueError unless two positive finite numbers)."""
        if not isinstance(meta, dict):
            raise ValueError("a node's speed must be an object")
        values = [meta.get("stream"), meta.get("cached")]
        if not all(type(v) in (int, float) and np.isfinite(v) and 0 < v < 1e15 for v in values):
            raise ValueError("a node's speed must be two positive numbers")
        return cls(float(values[0]), float(values[1]))

    def describe(self) -> str:
        return f"{self.stream / 1e9:.1f} GB/s of Q40 weights from memory, {self.cached / 1e9:.1f} from cache"


def _best(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def measure() -> NodeSpeed:
    """This process's speed with its kernels' threads (the numba kernels; the NumPy backend's
    rate is measured the same way, through its matmul)."""
    from dllama.kernels.backend import NUMBA, backend, cpu_path

    nb = DIM // 32
    if backend() == NUMBA:
        from dllama.kernels.jit import matmul
        from dllama.kernels.jit.float16 import f16_table
        from dllama.kernels.jit.simd import GROUP_ROWS, Q40_RECORD

        path, table = cpu_path(), f16_table()
        xq, xd, xc = matmul.activation(np.ones((1, DIM), dtype=np.float32), True, table)

        def rate(n_bytes: int, repeats: int) -> float:
            groups = max(1, n_bytes // (nb * Q40_RECORD))
            w = np.full((groups, nb, Q40_RECORD), 0x11, dtype=np.uint8)  # written: real pages
            out = np.empty((1, groups * GROUP_ROWS), dtype=np.float32)
            matmul._linear_int8(w, xq, xd, xc, out, path)
            return w.nbytes / _best(lambda: matmul._linear_int8(w, xq, xd, xc, out, path), repeats)
    else:
        from dllama.kernels import reference

        def rate(n_bytes: int, repeats: int) -> float:
            rows = max(1, n_bytes // (DIM * 4))
            w = np.full((rows, DIM), 0.5, dtype=np.float32)
            x = np.ones((1, DIM), dtype=np.float32)
            return w.nbytes / _best(lambda: reference.matmul(x, w), repeats)

    return NodeSpeed(rate(STREAM_BYTES, 8), rate(CACHED_BYTES, 20))


def plan_by_speed(h: ModelHeader, speeds: list[float], memory: list[int],
                  need: Callable[[NodeSlice], int]) -> tuple[list[NodeSlice], str]:
    """Slices in proportion to ``speeds`` (root first), in sixty-fourths so that a few per cent
    of noise in the measurements keeps the plan (and the workers' slice caches) the same; a
    node whose ``memory`` would not hold its share (``need``) gets less. The plan, and a line
    that says what it was made of and the tokens/s the weights alone allow."""
    weights = [max(1, round(64 * s / sum(speeds))) for s in speeds]
    for _ in range(8):
        plan = plan_slices(h, weights)
        over = [i for i, node in enumerate(plan) if need(node) > memory[i]]
        if not over:
            break
        for i in over:
            weights[i] = max(1, int(weights[i] * 0.9 * memory[i] / need(plan[i])))
    weight_bytes = sum(node_weight_bytes(h, node) for node in plan)
    return plan, (f"💡 Split auto: node speeds {', '.join(f'{s / 1e9:.1f}' for s in speeds)} GB/s of Q40 weights "
                  f"-> slices {':'.join(map(str, weights))}; expected at most {sum(speeds) / weight_bytes:.1f} "
                  f"tokens/s from the weights alone (before sync)")
