"""Greedy next-token choice in jitted code (temperature and top-p draws: ``kernels.nucleus``)."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def argmax(logits: np.ndarray) -> int:
    """Index of the largest value, the first one on ties (as np.argmax)."""
    best = 0
    for i in range(1, logits.shape[0]):
        if logits[i] > logits[best]:
            best = i
    return best
