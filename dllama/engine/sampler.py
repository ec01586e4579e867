"""Next-token sampling: argmax at temperature 0, otherwise temperature + top-p (nucleus)."""
from __future__ import annotations

import numpy as np

from dllama.kernels.backend import ops


class Sampler:
    """The same seed and the same logits always give the same tokens (``reference.sample_topp``
    defines the draw)."""

    def __init__(self, temperature: float = 0.8, topp: float = 0.9, seed: int | None = None):
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < topp <= 1:
            raise ValueError("topp must be in (0, 1]")
        self.temperature = temperature
        self.topp = topp
        self.rng = np.random.default_rng(seed)
        self._ops = ops()

    def sample(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(self._ops.argmax(logits))
        return int(self._ops.sample_topp(np.ascontiguousarray(logits, dtype=np.float32), float(self.temperature),
                                         float(self.topp), float(self.rng.random())))
