"""`dllama api` serving many requests at once (continuous batching: dllama/engine/batching.py)
as real server processes: the OpenAI client's concurrent streams against their solo runs (f32
and q80 buffers), a client that leaves mid-stream freeing its slot for the next request, ``n``
choices (echoed completions too), log-probabilities against the log-softmax of the same model
loaded by the test itself, the same batches on a cluster of workers, and interleaved
conversations each finding its KV cache slot again.

SmolLM2 (marked slow) where the text matters; a tiny random model for the cluster, where only
the plumbing does. Greedy and seeded requests are deterministic, so each is compared with its
own solo run, bit for bit: the log-probabilities too, since a row's logits are the same bits in
any batch (texts alone would hide a difference in the last bits of the logits)."""
from __future__ import annotations

import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import openai
import pytest

try:
    import httpx
except ImportError:  # some environments ship httpx's successor under this name
    import httpx2 as httpx

from tests.processes import API_SEQ_LEN as SEQ_LEN
from tests.processes import Server, wait_health, wait_idle, workers_in

MODEL_ID = "smollm2-batching"
PARALLEL = 4  # the SmolLM2 server's --parallel
TIMEOUT = 120  # per HTTP request: generous for a busy shared machine

STORY = "Write a long story about a dragon who lives in a castle."
QUESTION = "What is the capital of France? Answer in one sentence, then explain why."
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


# -- servers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """SmolLM2 (the default model: Q80 weights, f32 buffers), 4 sequences at once."""
    s = Server(tmp_path_factory.mktemp("api-batching"), "--parallel", str(PARALLEL), "--model-id", MODEL_ID)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    from dllama.default_model import ensure_default_model
    from dllama.engine.tokenizer import Tokenizer

    return Tokenizer.load(ensure_default_model()[1])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random model (gibberish in milliseconds) whose vocabulary has 8 padding rows past
    its tokenizer's 40 tokens (never sampled, left out of the log-softmax), with a chat template.
    The end token's output row is zero: its logit 0 seldom wins, so generations run to their
    limits (long enough to overlap)."""
    from dllama.formats.mfile import ModelWriter, tensor_plan
    from dllama.kernels.quants import FloatType
    from tests.helpers import tiny_header, write_tiny_chat_tokenizer

    root = tmp_path_factory.mktemp("tiny-batching")
    model, tok = root / "tiny.m", root / "tiny.t"
    header = tiny_header(FloatType.F32, vocab_size=48, seq_len=SEQ_LEN)
    rng = np.random.default_rng(3)
    with ModelWriter(model, header) as w:  # as tests.helpers.write_random_model
        for spec in tensor_plan(header):
            if spec.name.endswith("norm"):
                v = (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
            else:
                v = (0.4 * rng.standard_normal(spec.shape)).astype(np.float32)
            if spec.name == "output":
                v[1] = 0.0  # </s>
            w.write(spec.name, v)
    write_tiny_chat_tokenizer(tok)
    return model, tok


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    """An API server (4 sequences at once) on the root of a cluster with 2 workers."""
    tmp = tmp_path_factory.mktemp("api-batching-cluster")
    model, tok = tiny_model
    with workers_in(tmp) as start:
        workers = [start() for _ in range(2)]
        s = Server(tmp, "--model", str(model), "--tokenizer", str(tok), "--parallel", "4",
                   "--workers", *[w.address for w in workers])
        try:
            yield s
        finally:
            s.stop()


# -- what a request gives ---------------------------------------------------------------------------
@dataclass
class Answer:
    """One choice of a request, whole or put together from its stream."""

    text: str = ""
    finish: str | None = None
    usage: object = None
    logprobs: list = field(default_factory=list)  # chat: (token, logprob, bytes, top) per token

    def key(self):  # what must be the same, bit for bit, alone and beside others
        return self.text, self.finish, self.logprobs, _usage_tuple(self.usage)


def _usage_tuple(usage) -> tuple | None:
    return None if usage is None else (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


def _chat_entries(logprobs) -> list:
    if logprobs is None or logprobs.content is None:
        return []
    return [(e.token, e.logprob, tuple(e.bytes), tuple((t.token, t.logprob, tuple(t.bytes)) for t in e.top_logprobs))
            for e in logprobs.content]


@dataclass
class Spec:
    """A request: chat (``prompt`` is the user's message) or completion, its token limit and
    the other parameters."""

    kind: str
    prompt: str
    max_tokens: int
    params: dict = field(default_factory=dict)

    def run(self, client, stream: bool = True) -> Answer:
        if self.kind == "chat":
            return chat(client, self.prompt, self.max_tokens, stream=stream, **self.params)
        return completion(client, self.prompt, self.max_tokens, stream=stream, **self.params)


def chat(client, content: str, max_tokens: int, stream: bool = True, model: str = MODEL_ID, **kw) -> Answer:
    messages = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, **kw)
        c = r.choices[0]
        return Answer(c.message.content, c.finish_reason, r.usage, _chat_entries(c.logprobs))
    out = Answer()
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    for ch in chunks[:-1]:
        assert len(ch.choices) == 1 and ch.choices[0].index == 0 and ch.usage is None
        c = ch.choices[0]
        out.text += c.delta.content or ""
        out.logprobs += _chat_entries(c.logprobs)
        if c.finish_reason is not None:
            assert out.finish is None, "two finish reasons"
            out.finish = c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    out.usage = chunks[-1].usage
    return out


def completion(client, prompt: str, max_tokens: int, stream: bool = True, model: str = MODEL_ID, **kw) -> Answer:
    if not stream:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **kw)
        return Answer(r.choices[0].text, r.choices[0].finish_reason, r.usage)
    out = Answer()
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    for ch in chunks[:-1]:
        assert len(ch.choices) == 1 and ch.choices[0].index == 0
        out.text += ch.choices[0].text
        if ch.choices[0].finish_reason is not None:
            assert out.finish is None, "two finish reasons"
            out.finish = ch.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    out.usage = chunks[-1].usage
    return out


def assert_usage(answer: Answer, max_tokens: int) -> None:
    usage = answer.usage
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens - 1
    assert answer.finish in ("stop", "length"), answer
    assert 1 <= usage.completion_tokens <= max_tokens
    if answer.finish == "length":
        assert usage.completion_tokens == max_tokens
    if answer.logprobs:  # a log-probability per generated token
        assert len(answer.logprobs) == usage.completion_tokens


def engine_counts(server: Server) -> list[tuple[int, int]]:
    """(running, waiting) as the engine logged them at each admission."""
    return [(int(a), int(b)) for a, b in re.findall(r"; (\d+) running, (\d+) waiting", server.output())]


def run_together(client, specs: list[Spec]) -> list[Answer]:
    """Every spec at once (a barrier lets them go together), each in its own thread."""
    barrier = threading.Barrier(len(specs))

    def go(spec: Spec) -> Answer:
        barrier.wait()
        return spec.run(client)

    with ThreadPoolExecutor(len(specs)) as pool:
        return list(pool.map(go, specs, timeout=3 * TIMEOUT))


def solo_then_together(server: Server, client, specs: dict[str, Spec], parallel: int) -> dict[str, Answer]:
    """Run each spec alone, one after the other, then all at once (more than ``parallel``: some
    wait in line); every one completes with sensible usage, and each but "unseeded" gives
    together what it gave alone (text, finish reason, usage, log-probabilities: bits). The
    engine's log shows they ran together, every slot taken, some waiting."""
    solo = {name: spec.run(client) for name, spec in specs.items() if name != "unseeded"}
    for name, answer in solo.items():
        assert answer.text, name
        assert_usage(answer, specs[name].max_tokens)
    before = len(engine_counts(server))
    together = dict(zip(specs, run_together(client, list(specs.values()))))
    for name, answer in together.items():
        assert_usage(answer, specs[name].max_tokens)
        if name != "unseeded":
            assert answer.key() == solo[name].key(), name
    counts = engine_counts(server)[before:]
    assert len(counts) == len(specs)
    assert max(r for r, _ in counts) == parallel, counts  # they ran together, all slots taken
    assert any(w >= 1 for _, w in counts), counts  # and some waited for a slot
    return solo


def a_mid_answer_word(text: str) -> str:
    words = re.findall(r"[A-Za-z]{4,}", text)[1:]
    assert words, text
    return words[len(words) // 2]


# -- 1. concurrent streams with their own settings ------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_six_concurrent_streams_each_equal_their_solo_run(server, client, http):
    """6 streams on 4 slots (2 wait in line), each with its own settings: the greedy and seeded
    ones give alone and together the same text, the same log-probabilities (bits) and usage."""
    sampled = {"temperature": 0.8, "top_p": 0.9}
    specs = {
        "greedy": Spec("chat", STORY, 32, {"temperature": 0, "logprobs": True, "top_logprobs": 2}),
        "seed 11": Spec("chat", STORY, 32, {**sampled, "seed": 11}),
        "seed 12": Spec("chat", STORY, 24, {**sampled, "seed": 12, "logprobs": True}),
        "stop": Spec("chat", QUESTION, 40, {"temperature": 0}),
        "completion": Spec("completion", "The capital of France is", 20, {"temperature": 0}),
        "unseeded": Spec("chat", "Name three colors.", 3, {}),  # temperature 1, any text
    }
    wait_idle(http)
    # the stop string: a word in the middle of the greedy answer
    full = specs["stop"].run(client).text
    word = a_mid_answer_word(full)
    specs["stop"].params["stop"] = [word]
    solo = solo_then_together(server, client, specs, PARALLEL)
    assert solo["stop"].text == full[:full.index(word)] and solo["stop"].finish == "stop"
    assert solo["seed 11"].text != solo["seed 12"].text  # the seed is not ignored
    wait_idle(http)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_q80_buffers_keep_batched_equal_to_solo(tmp_path):
    """With --buffer-float-type q80 (activations quantized before the products with quantized
    weights, row by row) a row still gets the same bits alone or in a batch."""
    server = Server(tmp_path, "--parallel", "2", "--model-id", MODEL_ID, "--buffer-float-type", "q80")
    try:
        with openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT) as c:
            sampled = {"temperature": 0.8, "top_p": 0.9}
            specs = {
                "greedy": Spec("chat", STORY, 24, {"temperature": 0, "logprobs": True, "top_logprobs": 2}),
                "seed 5": Spec("chat", STORY, 24, {**sampled, "seed": 5, "logprobs": True}),
                "completion": Spec("completion", "The capital of France is", 16, {"temperature": 0}),
            }
            solo_then_together(server, c, specs, 2)
    finally:
        server.stop()


# -- 2. a client gone mid-stream ------------------------------------------------------------------
def open_stream(server: Server, path: str, body: dict) -> tuple[socket.socket, object]:
    """A streaming request on a raw socket, read up to its first data line."""
    payload = json.dumps({**body, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    reader = s.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.1 200")
    while not reader.readline().startswith(b"data: "):
        pass
    return s, reader


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_client_gone_mid_stream_frees_its_slot_at_once(server, client, http):
    """All 4 slots stream long generations; a 5th request waits in line. One client leaves: the
    5th takes its slot and is answered while the 3 others still generate (so it did not wait
    for the abandoned generation to reach its limit, which is theirs). Each further client
    that leaves makes /health's running drop."""
    wait_idle(http)
    body = {"model": MODEL_ID, "prompt": COUNTING, "max_tokens": 400, "temperature": 0}
    streams = [open_stream(server, "/v1/completions", body) for _ in range(PARALLEL)]
    try:
        wait_health(http, lambda h: h["running"] == PARALLEL, 60, "the 4 streams do not all run")
        with ThreadPoolExecutor(1) as pool:
            fifth = pool.submit(chat, client, "Say hello.", 4, False, temperature=0)
            wait_health(http, lambda h: h["waiting"] == 1, 60, "the 5th request did not wait in line")
            assert not fifth.done()
            s, reader = streams.pop(0)
            reader.close()
            s.close()
            answer = fifth.result(timeout=TIMEOUT)
        assert answer.text and answer.finish in ("stop", "length")
        # The three others run on: 400 tokens are seconds away, the 5th took a few steps.
        health = http.get("/health").json()
        assert health["running"] == PARALLEL - 1 and health["waiting"] == 0, health
        while streams:
            s, reader = streams.pop()
            reader.close()
            s.close()
            wait_health(http, lambda h: h["running"] == len(streams), 60, "running did not drop")
    finally:
        for s, reader in streams:
            reader.close()
            s.close()
    health = wait_idle(http)
    assert health["running"] == 0 and health["status"] == "ok"


# -- 3. n choices ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_n_choices_share_the_prompt_and_draw_with_seed_plus_index(client, http):
    messages = [{"role": "user", "content": STORY}]
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 40, "logprobs": True}
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, n=3, max_tokens=12, **sampled)
    assert [c.index for c in r.choices] == [0, 1, 2]
    answers = [Answer(c.message.content, c.finish_reason, None, _chat_entries(c.logprobs)) for c in r.choices]
    assert all(a.finish in ("stop", "length") and a.text for a in answers)
    assert r.usage.completion_tokens == sum(len(a.logprobs) for a in answers)  # every choice's tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # choice i draws as an n=1 request with seed + i
    for i, a in enumerate(answers):
        alone = chat(client, STORY, 12, False, **{**sampled, "seed": 40 + i})
        assert (a.text, a.finish, a.logprobs) == (alone.text, alone.finish, alone.logprobs), i
        assert alone.usage.prompt_tokens == r.usage.prompt_tokens
    assert len({a.text for a in answers}) > 1  # the seeds differ

    # streamed: chunks of every index, one finish reason each, the same texts
    texts, finishes, roles = ["", "", ""], [[], [], []], [0, 0, 0]
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, n=3, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, **sampled))
    for ch in chunks[:-1]:
        assert len(ch.choices) == 1 and ch.usage is None
        c = ch.choices[0]
        roles[c.index] += c.delta.role == "assistant"
        texts[c.index] += c.delta.content or ""
        if c.finish_reason is not None:
            finishes[c.index].append(c.finish_reason)
    assert roles == [1, 1, 1]
    assert texts == [a.text for a in answers]
    assert finishes == [[a.finish] for a in answers]
    assert chunks[-1].choices == [] and _usage_tuple(chunks[-1].usage) == _usage_tuple(r.usage)

    # greedy: three times the same answer
    g = client.chat.completions.create(model=MODEL_ID, messages=messages, n=3, temperature=0, max_tokens=10)
    assert len({c.message.content for c in g.choices}) == 1 and g.choices[0].message.content
    # completions too
    c3 = client.completions.create(model=MODEL_ID, prompt="Once upon a time", n=3, temperature=0, max_tokens=6)
    assert [c.index for c in c3.choices] == [0, 1, 2] and len({c.text for c in c3.choices}) == 1

    # more choices than slots: 400 naming n, at once
    for n in (PARALLEL + 1, 0):
        bad = http.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": messages, "n": n,
                                                      "max_tokens": 2})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == "n"
        assert str(PARALLEL) in bad.json()["error"]["message"]


# -- 4. log-probabilities -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tokenizer):
    """log_softmax(tokens): in float64 over the tokenizer's vocabulary, the log-probabilities
    after each of ``tokens``, from the server's model file loaded here (same context length,
    f32 buffers) and run whole, ``MAX_BATCH`` positions per forward."""
    from dllama.default_model import ensure_default_model
    from dllama.formats.mfile import ModelFile
    from dllama.kernels.quants import FloatType
    from dllama.model.forward import MAX_BATCH, Transformer

    model = Transformer(ModelFile(ensure_default_model()[0]), seq_len=SEQ_LEN, buffer_type=FloatType.F32)
    vocab = tokenizer.vocab_size

    def log_softmax(tokens: list[int]) -> np.ndarray:
        logits = np.concatenate([model.forward(tokens[start:start + MAX_BATCH], start, all_logits=True)
                                 for start in range(0, len(tokens), MAX_BATCH)])
        z = logits[:, :vocab].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    return log_softmax


@pytest.fixture(scope="module")
def chat_prompt(tokenizer):
    """The prompt tokens the server evaluates for a one-message chat (openai_app: the template
    rendered with the generation prompt, tokenized without BOS, special tokens allowed)."""
    from dllama.engine.chat_template import template_for

    template = template_for(tokenizer, None)

    def tokens(content: str) -> list[int]:
        text = template.render([{"role": "user", "content": content}], add_generation_prompt=True)
        return tokenizer.encode(text, add_bos=False, allow_special=True)

    return tokens


TOLERANCE = 1e-4
max_differences: dict[str, float] = {}  # what each check saw, printed at the end


def check_entries(name: str, entries: list, tokens: list[int], want: np.ndarray, top: int, greedy: bool) -> None:
    """Chat log-probabilities ``entries`` of generated ``tokens`` against the reference rows
    ``want`` (one per token): the values, the top alternatives (sorted, ``top`` of them, best
    first; greedy: the chosen token first)."""
    worst = 0.0
    for k, (token, logprob, raw, alternatives) in enumerate(entries):
        row = want[k]
        worst = max(worst, abs(logprob - row[tokens[k]]))
        assert logprob == pytest.approx(row[tokens[k]], abs=TOLERANCE), (k, token)
        assert len(alternatives) == top
        values = [lp for _, lp, _ in alternatives]
        assert values == sorted(values, reverse=True)
        best = np.argsort(-row, kind="stable")[:top]
        for (_, lp, _), b in zip(alternatives, best):
            assert lp == pytest.approx(row[b], abs=TOLERANCE)
        if greedy and top:
            assert tokens[k] == int(np.argmax(row))
            assert alternatives[0] == (token, logprob, raw)
    max_differences[name] = max(worst, max_differences.get(name, 0.0))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chat_logprobs_are_the_log_softmax_of_the_logits(client, tokenizer, chat_prompt, reference):
    by_bytes = {tokenizer.piece(i): i for i in range(tokenizer.vocab_size)}
    cases = [("greedy", {"temperature": 0}, 5, 16),
             # values before temperature and top-p: the model's own distribution
             ("sampled", {"temperature": 1.3, "top_p": 0.8, "seed": 7}, 3, 16)]
    for name, params, top, max_tokens in cases:
        answer = chat(client, QUESTION, max_tokens, False, logprobs=True, top_logprobs=top, **params)
        assert_usage(answer, max_tokens)
        tokens = [by_bytes[bytes(raw)] for _, _, raw, _ in answer.logprobs]
        assert tokenizer.decode(tokens) == answer.text
        prompt = chat_prompt(QUESTION)
        assert answer.usage.prompt_tokens == len(prompt)
        rows = reference(prompt + tokens)[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
        check_entries(name, answer.logprobs, tokens, rows, top, greedy=name == "greedy")
        if name == "greedy":
            # streamed: the same entries, chunk by chunk
            streamed = chat(client, QUESTION, max_tokens, True, logprobs=True, top_logprobs=top, **params)
            assert streamed.key()[:3] == answer.key()[:3]
    # no top_logprobs: none listed
    plain = chat(client, QUESTION, 3, False, logprobs=True, temperature=0)
    assert len(plain.logprobs) == 3 and all(alternatives == () for *_, alternatives in plain.logprobs)
    # without logprobs: none at all
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=2, temperature=0)
    assert r.choices[0].logprobs is None
    print(f"\nlargest |server - reference| log-probability: {max_differences}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_completion_logprobs_with_echo_cover_the_prompt(http, tokenizer, reference):
    prompt = "The capital of France is"
    prompt_tokens = tokenizer.encode(prompt)  # as the server tokenizes a completion's prompt
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3, "echo": True}
    out = http.post("/v1/completions", json=body).json()
    choice, usage = out["choices"][0], out["usage"]
    lp = choice["logprobs"]
    n, generated = len(prompt_tokens), usage["completion_tokens"]
    assert usage["prompt_tokens"] == n
    assert choice["text"].startswith(prompt)
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) \
        == n + generated
    assert lp["tokens"][:n] == [tokenizer.piece(t).decode() for t in prompt_tokens]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(lp["tokens"]))]
    # the first prompt token: nothing predicts it
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # the generated tokens by their text (no two SmolLM2 tokens spell the same); greedy: each
    # is the argmax of its row
    by_text = {tokenizer.piece(i).decode("utf-8", "replace"): i for i in range(tokenizer.vocab_size)}
    tokens = list(prompt_tokens) + [by_text[t] for t in lp["tokens"][n:]]
    rows = reference(tokens)
    assert [int(np.argmax(row)) for row in rows[n - 1:-1]] == tokens[n:]
    worst = 0.0
    for k in range(1, len(tokens)):
        row = rows[k - 1]
        value = lp["token_logprobs"][k]
        worst = max(worst, abs(value - row[tokens[k]]))
        assert value == pytest.approx(row[tokens[k]], abs=TOLERANCE), k
        alternatives = lp["top_logprobs"][k]
        best = np.argsort(-row, kind="stable")[:3]
        assert list(alternatives) == [tokenizer.piece(int(b)).decode("utf-8", "replace") for b in best]
        assert list(alternatives.values()) == pytest.approx([row[b] for b in best], abs=TOLERANCE)
    max_differences["completion with echo"] = worst
    print(f"\nlargest |server - reference| log-probability: {max_differences}")

    # streamed: the prompt's chunk first, then one per token; together the same lists
    merged = {k: [] for k in lp}
    text = ""
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[len("data: "):])["choices"][0]
                text += c["text"]
                for k, v in (c["logprobs"] or {}).items():
                    merged[k] += v
    assert text == choice["text"] and merged == lp


# -- 5. a cluster behind the batches --------------------------------------------------------------
@pytest.mark.timeout(300)
def test_a_cluster_batches_like_one_node(cluster):
    """The batches of test 1 on a root and 2 workers (the tiny model: only the plumbing
    matters): each row's logits gathered from three slices, the same alone or together."""
    server = cluster
    with openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT) as c, \
            httpx.Client(base_url=server.base, timeout=TIMEOUT) as http:
        health = http.get("/health").json()
        assert health["nodes"] == 3 and health["nodes_connected"] == 3 and health["parallel"] == 4
        model = server.model_id
        sampled = {"temperature": 0.8, "top_p": 0.9, "model": model}
        specs = {
            "greedy": Spec("chat", "the cat sat on the mat", 200, {"temperature": 0, "model": model, "logprobs": True,
                                                                     "top_logprobs": 3}),
            "seed 1": Spec("chat", "the cat sat on the mat", 150, {**sampled, "seed": 1, "logprobs": True}),
            "seed 2": Spec("chat", "the cat sat on the mat", 100, {**sampled, "seed": 2}),
            "completion": Spec("completion", "there is a", 120, {"temperature": 0, "model": model}),
            "seed 3": Spec("completion", "he ran", 80, {**sampled, "seed": 3}),
        }
        solo_then_together(server, c, specs, 4)
        health = wait_idle(http)
        assert health["nodes_connected"] == 3 and server.alive()


# -- 6. conversations find their slot ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_interleaved_conversations_each_continue_on_their_own_slot(client, http):
    """Two conversations, A and B, take turns; each continued turn lands on the slot holding its
    conversation and evaluates only what is new. SmolLM2's template starts every chat with the
    same system prompt: B's first turn shares it with A's slot but must not take (and
    overwrite) that slot while others are free."""
    wait_idle(http)
    firsts = {"A": "Here is a list of fruits: apples, pears, plums and two melons. Which is the largest?",
              "B": "Name three rivers in Europe, and say which one of them is the longest."}
    seconds = {"A": "And which one is the smallest?", "B": "And which one is the shortest?"}
    conversations, first_usage = {}, {}
    for name, content in firsts.items():
        messages = [{"role": "user", "content": content}]
        r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
        conversations[name] = messages + [{"role": "assistant", "content": r.choices[0].message.content},
                                          {"role": "user", "content": seconds[name]}]
        first_usage[name] = r.usage

    def turn(name: str):
        return client.chat.completions.create(model=MODEL_ID, messages=conversations[name], max_tokens=4,
                                              temperature=0).usage

    with ThreadPoolExecutor(2) as pool:  # the second turns run together, on two slots
        usage = dict(zip(conversations, pool.map(turn, conversations)))
    for name in conversations:
        cached = usage[name].prompt_tokens_details.cached_tokens
        # the first turn's prompt renders to a prefix of the second's (ChatML), and its tokens
        # are still in the conversation's slot
        assert first_usage[name].prompt_tokens - 1 <= cached <= usage[name].prompt_tokens - 1, \
            (name, cached, first_usage[name].prompt_tokens, usage[name].prompt_tokens)


@pytest.mark.slow
def test_completions_n_with_echo_streams_the_prompt_of_every_choice(http):
    """Streamed completions with echo: every choice's text starts with the prompt, with or
    without logprobs, as the non-streamed answer's do."""
    prompt = "The capital of France is"
    for extra in ({}, {"logprobs": 1}):
        body = {"model": MODEL_ID, "prompt": prompt, "n": 2, "max_tokens": 4, "temperature": 0, "echo": True,
                **extra}
        whole = http.post("/v1/completions", json=body).json()
        assert [c["text"][:len(prompt)] for c in whole["choices"]] == [prompt, prompt], extra
        texts = ["", ""]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    c = json.loads(line[len("data: "):])["choices"][0]
                    texts[c["index"]] += c["text"]
        assert texts == [c["text"] for c in whole["choices"]], extra
