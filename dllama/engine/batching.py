"""Continuous batching: many requests at once on one model.

Up to ``parallel`` sequences run at once, each in its own slot of the KV cache. Every step is
one forward (one pass over the weights, and on a cluster one all-gather per block) that carries
the next token of every running sequence plus, in the rows left (``MAX_BATCH`` in all), the next
chunk of the prompts being evaluated: a long prompt is evaluated across several steps, and the
streams already flowing keep flowing meanwhile. Requests that find no free slot wait in arrival
order. A finished sequence leaves its tokens in its slot: a request whose prompt continues them
(the next turn of a conversation) takes that slot when it is free and evaluates only what is new.

A request's ``n`` choices take a slot each; the prompt is evaluated once, in the first, and the
others get a copy of its KV cache with their first decode step. Every row's logits are the same
bits in any batch (the kernels are batch-invariant), so a greedy or seeded request gives the
same text alone or beside others.

One thread owns the session and alone touches the model and the cluster: the one that calls
``serve`` (the API's main thread) or ``pump`` (the chat command). It should be the main thread:
numba's OpenMP pool starts a parallel loop in about 6 us from the main thread and 60 us from
any other (libgomp keeps only the main thread's workers spinning), which on SmolLM2 made every
token three times slower. ``start`` serves on a thread of its own, for tests.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Iterator

import numpy as np

from dllama.engine.cluster import CLUSTER_FAILURES
from dllama.engine.completion import Choice, Ended, Event, Failed, Piece, PromptLogprobs, Request
from dllama.engine.logprobs import token_logprob
from dllama.engine.session import ContextFull, Outcome, Session, common_prefix
from dllama.errors import DllamaError
from dllama.model.batch import MAX_BATCH, Batch, Draw

DEFAULT_PARALLEL = 4
# At most this many sequences at once, so that every step has rows left for a prompt's chunk.
MAX_PARALLEL = MAX_BATCH // 2
# How often an idle engine checks that the cluster is still whole.
IDLE_PROBE_SECONDS = 1.0


class Unavailable(DllamaError):
    """The model cannot run any more (the cluster broke, or the server is stopping)."""


class _Job:
    """A request in the engine: waiting, evaluating its prompt, or decoding its choices."""

    def __init__(self, request: Request, emit: Callable[[Event], None], cancel: threading.Event, number: int):
        self.request = request
        self.emit = emit
        self.cancel = cancel
        self.number = number
        self.submitted = time.perf_counter()
        self.admitted = 0.0
        self.outcomes = [Outcome(prompt_tokens=len(request.prompt)) for _ in range(request.n)]
        self.choices: list[Choice] = []
        self.slots: list[int] = []  # one per choice; the first evaluates the prompt
        self.evaluated = 0  # prompt tokens in the first slot's cache
        self.next_tokens: list[int | None] = []  # per choice: the token its next row feeds
        self.copied = False  # the other choices' slots hold the prompt
        self.echo: list = [None]  # the prompt's log-probabilities (echo), the first token's None

    @property
    def prompt_done(self) -> bool:
        return self.evaluated == len(self.request.prompt)

    @property
    def wants_echo(self) -> bool:
        return self.request.echo and self.request.logprobs is not None


class BatchEngine:
    def __init__(self, session: Session, end_ids: frozenset[int], parallel: int | None = None,
                 log: Callable[[str], None] | None = None):
        n_slots = session.transformer.kv_cache.n_slots
        self.parallel = min(parallel or n_slots, n_slots)
        if not 0 < self.parallel <= MAX_PARALLEL:
            raise DllamaError(f"parallel sequences must be 1 to {MAX_PARALLEL}")
        self.session = session
        self.end_ids = frozenset(end_ids) | session.tokenizer.eos_ids
        self.log = log or (lambda line: None)
        self.cond = threading.Condition()
        self.queue: deque[_Job] = deque()  # waiting for slots, in arrival order
        self.running: list[_Job] = []  # in admission order
        self.busy: set[int] = set()  # slots of running jobs
        self.last_used = [0.0] * self.parallel
        self.broken: str | None = None  # why the model can no longer run
        self.closing = False
        self.numbers = 0
        self.forwards = 0
        self.thread: threading.Thread | None = None  # start()'s

    # -- callers' side (any thread) -----------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def active(self) -> int:
        return len(self.running)

    def submit(self, request: Request, emit: Callable[[Event], None], cancel: threading.Event) -> None:
        """Queue ``request``; its events go to ``emit`` (called on the engine's thread; it must
        not block). Setting ``cancel`` ends it after its current step, whether it waits or runs."""
        if not request.prompt:
            raise DllamaError("the prompt is empty")
        if len(request.prompt) >= self.session.seq_len:
            raise ContextFull(f"the prompt has {len(request.prompt)} tokens; the context holds "
                              f"{self.session.seq_len} and needs room for at least one more")
        if not 0 < request.n <= self.parallel:
            raise DllamaError(f"n must be 1 to {self.parallel} (the server's --parallel)")
        with self.cond:
            if self.broken is not None:
                raise Unavailable(self.broken)
            if self.closing:
                raise Unavailable("the server is shutting down")
            self.numbers += 1
            self.queue.append(_Job(request, emit, cancel, self.numbers))
            self.cond.notify()

    def close(self) -> None:
        """``serve`` returns once the jobs in the engine have ended (cancel them first to
        hurry); a thread from ``start`` is joined. Safe in a signal handler."""
        with self.cond:  # a reentrant lock: the handler may interrupt the serving thread inside it
            self.closing = True
            self.cond.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def start(self) -> BatchEngine:
        """Serve on a thread of its own (slower with numba's OpenMP: see the module's note)."""
        self.thread = threading.Thread(target=self.serve, name="dllama-batching", daemon=True)
        self.thread.start()
        return self

    # -- the serving thread -------------------------------------------------------------------
    def serve(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Run the jobs submitted, on this thread, until ``close`` (or ``stop()``, asked when
        idle) and the jobs in the engine have ended."""
        while True:
            with self.cond:
                while not self.queue and not self.running:
                    if self.closing or stop():
                        return
                    if not self.cond.wait(IDLE_PROBE_SECONDS):
                        self._probe()
            self.pump()

    def pump(self) -> bool:
        """Start what can start and run one step, on this thread, without waiting; whether any
        job is still waiting or running."""
        with self.cond:
            try:
                self._admit()
            except BaseException as e:  # noqa: BLE001 - whatever breaks, no request waits forever
                self._failed(e)
        try:
            self._drop_cancelled()
            if self.running:
                self._step()
        except BaseException as e:  # noqa: BLE001
            self._failed(e)
            if not isinstance(e, Exception):  # Ctrl-C, exit: after every job has heard of it
                raise
        return bool(self.queue or self.running)

    def _probe(self) -> None:
        """While idle: is the cluster still whole? (Only this thread may touch its sockets.)"""
        cluster = self.session.cluster
        if cluster is not None and self.broken is None and not cluster.alive():
            self.broken = cluster.broken or "a worker of the cluster is gone"
            self.log(f"⚠️  the model is unavailable: {self.broken}")

    def _admit(self) -> None:
        """Start the waiting jobs, in order, while the first finds enough free slots."""
        while self.queue:
            job = self.queue[0]
            if job.cancel.is_set() or self.broken is not None:
                self.queue.popleft()
                self._end_unstarted(job)
                continue
            free = [s for s in range(self.parallel) if s not in self.busy]
            if len(free) < job.request.n:
                return
            self.queue.popleft()
            try:
                self._start(job, free)
            except Exception as e:  # noqa: BLE001 - the request hears why; the others go on
                if job in self.running:
                    self.running.remove(job)
                self.busy.difference_update(job.slots)
                job.emit(Failed(e))

    def _end_unstarted(self, job: _Job) -> None:
        if self.broken is not None:
            job.emit(Failed(Unavailable(self.broken)))
            return
        for outcome in job.outcomes:
            outcome.cancelled = True
            outcome.finish_reason = "length"
            outcome.queue_seconds = time.perf_counter() - job.submitted
        job.emit(Ended(job.outcomes))

    def _start(self, job: _Job, free: list[int]) -> None:
        request, session = job.request, self.session
        prompt = request.prompt
        # The prompt's slot: the free one whose sequence it continues furthest, else the least
        # recently used (a prompt that shares a few tokens with a conversation, such as its
        # system prompt, does not take that conversation's slot).
        shared = {s: common_prefix(session.slots[s], prompt) for s in free}
        continued = [s for s in free if not job.wants_echo and 2 * shared[s] >= len(session.slots[s])]
        first = max(continued, key=lambda s: (shared[s], -self.last_used[s])) if continued else \
            min(free, key=lambda s: self.last_used[s])
        common = 0 if job.wants_echo else shared[first]  # echo: every prompt token's logits are needed
        others = sorted((s for s in free if s != first), key=lambda s: self.last_used[s])[:request.n - 1]
        job.slots = [first] + others
        self.busy.update(job.slots)
        session.rewind(common, first)
        job.evaluated = common
        job.admitted = time.perf_counter()
        limit = session.seq_len - len(prompt)
        if request.max_tokens is not None:
            limit = min(limit, request.max_tokens)
        for i, outcome in enumerate(job.outcomes):
            outcome.cached_tokens = common
            outcome.queue_seconds = job.admitted - job.submitted
        job.choices = [Choice(request, i, session.tokenizer, self.end_ids, limit, job.emit, job.outcomes[i])
                       for i in range(request.n)]
        job.next_tokens = [None] * request.n
        self.running.append(job)
        self.log(f"🧵 request {job.number} on slot{'s' if request.n > 1 else ''} {', '.join(map(str, job.slots))}: "
                 f"{len(prompt)} prompt tokens ({common} cached), waited {job.admitted - job.submitted:.2f} s; "
                 f"{len(self.running)} running, {len(self.queue)} waiting")

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.running if j.cancel.is_set()]:
            for choice in job.choices:
                if not choice.finished:
                    choice.finish("length", cancelled=True)
            self._end(job)

    def _end(self, job: _Job, error: BaseException | None = None) -> None:
        """Free the job's slots (they keep what they hold, for the next prompt that continues it)."""
        now = time.perf_counter()
        self.running.remove(job)
        for slot in job.slots:
            self.busy.discard(slot)
            self.last_used[slot] = now
        for outcome in job.outcomes:
            outcome.seconds = now - job.admitted
        if error is not None:
            how = f"failed: {error}"
        else:
            out = sum(o.completion_tokens for o in job.outcomes)
            how = ("cancelled" if any(o.cancelled for o in job.outcomes) else
                   "/".join(sorted({o.finish_reason for o in job.outcomes}))) + f", {out} tokens out"
        job.emit(Failed(error) if error is not None else Ended(job.outcomes))
        self.log(f"🧵 request {job.number} ended ({how}) in {now - job.admitted:.2f} s; "
                 f"slot{'s' if len(job.slots) > 1 else ''} {', '.join(map(str, job.slots))} free")

    def _step(self) -> None:
        """One forward: the next token of every decoding choice, then prompt chunks in the rows left."""
        tokens: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        takers: list[Callable[[np.ndarray], None]] = []  # one per logit row
        draws: list[Draw | None] = []  # what each logit row is for (None: the whole row)
        vocab = self.session.tokenizer.vocab_size
        copies: list[tuple[int, int, int]] = []
        decoding: list[tuple[_Job, int]] = []
        session = self.session
        for job in self.running:
            if not job.prompt_done:
                continue
            for i, token in enumerate(job.next_tokens):
                if token is None:
                    continue
                slot = job.slots[i]
                if i > 0 and not job.copied:
                    copies.append((job.slots[0], slot, len(job.request.prompt)))
                    pos = len(job.request.prompt)
                else:
                    pos = len(session.slots[slot])
                logit_rows.append(len(tokens))
                takers.append(lambda logits, job=job, i=i: self._take(job, i, logits))
                draws.append(None if job.request.logprobs is not None else job.choices[i].sampler.draw(vocab))
                tokens.append(token)
                slots.append(slot)
                positions.append(pos)
                decoding.append((job, i))
        prompt_chunks: list[tuple[_Job, int]] = []
        for job in self.running:
            room = MAX_BATCH - len(tokens)
            if job.prompt_done or room == 0:
                continue
            prompt = job.request.prompt
            start = job.evaluated
            chunk = prompt[start:start + room]
            for k, token in enumerate(chunk):
                p = start + k
                last = p == len(prompt) - 1
                if last or (job.wants_echo and p + 1 < len(prompt)):
                    logit_rows.append(len(tokens))
                    takers.append(lambda logits, job=job, p=p, last=last: self._prompt_logits(job, p, last, logits))
                    whole = job.wants_echo or job.request.logprobs is not None
                    draws.append(None if whole else job.choices[0].sampler.draw(vocab))
                tokens.append(token)
                slots.append(job.slots[0])
                positions.append(p)
            prompt_chunks.append((job, len(chunk)))
        if not tokens:
            return
        batch = Batch.of(slots, positions, logit_rows, copies, draws)
        t0 = time.perf_counter()
        try:
            logits = session.run(tokens, batch)
        except Exception as e:  # every job in the forward hears of it (Ctrl-C and exits: in pump)
            self._failed(e.with_traceback(None))
            return
        seconds = time.perf_counter() - t0
        self.forwards += 1
        for job, n in prompt_chunks:
            job.evaluated += n
            job.outcomes[0].eval_seconds += seconds
        for job, i in decoding:
            job.outcomes[i].pred_tokens += 1
            job.outcomes[i].pred_seconds += seconds
            if i > 0:
                job.copied = True
        for row, take in enumerate(takers):
            take(logits[row])
        for job in [j for j in self.running if all(c.finished for c in j.choices)]:
            self._end(job)

    def _prompt_logits(self, job: _Job, p: int, last: bool, logits: np.ndarray) -> None:
        """The logits after prompt token ``p``: the next prompt token's log-probability (echo),
        and after the last one, every choice's first token."""
        if job.wants_echo and p + 1 < len(job.request.prompt):
            vocab = self.session.tokenizer.vocab_size
            job.echo.append(token_logprob(logits[:vocab], job.request.prompt[p + 1], job.request.logprobs))
        if not last:
            return
        if job.wants_echo:
            job.emit(PromptLogprobs(job.echo))
        for outcome in job.outcomes[1:]:
            outcome.eval_seconds = job.outcomes[0].eval_seconds
        for i in range(len(job.choices)):
            self._take(job, i, logits)

    def _take(self, job: _Job, i: int, logits: np.ndarray) -> None:
        choice = job.choices[i]
        if job.cancel.is_set():
            choice.finish("length", cancelled=True)
            job.next_tokens[i] = None
            return
        job.next_tokens[i] = choice.take(logits, job.admitted)

    def _failed(self, error: BaseException) -> None:
        """A step failed (its forward, mostly): every running job fails with it. A cluster that
        could not recover makes the model unavailable; anything else only costs these jobs."""
        cluster = self.session.cluster
        if isinstance(error, CLUSTER_FAILURES) or (cluster is not None and cluster.broken is not None):
            self.broken = (cluster.broken if cluster is not None and cluster.broken else None) or str(error)
            self.log(f"⚠️  the model is unavailable: {self.broken}")
        for job in list(self.running):
            self._end(job, error)
        for slot in range(self.parallel):  # what the failed forward wrote is not what they say
            self.session.rewind(0, slot)


class Completer:
    """The engine for one caller at a time (the chat command, tests), run on the caller's
    thread: text in, text out."""

    def __init__(self, session: Session, end_ids: frozenset[int]):
        self.engine = BatchEngine(session, end_ids, parallel=1)
        self.session = session
        self.tokenizer = session.tokenizer

    @property
    def seq_len(self) -> int:
        return self.session.seq_len

    def close(self) -> None:
        self.engine.close()

    def complete(self, request: Request, outcome: Outcome, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the answer's text (its first choice) as it is generated; ``outcome`` is filled
        in at the end. Raises what the generation raised."""
        events: deque[Event] = deque()
        cancel = cancel or threading.Event()
        self.engine.submit(request, events.append, cancel)
        ended = False
        try:
            while True:
                if not events:
                    self.engine.pump()
                    continue
                event = events.popleft()
                if isinstance(event, Piece) and event.choice == 0 and event.text:
                    yield event.text
                elif isinstance(event, Ended):
                    ended = True
                    outcome.__dict__.update(event.outcomes[0].__dict__)
                    return
                elif isinstance(event, Failed):
                    ended = True
                    raise event.error
        finally:
            if not ended:  # the caller stopped reading: stop the generation, free its slot
                cancel.set()
                while self.engine.pump():
                    pass
