"""Completions for chat and the API: one generation at a time on one Session (whose KV cache
keeps the longest common prefix of successive prompts), turned into text, with stop strings
that never leak a character."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

from dllama.engine.sampler import Sampler
from dllama.engine.session import Outcome, Session


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 0.8
    top_p: float = 0.9
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


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
    """The model behind chat and the API: text in (a prompt's tokens), text out, as it is
    generated. Not thread-safe: callers take turns (the API queues requests)."""

    def __init__(self, session: Session, end_ids: frozenset[int]):
        self.session = session
        self.tokenizer = session.tokenizer
        self.end_ids = frozenset(end_ids) | self.tokenizer.eos_ids

    @property
    def seq_len(self) -> int:
        return self.session.seq_len

    def complete(self, request: Request, outcome: Outcome, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the answer's text as it is generated; ``outcome`` is filled in as it goes."""
        sampler = Sampler(request.temperature, request.top_p, request.seed)
        stream = self.tokenizer.stream()
        stops = StopStrings(request.stop)
        tokens = self.session.generate(request.prompt, sampler, outcome, request.max_tokens, self.end_ids, cancel)
        try:
            for token in tokens:
                text = stops.push(stream.push(token))
                if text:
                    yield text
                if stops.hit:
                    outcome.finish_reason = "stop"
                    return  # the token that completed the stop string is not fed
        finally:
            tokens.close()
        tail = stops.push(stream.flush())
        tail += "" if stops.hit else stops.flush()
        if stops.hit:
            outcome.finish_reason = "stop"
        if tail:
            yield tail
