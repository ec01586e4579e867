"""Completions: a request (prompt, sampling settings, choices, log-probabilities), what its
generation reports as it runs (``Event``s), and how one sequence turns sampled tokens into text
with stop strings that never leak a character (``Choice``). ``engine.batching`` runs them, many
at once (its ``Completer``: one caller at a time, the chat command)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

from dllama.engine.logprobs import TokenLogprob, token_logprob
from dllama.engine.sampler import Sampler
from dllama.engine.session import Outcome
from dllama.engine.tokenizer import Tokenizer


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 0.8
    top_p: float = 0.9
    seed: int | None = None  # choice i draws with seed + i
    stop: list[str] = field(default_factory=list)
    n: int = 1  # choices: sequences that share the prompt's evaluation
    logprobs: int | None = None  # None: no log-probabilities; k: the token's and the k most likely
    echo: bool = False  # with logprobs: the prompt's tokens' too (evaluated whole, no cache reuse)


# -- what a generation reports, in order: [PromptLogprobs], Piece*/Done per choice, then Ended or Failed
@dataclass
class PromptLogprobs:
    entries: list[TokenLogprob | None]  # one per prompt token; None for the first (nothing predicts it)


@dataclass
class Piece:
    choice: int
    text: str
    logprobs: list[TokenLogprob]  # the tokens whose text this piece completes
    tokens: int = 0  # the choice's tokens so far


@dataclass
class Done:
    choice: int
    finish_reason: str


@dataclass
class Ended:
    outcomes: list[Outcome]  # one per choice


@dataclass
class Failed:
    error: BaseException


Event = Union[PromptLogprobs, Piece, Done, Ended, Failed]


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


class Choice:
    """One sequence of a request: samples its tokens from logits and reports their text."""

    def __init__(self, request: Request, index: int, tokenizer: Tokenizer, end_ids: frozenset[int],
                 limit: int, emit: Callable[[Event], None], outcome: Outcome):
        seed = None if request.seed is None else (request.seed + index) % 2**64
        self.request = request
        self.index = index
        self.sampler = Sampler(request.temperature, request.top_p, seed)
        self.vocab = tokenizer.vocab_size
        self.decoder = tokenizer.stream()
        self.stops = StopStrings(request.stop)
        self.end_ids = end_ids
        self.limit = limit
        self.emit = emit
        self.outcome = outcome
        self.logprobs: list[TokenLogprob] = []  # of tokens whose text is still held back
        self.finished = False

    def take(self, logits: np.ndarray, started: float) -> int | None:
        """Sample the next token from ``logits`` and report its text; the token to feed next, or
        None when the choice has ended (an end token, a stop string, the limit)."""
        if isinstance(logits, np.ndarray):  # else a cluster's summaries, of the first vocab ids
            logits = logits[:self.vocab]  # padding rows past the tokenizer are never sampled
        token = self.sampler.sample(logits)
        if token in self.end_ids:  # not reported: its text is no part of the answer
            self.finish("stop")
            return None
        if self.request.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.request.logprobs))
        outcome = self.outcome
        outcome.completion_tokens += 1
        if outcome.completion_tokens == 1:
            outcome.seconds_to_first_token = time.perf_counter() - started
        text = self.stops.push(self.decoder.push(token))
        if self.stops.hit:
            self.finish("stop", text)
            return None
        if text:
            self.emit(Piece(self.index, text, self.logprobs, outcome.completion_tokens))
            self.logprobs = []
        if outcome.completion_tokens >= self.limit:
            self.finish("length")
            return None
        return token

    def finish(self, reason: str, text: str = "", cancelled: bool = False) -> None:
        """End the choice: the text held back (unless cancelled), then ``Done``."""
        if not cancelled and not self.stops.hit:
            text += self.stops.push(self.decoder.flush())
            text += "" if self.stops.hit else self.stops.flush()
        if self.stops.hit:
            reason = "stop"
        if text or self.logprobs:
            self.emit(Piece(self.index, text, self.logprobs, self.outcome.completion_tokens))
            self.logprobs = []
        self.outcome.finish_reason = reason
        self.outcome.cancelled = cancelled
        self.finished = True
        self.emit(Done(self.index, reason))
