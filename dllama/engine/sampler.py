"""Next-token sampling: argmax at temperature 0, otherwise temperature + top-p (nucleus)."""
from __future__ import annotations

import numpy as np

from dllama.kernels.backend import NUMBA, backend


def sample_topp(logits: np.ndarray, temperature: float, topp: float, coin: float) -> int:
    """The NumPy definition of ``kernels.jit.sample_topp``: a token for a uniform ``coin``.

    Weights are exp((logit - max) / temperature) in float64. The nucleus is the shortest prefix
    of the tokens sorted by weight (ties keep id order) whose cumulative weight exceeds
    ``topp`` of the total; ``coin`` picks within it. While some token weighs at least
    (1 - topp) / (n - 1) of the total, the lighter ones weigh less than 1 - topp together and
    cannot be in the nucleus, so only the heavier ones are sorted: a vocabulary of 150k costs a
    few hundred comparisons, not a full sort.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    weights = np.exp(z - z.max())
    total = float(np.cumsum(weights)[-1])
    n = len(weights)
    if topp >= 1:
        return int(min(np.searchsorted(np.cumsum(weights), coin * total, side="right"), n - 1))
    cutoff = (1.0 - topp) / (n - 1) * total if n > 1 else 0.0
    candidates = np.nonzero(weights >= cutoff)[0]
    if len(candidates) == 0:  # the bound needs one heavier token; near-uniform weights have none
        candidates = np.arange(n)
    order = candidates[np.argsort(-weights[candidates], kind="stable")]
    cumulative = np.cumsum(weights[order])
    keep = min(int(np.searchsorted(cumulative, topp * total, side="right")) + 1, len(order))
    chosen = int(np.searchsorted(cumulative[:keep], coin * cumulative[keep - 1], side="right"))
    return int(order[min(chosen, keep - 1)])


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
        if backend() == NUMBA:
            from dllama.kernels import jit
            self._argmax, self._sample_topp = jit.argmax, jit.sample_topp
        else:
            self._argmax, self._sample_topp = np.argmax, sample_topp

    def sample(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(self._argmax(logits))
        return int(self._sample_topp(np.ascontiguousarray(logits, dtype=np.float32), float(self.temperature),
                                     float(self.topp), float(self.rng.random())))
