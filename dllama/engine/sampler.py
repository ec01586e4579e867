"""Next-token sampling: argmax at temperature 0, otherwise temperature + top-p (nucleus)."""
from __future__ import annotations

import numpy as np


class Sampler:
    """The same seed and the same logits always give the same tokens."""

    def __init__(self, temperature: float = 0.8, topp: float = 0.9, seed: int | None = None):
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < topp <= 1:
            raise ValueError("topp must be in (0, 1]")
        self.temperature = temperature
        self.topp = topp
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        coin = self.rng.random()
        if self.topp >= 1:
            return int(min(np.searchsorted(np.cumsum(p), coin, side="right"), len(p) - 1))
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        # Keep the smallest prefix whose mass exceeds topp (at least one token).
        keep = int(np.searchsorted(cumulative, self.topp, side="right")) + 1
        keep = min(keep, len(order))
        chosen = np.searchsorted(cumulative[:keep], coin * cumulative[keep - 1], side="right")
        return int(order[min(chosen, keep - 1)])
