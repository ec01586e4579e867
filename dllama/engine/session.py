"""A model in use: the transformer, its tokenizer, and the tokens its KV cache holds.

Every command goes through the same three functions: ``step`` evaluates tokens at the next
positions (in batches of ``MAX_BATCH``) and returns their logits, ``rewind`` forgets positions,
and ``generate`` is the one decode loop (prompt, sampling, stop conditions, timing and
cancellation) behind ``inference``, ``chat`` and the API; ``perplexity`` scores a text with
``step``. A prompt that starts with what the cache already holds is evaluated from where they
differ (chat turns, API conversations).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from dllama.engine.cluster import CLUSTER_FAILURES
from dllama.engine.sampler import Sampler
from dllama.engine.tokenizer import Tokenizer
from dllama.errors import DllamaError
from dllama.machine import release_memory
from dllama.model.batch import Draw
from dllama.model.forward import MAX_BATCH, Batch, Transformer
from dllama.transport.sync import DrawRow


class ContextFull(DllamaError):
    """The prompt leaves no room to generate in the context."""


@dataclass
class Outcome:
    """What one generation did, filled in as it runs: usage, why it ended, timings."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # the prompt's first tokens already in the KV cache: not evaluated again
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop": an end token (or a stop string, see completion); "length": a limit
    cancelled: bool = False
    eval_seconds: float = 0.0  # evaluating the prompt's new tokens
    pred_tokens: int = 0  # generated tokens fed back to the model
    pred_seconds: float = 0.0
    seconds_to_first_token: float = 0.0
    seconds: float = 0.0
    queue_seconds: float = 0.0  # waiting for a free KV cache slot (the API's batches)

    @property
    def eval_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def eval_tok_s(self) -> float | None:
        return _rate(self.eval_tokens, self.eval_seconds)

    @property
    def pred_tok_s(self) -> float | None:
        return _rate(self.pred_tokens, self.pred_seconds)


def _rate(tokens: int, seconds: float) -> float | None:
    return tokens / seconds if tokens and seconds > 0 else None


def max_vocab_padding(vocab_size: int) -> int:
    """How many rows a model's vocabulary may have past its tokenizer's: padding to a round size
    (Qwen3 pads 151669 tokens to 151936 rows, Qwen2.5 151665 to 152064), not another model's
    tokenizer (Llama 2's 32000 tokens with SmolLM2's 49152 rows)."""
    return max(128, vocab_size // 100)


def check_pair(tokenizer: Tokenizer, vocab_size: int) -> None:
    """A model's vocabulary may be padded past its tokenizer's; the extra rows are never sampled
    (see ``Session.sample``). Fewer rows than tokens, or more than padding explains, is a mismatch."""
    padding = vocab_size - tokenizer.vocab_size
    if padding < 0 or padding > max_vocab_padding(vocab_size):
        raise DllamaError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                          f"has {vocab_size}: they do not belong together"
                          + (f" (a vocabulary padded past its tokenizer has at most "
                             f"{max_vocab_padding(vocab_size)} more rows)" if padding > 0 else ""))


def tokens_for_steps(prompt_tokens: int, steps: int, seq_len: int) -> int:
    """How many tokens ``--steps`` leaves to generate: it counts positions, prompt included, as in
    distributed-llama (and no more than the context holds)."""
    if prompt_tokens == 0:
        raise DllamaError("the prompt is empty")
    limit = min(steps, seq_len)
    if prompt_tokens >= limit:
        raise DllamaError(f"the prompt has {prompt_tokens} tokens, so {limit} positions leave no room to "
                          f"generate (raise --steps or --max-seq-len)")
    return limit - prompt_tokens


def common_prefix(held: list[int], prompt: list[int]) -> int:
    """How many of ``prompt``'s first tokens a KV cache holding ``held`` can keep: all they
    share, except the prompt's last token, which is always evaluated (its logits are needed)."""
    common = 0
    for a, b in zip(held, prompt[:-1]):
        if a != b:
            break
        common += 1
    return common


class Session:
    """The transformer and what each slot of its KV cache holds; ``step``, ``generate`` and
    ``perplexity`` use slot 0, the API's batches (``engine.batching``) all of them."""

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer, cluster=None):
        check_pair(tokenizer, transformer.header.vocab_size)
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.cluster = cluster  # engine.cluster.Cluster when workers compute too
        # What each KV cache slot holds, one token per position.
        self.slots: list[list[int]] = [[] for _ in range(transformer.kv_cache.n_slots)]
        self.rebuilds = 0  # cluster sessions planned again (a worker lost or taken back)

    def close(self) -> None:
        """End the cluster session: the workers free their memory and wait for the next root."""
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    @property
    def seq_len(self) -> int:
        return self.transformer.seq_len

    @property
    def tokens(self) -> list[int]:
        """What slot 0 holds."""
        return self.slots[0]

    @property
    def pos(self) -> int:
        """The next position of slot 0."""
        return len(self.tokens)

    def step(self, tokens: list[int], all_logits: bool = False, draw: Draw | None = None) -> np.ndarray:
        """Evaluate ``tokens`` at the next positions of slot 0, ``MAX_BATCH`` per forward; the
        logits of the last token (or of every one), only for ``draw`` if given (on a cluster,
        then maybe summaries: ``transport.sync.DrawRow``)."""
        if self.pos + len(tokens) > self.seq_len:
            raise DllamaError(f"{self.pos + len(tokens)} tokens do not fit the context of {self.seq_len} "
                              f"(raise --max-seq-len, up to the model's length)")
        outputs = []
        for start in range(0, len(tokens), MAX_BATCH):
            batch = tokens[start:start + MAX_BATCH]
            last = start + MAX_BATCH >= len(tokens)
            outputs.append(self.run(batch, Batch.run(len(batch), self.pos, 0, all_logits, draw if last else None)))
        return np.concatenate(outputs) if all_logits else outputs[-1][0]

    def run(self, tokens: list[int], batch: Batch) -> np.ndarray:
        """One forward of ``batch`` (its copies first); the logits of its logit rows. Each row
        must extend its slot: its position is the next one of the slot (rewind first), so that
        ``slots`` always says what the KV cache holds. On a cluster, a worker lost on the way
        costs a pause, not the generation: the cluster is planned again over the nodes left,
        the KV caches rebuilt from ``slots``, and the forward done again (no sampler is
        touched, so the text is the one it would have been). Rejoining workers are taken back
        here too."""
        held = [len(s) for s in self.slots]
        for src, dst, length in batch.copies:
            held[dst] = length
        for slot, pos in zip(batch.slots.tolist(), batch.positions.tolist()):
            if not 0 <= slot < len(held) or pos != held[slot]:
                raise DllamaError(f"a forward row at position {pos} of slot {slot}, which holds {held[slot]}")
            held[slot] += 1
        cluster = self.cluster
        if cluster is not None and cluster.rejoin_due():
            self._rebuild(cluster.admit)
        while True:
            try:
                logits = self.transformer.forward_batch(tokens, batch)
                break
            except CLUSTER_FAILURES as e:
                if cluster is None:
                    raise
                # Without its traceback: the frames of the failed forward hold the old share.
                self._rebuild(lambda e=e.with_traceback(None): cluster.recover(e))
        for src, dst, length in batch.copies:  # only once the forward is complete
            self.slots[dst][:] = self.slots[src][:length]
        for token, slot in zip(tokens, batch.slots.tolist()):
            self.slots[slot].append(int(token))
        if cluster is not None and isinstance(logits, list):  # rows the workers summarized
            # The session's number, not its transformer: a row kept must not keep an old share.
            made_in = self.rebuilds
            for row, t in zip(logits, batch.logit_rows.tolist()):
                if isinstance(row, DrawRow):
                    row.again = lambda err, t=t: self._row_again(err, made_in, int(tokens[t]), int(batch.slots[t]),
                                                                 int(batch.positions[t]))
        return logits

    def _row_again(self, err: Exception, made_in: int, token: int, slot: int, pos: int) -> np.ndarray:
        """The whole logits of a row whose second round failed (``DrawRow.again``): the cluster
        is planned again, unless that happened since the row was made (``made_in``: ``rebuilds``
        then), and the row's token evaluated once more at its position (it writes the keys and
        values already there)."""
        if self.rebuilds == made_in:
            self._rebuild(lambda: self.cluster.recover(err))
        while True:
            try:
                return self.transformer.forward_batch([token], Batch.run(1, pos, slot))[0]
            except CLUSTER_FAILURES as e:
                self._rebuild(lambda e=e.with_traceback(None): self.cluster.recover(e))

    def _rebuild(self, plan_again) -> None:
        """A new cluster session from ``plan_again``, then every KV cache slot evaluated again
        from ``slots``, in prompt-sized batches; again on a failure meanwhile."""
        self.rebuilds += 1
        while True:
            self.transformer = None  # the old share goes before the new one is built
            self.transformer = plan_again()
            release_memory()
            t0 = time.perf_counter()
            try:
                for slot, tokens in enumerate(self.slots):
                    for start in range(0, len(tokens), MAX_BATCH):
                        chunk = tokens[start:start + MAX_BATCH]
                        self.transformer.forward_batch(chunk, Batch.run(len(chunk), start, slot))
            except CLUSTER_FAILURES as e:
                plan_again = lambda e=e.with_traceback(None): self.cluster.recover(e)  # noqa: E731
                continue
            self.cluster.replayed(time.perf_counter() - t0, sum(len(s) for s in self.slots))
            return

    def rewind(self, pos: int, slot: int = 0) -> None:
        """Forget positions ``pos ..`` of ``slot`` (their keys and values are overwritten when
        evaluated again)."""
        del self.slots[slot][pos:]

    def sample(self, sampler: Sampler, logits: np.ndarray) -> int:
        """The next token, from the ids the tokenizer can spell."""
        if isinstance(logits, np.ndarray):  # else a cluster's summaries of those ids only
            logits = logits[:self.tokenizer.vocab_size]
        return sampler.sample(logits)

    def generate(self, prompt: list[int], sampler: Sampler, outcome: Outcome, max_tokens: int | None = None,
                 end_ids: frozenset[int] | None = None, cancel: threading.Event | None = None) -> Iterator[int]:
        """Yield generated tokens until an end token (``end_ids``, default the tokenizer's EOS ids),
        ``max_tokens``, the end of the context, or ``cancel`` (checked before each token and
        between prompt batches). ``outcome`` is filled in as it goes.

        The KV cache keeps what it shares with ``prompt``; the rest of the prompt is evaluated in
        batches (a row's logits are the same in any batch, so a prompt gets the same logits
        whatever the cache held before). The last token yielded is not fed back (its position
        may not exist, and nobody needs its logits)."""
        if not prompt:
            raise DllamaError("the prompt is empty")
        if len(prompt) >= self.seq_len:
            raise ContextFull(f"the prompt has {len(prompt)} tokens; the context holds {self.seq_len} "
                              f"and needs room for at least one more")
        t0 = time.perf_counter()
        try:
            outcome.prompt_tokens = len(prompt)
            draw = sampler.draw(self.tokenizer.vocab_size)
            evaluated = self._evaluate_prompt(prompt, cancel, draw)
            outcome.eval_seconds = time.perf_counter() - t0
            if evaluated is None:
                outcome.cancelled = True
                return
            outcome.cached_tokens, logits = evaluated
            limit = self.seq_len - len(prompt)
            if max_tokens is not None:
                limit = min(limit, max_tokens)
            end_ids = self.tokenizer.eos_ids if end_ids is None else end_ids
            outcome.finish_reason = "length"
            while outcome.completion_tokens < limit:
                if cancel is not None and cancel.is_set():
                    outcome.cancelled = True
                    return
                token = self.sample(sampler, logits)
                if token in end_ids:
                    outcome.finish_reason = "stop"
                    return
                outcome.completion_tokens += 1
                if outcome.completion_tokens == 1:
                    outcome.seconds_to_first_token = time.perf_counter() - t0
                yield token
                if outcome.completion_tokens >= limit:
                    return
                t = time.perf_counter()
                logits = self.step([token], draw=draw)
                outcome.pred_tokens += 1
                outcome.pred_seconds += time.perf_counter() - t
        finally:
            outcome.seconds = time.perf_counter() - t0

    def _evaluate_prompt(self, prompt: list[int], cancel: threading.Event | None,
                         draw: Draw | None = None) -> tuple[int, np.ndarray] | None:
        """How many of the prompt's tokens the cache held, and the logits of its last token, for
        ``draw`` if given (None when cancelled first)."""
        common = common_prefix(self.tokens, prompt)
        self.rewind(common)
        logits = None
        for start in range(common, len(prompt), MAX_BATCH):
            if cancel is not None and cancel.is_set():
                return None
            logits = self.step(prompt[start:start + MAX_BATCH], draw=draw)
        return common, logits

    def perplexity(self, tokens: list[int]) -> float:
        """exp of the mean negative log-likelihood of tokens 1..N-1 given their prefixes."""
        if len(tokens) < 2:
            raise DllamaError("perplexity needs a prompt of at least 2 tokens")
        self.rewind(0)
        logits = self.step(tokens[:-1], all_logits=True).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll = -log_probs[np.arange(len(tokens) - 1), tokens[1:]]
        return float(np.exp(nll.mean()))


def format_summary(outcome: Outcome, batch_size: int = MAX_BATCH) -> str:
    """distributed-llama's summary of a generation."""
    def rate(tok_s: float | None) -> str:
        return "   tokens/s: -" if tok_s is None else f"   tokens/s: {tok_s:.2f} ({1000 / tok_s:.2f} ms/tok)"

    return "\n".join([
        "Evaluation",
        f"   nBatches: {batch_size}",
        f"    nTokens: {outcome.eval_tokens}",
        rate(outcome.eval_tok_s),
        "Prediction",
        f"    nTokens: {outcome.pred_tokens}",
        rate(outcome.pred_tok_s),
    ])
