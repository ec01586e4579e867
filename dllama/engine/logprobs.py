"""Log-probabilities of generated (or prompt) tokens, as the OpenAI API reports them.

They are the log-softmax of the logits the sampler saw, over the tokens the tokenizer can
spell, *before* temperature and top-p: the model's own distribution, whatever the sampling
settings (what OpenAI reports too, and what evaluation tools expect)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# OpenAI's limits: top_logprobs (chat) up to 20, logprobs (completions) up to 5.
MAX_TOP_CHAT = 20
MAX_TOP_COMPLETIONS = 5


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens, best first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float64: the log-probabilities sum to 1 to within rounding whatever the logits' range."""
    z = logits.astype(np.float64)
    z -= z.max()
    return z - np.log(np.exp(z).sum())


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` and the ``top`` most likely tokens'."""
    lp = log_softmax(logits)
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-lp, top - 1)[:top]
        ids = ids[np.lexsort((ids, -lp[ids]))]  # best first; ties by id, so the order is stable
        best = [(int(i), float(lp[i])) for i in ids]
    return TokenLogprob(int(token), float(lp[token]), best)
