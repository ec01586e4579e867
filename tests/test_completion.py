"""Completions: stop strings over streamed text, token limits, KV prefix reuse that changes
nothing but the work done."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama.default_model import ensure_default_model
from dllama.engine.batching import Completer
from dllama.engine.completion import Request, StopStrings
from dllama.engine.session import ContextFull, Outcome, Session
from dllama.engine.tokenizer import Tokenizer
from dllama.formats.mfile import ModelFile
from dllama.model.forward import Transformer

alphabet = st.sampled_from("ab<|>x ")


@settings(max_examples=300)
@given(st.lists(st.text(alphabet, max_size=6), max_size=12), st.lists(st.text(alphabet, min_size=1, max_size=4),
                                                                       max_size=3))
def test_stop_strings_over_any_chunking(chunks, stops):
    full = "".join(chunks)
    # Text arriving one character at a time stops at the first stop string to be complete.
    hits = []
    for end in range(1, len(full) + 1):
        hits = [end - len(s) for s in stops if full[:end].endswith(s)]
        if hits:
            break
    want = full[:min(hits)] if hits else full
    matcher = StopStrings(stops)
    out = ""
    for chunk in chunks:
        out += matcher.push(chunk)
        assert want.startswith(out)  # never a character past a stop string, never one taken back
        if matcher.hit:
            break
    if not matcher.hit:
        out += matcher.flush()
    assert out == want
    assert matcher.hit == bool(hits)


@pytest.fixture(scope="module")
def completer():
    model, tokenizer = ensure_default_model()
    tok = Tokenizer.load(tokenizer)
    session = Session(Transformer(ModelFile(model), seq_len=256), tok)
    return Completer(session, frozenset())


def run(completer, prompt, **kw):
    outcome = Outcome()
    text = "".join(completer.complete(Request(prompt, **kw), outcome))
    return text, outcome


def test_prefix_reuse_changes_nothing_but_the_work(completer):
    tok = completer.tokenizer
    first = tok.encode("The Eiffel Tower is in")
    second = tok.encode("The Eiffel Tower is in Paris. The Colosseum is in")
    greedy = dict(max_tokens=12, temperature=0.0)
    completer.session.rewind(0)
    cold = run(completer, second, **greedy)
    run(completer, first, **greedy)
    warm_text, warm = run(completer, second, **greedy)
    assert warm_text == cold[0]
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b) if first != second[:len(first)] \
        else len(first)
    assert warm.cached_tokens >= common - 1 > 0
    again_text, again = run(completer, second, **greedy)
    assert again_text == cold[0] and again.cached_tokens == len(second) - 1


def test_seeded_sampling_repeats_with_a_warm_cache(completer):
    prompt = completer.tokenizer.encode("Once upon a time")
    completer.session.rewind(0)
    texts = [run(completer, prompt, max_tokens=20, temperature=1.0, top_p=0.95, seed=7)[0] for _ in range(3)]
    assert texts[0] == texts[1] == texts[2]


def test_limits(completer):
    prompt = completer.tokenizer.encode("Count: one, two, three,")
    text, outcome = run(completer, prompt, max_tokens=3, temperature=0.0)
    assert outcome.finish_reason == "length" and outcome.completion_tokens == 3
    text, outcome = run(completer, prompt, max_tokens=40, temperature=0.0, stop=[","])
    assert outcome.finish_reason == "stop" and "," not in text
    with pytest.raises(ContextFull):
        run(completer, [1] * 256, max_tokens=1)
    # Up to the last position of the context, then "length".
    text, outcome = run(completer, [1] * 250, temperature=0.0)
    assert outcome.finish_reason in ("length", "stop") and outcome.completion_tokens <= 6
    assert completer.session.pos <= 256


def test_end_of_turn_tokens_end_the_answer(completer):
    prompt = completer.tokenizer.encode("Hello")
    logits_argmax = int(np.argmax(completer.session.transformer.forward(prompt, 0)))
    completer.session.rewind(0)
    end = Completer(completer.session, frozenset({logits_argmax}))
    text, outcome = run(end, prompt, temperature=0.0)
    assert text == "" and outcome.finish_reason == "stop" and outcome.completion_tokens == 0
