"""The root's generation loop: prompt evaluation in batches, then one token per forward."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from dllama.engine.sampler import Sampler
from dllama.engine.tokenizer import Tokenizer
from dllama.errors import DllamaError
from dllama.model.forward import MAX_BATCH, Transformer


@dataclass
class Stats:
    eval_tokens: int = 0
    eval_seconds: float = 0.0
    pred_tokens: int = 0
    pred_seconds: float = 0.0


def check_pair(tokenizer: Tokenizer, vocab_size: int) -> None:
    """A model's vocabulary may be padded past its tokenizer's (Qwen3 pads to a multiple of 128);
    the extra rows are never sampled (see ``sample_token``). Fewer rows than tokens is a mismatch."""
    if tokenizer.vocab_size > vocab_size:
        raise DllamaError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                          f"has {vocab_size}: they do not belong together")


def sample_token(sampler: Sampler, logits: np.ndarray, tokenizer: Tokenizer) -> int:
    """The next token, from the ids the tokenizer can spell."""
    return sampler.sample(logits[:tokenizer.vocab_size])


class Session:
    """A transformer, its tokenizer and the position reached in the KV cache."""

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer, cluster=None):
        check_pair(tokenizer, transformer.header.vocab_size)
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.cluster = cluster  # engine.cluster.Cluster when workers compute too
        self.pos = 0

    def close(self) -> None:
        """End the cluster session: the workers free their memory and wait for the next root."""
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    @property
    def seq_len(self) -> int:
        return self.transformer.seq_len

    def evaluate(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """Feed ``tokens`` from the current position in batches; logits of the last (or all)."""
        if self.pos + len(tokens) > self.seq_len:
            raise DllamaError(f"{self.pos + len(tokens)} tokens do not fit the context of {self.seq_len} "
                              f"(raise --max-seq-len, up to the model's length)")
        outputs = []
        for start in range(0, len(tokens), MAX_BATCH):
            batch = tokens[start:start + MAX_BATCH]
            outputs.append(self.transformer.forward(batch, self.pos, all_logits=all_logits))
            self.pos += len(batch)
        return np.concatenate(outputs) if all_logits else outputs[-1]

    def generate(self, prompt: list[int], steps: int, sampler: Sampler, stats: Stats) -> Iterator[int]:
        """Yield generated tokens until ``steps`` positions are used or an EOS token comes."""
        if not prompt:
            raise DllamaError("the prompt is empty")
        limit = min(steps, self.seq_len)
        if len(prompt) >= limit:
            raise DllamaError(f"the prompt has {len(prompt)} tokens, so {limit} positions leave no room to "
                              f"generate (raise --steps or --max-seq-len)")
        t0 = time.perf_counter()
        logits = self.evaluate(prompt)
        stats.eval_tokens += len(prompt)
        stats.eval_seconds += time.perf_counter() - t0
        while True:
            token = sample_token(sampler, logits, self.tokenizer)
            if self.tokenizer.is_eos(token):
                return
            yield token
            if self.pos + 1 >= limit:
                return  # the next token would have no position left: do not feed this one
            t0 = time.perf_counter()
            logits = self.transformer.forward([token], self.pos)
            self.pos += 1
            stats.pred_tokens += 1
            stats.pred_seconds += time.perf_counter() - t0

    def perplexity(self, tokens: list[int]) -> float:
        """exp of the mean negative log-likelihood of tokens 1..N-1 given their prefixes."""
        if len(tokens) < 2:
            raise DllamaError("perplexity needs a prompt of at least 2 tokens")
        logits = self.evaluate(tokens[:-1], all_logits=True).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll = -log_probs[np.arange(len(tokens) - 1), tokens[1:]]
        return float(np.exp(nll.mean()))


def format_summary(stats: Stats, batch_size: int = MAX_BATCH) -> str:
    def rate(n: int, s: float) -> str:
        if n == 0 or s <= 0:
            return "   tokens/s: -"
        return f"   tokens/s: {n / s:.2f} ({s * 1000 / n:.2f} ms/tok)"

    return "\n".join([
        "Evaluation",
        f"   nBatches: {batch_size}",
        f"    nTokens: {stats.eval_tokens}",
        rate(stats.eval_tokens, stats.eval_seconds),
        "Prediction",
        f"    nTokens: {stats.pred_tokens}",
        rate(stats.pred_tokens, stats.pred_seconds),
    ])
