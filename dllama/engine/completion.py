"""Completions for chat and the API: one generation at a time on one Session, with the KV cache
reused across requests (only the tokens after the longest common prefix are evaluated), stop
strings, token limits and cancellation between tokens."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from dllama.engine.generate import Session, sample_token
from dllama.engine.sampler import Sampler
from dllama.errors import DllamaError
from dllama.model.forward import MAX_BATCH


class ContextFull(DllamaError):
    """The prompt leaves no room to generate in the context."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 0.8
    top_p: float = 0.9
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """What a finished (or stopped) generation did; OpenAI's usage fields come from here."""

    finish_reason: str = "stop"  # "stop": end of turn or a stop string; "length": a token limit
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cancelled: bool = False
    seconds_to_first_token: float = 0.0
    seconds: float = 0.0


class StopStrings:
    """Finds the first stop string in streamed text and holds back any tail that could still
    become one, so that no part of a stop string is ever sent."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Text safe to emit now."""
        self.pending += text
        # The stop string that is complete first, as if text came one character at a time
        # (so the result does not depend on how tokens cut the text).
        ends = [(i + len(s), i) for s in self.stops for i in [self.pending.find(s)] if i >= 0]
        if ends:
            self.hit = True
            out, self.pending = self.pending[:min(ends)[1]], ""
            return out
        keep = 0
        for s in self.stops:  # the longest tail of pending that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Completer:
    """The model behind chat and the API. Not thread-safe: callers take turns (the API queues
    requests)."""

    def __init__(self, session: Session, end_ids: frozenset[int]):
        self.session = session
        self.tokenizer = session.tokenizer
        self.end_ids = frozenset(end_ids) | self.tokenizer.eos_ids
        self.cached: list[int] = []  # tokens whose keys and values are in the KV cache, in order

    @property
    def seq_len(self) -> int:
        return self.session.seq_len

    def _evaluate_prompt(self, prompt: list[int], cancel: threading.Event | None) -> tuple[int, np.ndarray] | None:
        """Bring the KV cache to ``prompt``; return how many of its tokens were reused and the
        last token's logits (None when cancelled first; a long prompt is cancellable between
        batches). The last token is
        always evaluated alone, so that a repeated request computes the same logits whether
        its prefix was cached or not (batches round differently)."""
        common = 0
        for a, b in zip(self.cached, prompt[:-1]):
            if a != b:
                break
            common += 1
        self.cached = self.cached[:common]
        self.session.pos = common
        try:
            for start in range(common, len(prompt) - 1, MAX_BATCH):
                if cancel is not None and cancel.is_set():
                    return None
                batch = prompt[start:min(start + MAX_BATCH, len(prompt) - 1)]
                self.session.evaluate(batch)
                self.cached.extend(batch)
            logits = self.session.evaluate(prompt[-1:])
        except BaseException:
            self.cached = []  # the cache holds an unknown state now
            self.session.pos = 0
            raise
        self.cached.append(prompt[-1])
        return common, logits

    def complete(self, request: Request, outcome: Outcome, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the answer's text as it is generated; ``outcome`` is filled in as it goes."""
        prompt = request.prompt
        if not prompt:
            raise DllamaError("the prompt is empty")
        if len(prompt) >= self.seq_len:
            raise ContextFull(f"the prompt has {len(prompt)} tokens; the context holds {self.seq_len} "
                              f"and needs room for at least one more")
        t0 = time.perf_counter()
        outcome.prompt_tokens = len(prompt)
        evaluated = self._evaluate_prompt(prompt, cancel)
        if evaluated is None:
            outcome.cancelled = True
            return
        outcome.cached_tokens, logits = evaluated
        limit = self.seq_len - len(prompt)
        if request.max_tokens is not None:
            limit = min(limit, request.max_tokens)
        sampler = Sampler(request.temperature, request.top_p, request.seed)
        stream = self.tokenizer.stream()
        stops = StopStrings(request.stop)
        outcome.finish_reason = "length"
        while outcome.completion_tokens < limit:
            if cancel is not None and cancel.is_set():
                outcome.cancelled = True
                break
            token = sample_token(sampler, logits, self.tokenizer)
            if token in self.end_ids:
                outcome.finish_reason = "stop"
                break
            outcome.completion_tokens += 1
            if outcome.completion_tokens == 1:
                outcome.seconds_to_first_token = time.perf_counter() - t0
            text = stops.push(stream.push(token))
            if text:
                yield text
            if stops.hit:
                outcome.finish_reason = "stop"
                break
            if outcome.completion_tokens >= limit or self.session.pos >= self.seq_len:
                break  # no position left for this token: do not feed it
            logits = self.session.transformer.forward([token], self.session.pos)
            self.session.pos += 1
            self.cached.append(token)
        if not stops.hit:
            tail = stops.push(stream.flush())
            tail += "" if stops.hit else stops.flush()
            if stops.hit:
                outcome.finish_reason = "stop"
            if tail:
                yield tail
        outcome.seconds = time.perf_counter() - t0
