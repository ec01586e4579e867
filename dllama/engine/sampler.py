"""Next-token sampling: argmax at temperature 0, otherwise temperature + top-p (nucleus), as
``kernels.nucleus`` defines the draw."""
from __future__ import annotations

import numpy as np

from dllama.kernels import nucleus
from dllama.kernels.backend import ops
from dllama.model.batch import Draw


class Sampler:
    """The same seed and the same logits always give the same tokens, from a whole row of logits
    or from a cluster's summaries of it (a ``transport.sync.DrawRow``)."""

    def __init__(self, temperature: float = 0.8, topp: float = 0.9, seed: int | None = None):
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < topp <= 1:
            raise ValueError("topp must be in (0, 1]")
        self.temperature = temperature
        self.topp = topp
        self.rng = np.random.default_rng(seed)
        self._ops = ops()

    def draw(self, tokens: int) -> Draw:
        """What a forward must know to let a cluster summarize a row for this sampler."""
        return Draw(float(self.temperature), float(self.topp), tokens)

    def sample(self, logits) -> int:
        whole = isinstance(logits, np.ndarray)
        if self.temperature == 0:
            return int(self._ops.argmax(logits)) if whole else logits.sample(0.0, self.topp, 0.0)
        coin = float(self.rng.random())
        if whole:
            return nucleus.draw_full(logits, self.temperature, self.topp, coin)
        return logits.sample(self.temperature, self.topp, coin)
