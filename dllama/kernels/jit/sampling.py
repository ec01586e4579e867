"""Next-token choice in jitted code: argmax and temperature + nucleus sampling
(``reference.sample_topp`` is the definition)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True)
def argmax(logits: np.ndarray) -> int:
    """Index of the largest value, the first one on ties (as np.argmax)."""
    best = 0
    for i in range(1, logits.shape[0]):
        if logits[i] > logits[best]:
            best = i
    return best


@njit(cache=True)
def sample_topp(logits: np.ndarray, temperature: float, topp: float, coin: float) -> int:
    """Temperature + nucleus sampling with a uniform ``coin`` in [0, 1); see reference.sample_topp."""
    n = logits.shape[0]
    z_max = -np.inf
    for i in range(n):
        z_max = max(z_max, np.float64(logits[i]) / temperature)
    weights = np.empty(n, dtype=np.float64)
    for i in range(n):
        weights[i] = math.exp(np.float64(logits[i]) / temperature - z_max)
    total = 0.0
    for i in range(n):
        total += weights[i]
    if topp >= 1.0:
        target = coin * total
        acc = 0.0
        for i in range(n):
            acc += weights[i]
            if acc > target:
                return i
        return n - 1
    # Only tokens above this weight can belong to the nucleus: while at least one token is
    # heavier, the n - 1 or fewer lighter ones weigh less than (1 - topp) of the total together.
    cutoff = (1.0 - topp) / (n - 1) * total if n > 1 else 0.0
    count = 0
    for i in range(n):
        if weights[i] >= cutoff:
            count += 1
    if count == 0:  # near-uniform weights and topp < 1/n: no token passes, so all are candidates
        cutoff = 0.0
        count = n
    candidates = np.empty(count, dtype=np.int64)
    k = 0
    for i in range(n):
        if weights[i] >= cutoff:
            candidates[k] = i
            k += 1
    order = candidates[np.argsort(-weights[candidates], kind="mergesort")]
    cumulative = np.empty(count, dtype=np.float64)
    acc = 0.0
    for i in range(count):
        acc += weights[order[i]]
        cumulative[i] = acc
    keep = min(int(np.searchsorted(cumulative, topp * total, side="right")) + 1, count)
    chosen = int(np.searchsorted(cumulative[:keep], coin * cumulative[keep - 1], side="right"))
    return int(order[min(chosen, keep - 1)])
