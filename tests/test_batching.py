"""Continuous batching on the real model: requests that run together get the text they get alone,
choices share their prompt, log-probabilities are the logits' log-softmax, cancelled requests
free their slots, waiting ones start in order, and conversations find their slot again."""
import queue
import threading

import numpy as np
import pytest

from dllama.default_model import ensure_default_model
from dllama.engine.batching import BatchEngine
from dllama.engine.completion import Done, Ended, Failed, Piece, PromptLogprobs, Request
from dllama.engine.session import Session
from dllama.engine.tokenizer import Tokenizer
from dllama.errors import DllamaError
from dllama.formats.mfile import ModelFile
from dllama.kernels.quants import FloatType
from dllama.model.batch import Batch
from dllama.model.forward import Transformer

SEQ_LEN = 256


def make_engine(buffer_type=FloatType.F32, parallel=4):
    model, tokenizer = ensure_default_model()
    tok = Tokenizer.load(tokenizer)
    tr = Transformer(ModelFile(model), seq_len=SEQ_LEN, buffer_type=buffer_type, n_slots=parallel)
    return BatchEngine(Session(tr, tok), frozenset(), parallel).start()


@pytest.fixture(scope="module")
def engine():
    e = make_engine()
    yield e
    e.close()


class Run:
    """One submitted request and what it reported."""

    def __init__(self, engine, request, cancel=None):
        self.events = queue.Queue()
        self.cancel = cancel or threading.Event()
        self.texts = [""] * request.n
        self.logprobs = [[] for _ in range(request.n)]
        self.finish = [None] * request.n
        self.prompt_logprobs = None
        self.started = threading.Event()  # the first piece arrived
        self.error = None
        engine.submit(request, self.events.put, self.cancel)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def wait(self, timeout=300):
        self.reader.join(timeout)
        assert not self.reader.is_alive(), "the request did not end in time"
        if self.error is not None:
            raise self.error
        return self

    def _read(self):
        while True:
            event = self.events.get()
            if isinstance(event, Piece):
                self.texts[event.choice] += event.text
                self.logprobs[event.choice] += event.logprobs
                self.started.set()
            elif isinstance(event, Done):
                self.finish[event.choice] = event.finish_reason
            elif isinstance(event, PromptLogprobs):
                self.prompt_logprobs = event.entries
            elif isinstance(event, Failed):
                self.error = event.error
                return
            elif isinstance(event, Ended):
                self.outcomes = event.outcomes
                return


def prompts(tok):
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 8) + " Then the fox"
    return [tok.encode("The capital of France is"), tok.encode("Once upon a time, in a small village,"),
            tok.encode("def fibonacci(n):"), tok.encode(long)]


def requests(tok):
    a, b, c, d = prompts(tok)
    return [Request(a, 24, temperature=0.0), Request(b, 24, 0.8, 0.9, seed=7), Request(c, 20, 1.0, 0.95, seed=123),
            Request(d, 16, temperature=0.0), Request(b, 12, 0.8, 0.9, seed=8, stop=[","])]


@pytest.mark.slow
@pytest.mark.parametrize("buffer_type", [FloatType.F32, FloatType.Q80], ids=["f32", "q80"])
def test_requests_together_give_their_solo_text(buffer_type):
    engine = make_engine(buffer_type)
    try:
        tok = engine.session.tokenizer
        reqs = requests(tok)
        solo = [Run(engine, r).wait().texts[0] for r in reqs]
        # Together (5 requests, 4 slots: the last waits), the long prompt evaluated in chunks
        # while the others decode.
        runs = [Run(engine, r) for r in reqs]
        together = [run.wait().texts[0] for run in runs]
        assert together == solo
        assert all(len(t) > 0 for t in solo)
        assert runs[-1].outcomes[0].queue_seconds > 0  # it waited for a slot
    finally:
        engine.close()


@pytest.mark.slow
def test_choices_share_the_prompt_and_draw_with_seed_plus_index(engine):
    tok = engine.session.tokenizer
    prompt = tok.encode("My favourite colour is")
    run = Run(engine, Request(prompt, 12, 0.9, 0.95, seed=40, n=3)).wait()
    for i in range(3):
        alone = Run(engine, Request(prompt, 12, 0.9, 0.95, seed=40 + i)).wait()
        assert run.texts[i] == alone.texts[0]
    assert run.finish == ["length"] * 3 or all(f in ("stop", "length") for f in run.finish)
    greedy = Run(engine, Request(prompt, 10, 0.0, n=3)).wait()
    assert greedy.texts[0] == greedy.texts[1] == greedy.texts[2]
    with pytest.raises(DllamaError, match="n must be"):
        Run(engine, Request(prompt, 4, n=5))


def reference_log_softmax(tokens, upto):
    """log-softmax of the logits after each of tokens[:upto], by a model of its own."""
    model, _ = ensure_default_model()
    logits = Transformer(ModelFile(model), seq_len=SEQ_LEN).forward(tokens[:upto], 0, all_logits=True)
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@pytest.mark.slow
def test_logprobs_are_the_log_softmax_of_the_logits(engine):
    tok = engine.session.tokenizer
    prompt = tok.encode("The Eiffel Tower is in")
    run = Run(engine, Request(prompt, 8, temperature=0.0, logprobs=3, echo=True)).wait()
    entries = run.logprobs[0]
    generated = [e.token for e in entries]
    want = reference_log_softmax(prompt + generated, len(prompt) + len(generated) - 1)
    for k, e in enumerate(entries):
        row = want[len(prompt) - 1 + k][:tok.vocab_size]
        assert e.logprob == pytest.approx(row[e.token], abs=1e-4)
        assert [t for t, _ in e.top] == list(np.argsort(-row, kind="stable")[:3])
        assert e.top[0][0] == e.token  # greedy: the chosen token is the most likely
        assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
    # echo: the prompt's tokens, the first with nothing to predict it
    assert run.prompt_logprobs[0] is None and len(run.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        assert run.prompt_logprobs[j].token == prompt[j]
        assert run.prompt_logprobs[j].logprob == pytest.approx(want[j - 1][prompt[j]], abs=1e-4)


@pytest.mark.slow
def test_a_cancelled_request_frees_its_slot_and_the_queue_starts_in_order():
    engine = make_engine(parallel=1)
    try:
        tok = engine.session.tokenizer
        long = Run(engine, Request(tok.encode("Count to a thousand:"), 200, temperature=0.0))
        waiting = [Run(engine, Request(tok.encode(f"Number {i}:"), 4, temperature=0.0)) for i in range(3)]
        assert long.started.wait(120)
        assert engine.waiting == 3
        long.cancel.set()
        long.wait()
        assert long.outcomes[0].cancelled and long.outcomes[0].completion_tokens < 200
        done = [w.wait() for w in waiting]
        waits = [d.outcomes[0].queue_seconds for d in done]
        assert waits == sorted(waits)  # started in arrival order
        assert engine.active == 0 and engine.waiting == 0
    finally:
        engine.close()


@pytest.mark.slow
def test_a_continued_conversation_lands_on_the_slot_holding_it(engine):
    tok = engine.session.tokenizer
    first = {name: tok.encode(f"Conversation {name}: tell me about {name}.") for name in ("apples", "rivers")}
    answers = {name: Run(engine, Request(p, 8, temperature=0.0)).wait() for name, p in first.items()}
    for name, p in first.items():
        answer_tokens = tok.encode(answers[name].texts[0], add_bos=False)
        continued = p + answer_tokens + tok.encode(" And more?", add_bos=False)
        run = Run(engine, Request(continued, 4, temperature=0.0)).wait()
        assert run.outcomes[0].cached_tokens >= len(p)


def test_a_batch_is_checked_like_untrusted_input():
    ok = Batch.of([0, 0, 1], [5, 6, 0], [1, 2])
    ok.check(2, 16)
    for bad in (Batch.of([0, 2], [0, 0], [0]), Batch.of([0, 0], [3, 3], [1]), Batch.of([0], [16], [0]),
                Batch.of([0, 0], [0, 1], [1, 0]), Batch.of([0], [0], [0], [(0, 1, 17)])):
        with pytest.raises(DllamaError):
            bad.check(2, 16)
    assert Batch.from_json(ok.to_json()).to_json() == ok.to_json()
    for meta in ({"slots": [0], "positions": [0]}, {"slots": [0], "positions": ["0"], "logits": []},
                 {"slots": [0], "positions": [2**70], "logits": []}, {"slots": [0] * 33, "positions": [0] * 33,
                                                                       "logits": []},
                 {"slots": [0], "positions": [0], "logits": [], "copies": [[0, 1]]}):
        with pytest.raises(ValueError):
            Batch.from_json(meta)


@pytest.mark.slow
@pytest.mark.parametrize("buffer_type", [FloatType.F32, FloatType.Q80], ids=["f32", "q80"])
def test_a_rows_logits_are_the_same_bits_alone_or_beside_others(buffer_type):
    model, _ = ensure_default_model()
    tr = Transformer(ModelFile(model), seq_len=64, buffer_type=buffer_type, n_slots=3)
    a, b = [1, 504, 414, 46682, 18669, 314], [1, 2000, 3000, 4000]
    whole = tr.forward(a, 0, all_logits=True, slot=0)
    pieces = np.concatenate([tr.forward(a[:1], 0, all_logits=True, slot=2),
                             tr.forward(a[1:4], 1, all_logits=True, slot=2),
                             tr.forward(a[4:], 4, all_logits=True, slot=2)])
    assert np.array_equal(whole, pieces)
    tr.forward(b, 0, slot=1)
    alone = [tr.forward_batch([7], Batch.of([0], [6], [0]))[0], tr.forward_batch([8], Batch.of([1], [4], [0]))[0]]
    # beside each other and beside a prompt chunk of a third slot
    both = tr.forward_batch([7, 8, 9, 10, 11], Batch.of([0, 1, 2, 2, 2], [6, 4, 6, 7, 8], [0, 1, 4]))
    assert np.array_equal(both[0], alone[0]) and np.array_equal(both[1], alone[1])
