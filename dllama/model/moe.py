"""Mixture of experts (Qwen3-MoE): which experts each token runs, and how their outputs mix."""
from __future__ import annotations

from typing import Callable

import numpy as np


def mix_experts(y: np.ndarray, probs: np.ndarray, n_active: int,
                run_expert: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
    """Keep each token's top ``n_active`` experts by router probability (ties: the lower id),
    renormalize their weights, and sum the experts' outputs. Each expert runs once, on the rows
    of the tokens that chose it: ``run_expert(e, rows)``."""
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :n_active]
    gates = np.take_along_axis(probs, top, axis=-1)
    gates /= gates.sum(axis=-1, keepdims=True)
    out = np.zeros_like(y)
    for e in np.unique(top):
        rows, slot = np.nonzero(top == e)
        out[rows] += gates[rows, slot][:, None] * run_expert(int(e), np.ascontiguousarray(y[rows]))
    return out
