"""The generation loop on a tiny random model: prompt handling, stopping, summary."""
import numpy as np
import pytest

from dllama.engine.session import check_pair, Outcome, Session, format_summary, tokens_for_steps
from dllama.engine.sampler import Sampler
from dllama.engine.tokenizer import Tokenizer
from dllama.errors import DllamaError
from dllama.formats.mfile import ModelFile
from dllama.formats.tfile import TokenizerData
from dllama.model.forward import Transformer
from tests.helpers import forward64, tiny_header, write_random_model

VOCAB = 80


@pytest.fixture
def session_and_values(tmp_path):
    h = tiny_header(vocab_size=VOCAB, seq_len=64)
    values = write_random_model(tmp_path / "m.m", h, scale=0.4)
    tokenizer = Tokenizer(TokenizerData(vocab=[bytes([48 + i % 40, 65 + i // 40]) for i in range(VOCAB)],
                                        scores=[0.0] * VOCAB, eos_ids=[VOCAB - 1]))
    return Session(Transformer(ModelFile(tmp_path / "m.m")), tokenizer), values, h


def greedy_reference(values, h, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(forward64(values, h, tokens)[-1])))
    return tokens[len(prompt):]


def test_greedy_generation_feeds_every_prompt_token(session_and_values):
    session, values, h = session_and_values
    prompt = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 38, 4, 6, 26, 4, 33, 8, 32, 7, 9, 50, 2,
              8, 8, 4, 19, 7, 16, 9, 3, 9, 9, 37, 5, 10]  # longer than one batch of 32
    want = greedy_reference(values, h, prompt, 6)
    stats = Outcome()
    got = []
    for t in session.generate(prompt, Sampler(0.0), stats, max_tokens=tokens_for_steps(len(prompt), len(prompt) + 6,
                                                                                      session.seq_len)):
        got.append(t)
    # Stops at the EOS id or when the positions run out.
    eos = VOCAB - 1
    want = want[: want.index(eos)] if eos in want else want
    assert got == want
    # Every generated token is fed back except the last one when the positions run out.
    assert stats.eval_tokens == len(prompt)
    assert stats.pred_tokens == (len(got) if len(got) < 6 else 5)


def test_steps_count_positions_and_prompt_must_leave_room(session_and_values):
    session, _, _ = session_and_values
    with pytest.raises(DllamaError, match="no room"):
        tokens_for_steps(3, 3, session.seq_len)


def test_context_overflow_is_a_clean_error(session_and_values):
    session, _, _ = session_and_values
    with pytest.raises(DllamaError, match="context"):
        session.step(list(range(10)) * 7)


def test_summary_format():
    text = format_summary(Outcome(prompt_tokens=4, eval_seconds=0.02, pred_tokens=27, pred_seconds=0.5))
    assert text.splitlines() == ["Evaluation", "   nBatches: 32", "    nTokens: 4",
                                 "   tokens/s: 200.00 (5.00 ms/tok)", "Prediction", "    nTokens: 27",
                                 "   tokens/s: 54.00 (18.52 ms/tok)"]


def test_padded_vocabulary_rows_are_never_sampled(session_and_values):
    """A model's vocabulary may be padded past its tokenizer's (Qwen3): those ids have no text,
    so neither greedy nor random sampling may pick them, however large their logits."""
    full, _, _ = session_and_values
    n_tokens = VOCAB - 8
    tokenizer = Tokenizer(TokenizerData(vocab=full.tokenizer.data.vocab[:n_tokens], scores=[0.0] * n_tokens))
    session = Session(full.transformer, tokenizer)
    forward = session.transformer.forward

    def padding_wins(tokens, pos, all_logits=False):
        logits = forward(tokens, pos, all_logits)
        logits[..., n_tokens:] += 100.0
        return logits

    session.transformer.forward = padding_wins
    for sampler in (Sampler(0.0), Sampler(1.0, 1.0, seed=3)):
        session.rewind(0)
        got = list(session.generate([1, 2, 3], sampler, Outcome(), max_tokens=tokens_for_steps(3, 40, session.seq_len)))
        assert len(got) == 40 - 3 and max(got) < n_tokens


def test_another_models_smaller_tokenizer_is_refused_but_padding_is_not():
    """Llama 2's 32000 tokens with SmolLM2's 49152 rows: another model's tokenizer, refused.
    Qwen3's 151669 tokens with 151936 rows, Qwen2.5's 151665 with 152064: padding, accepted."""
    def tokenizer(n: int):
        return type("T", (), {"vocab_size": n})()

    with pytest.raises(DllamaError, match="32000 tokens but the model's vocabulary has 49152: they do not belong"):
        check_pair(tokenizer(32000), 49152)
    for tokens, rows in ((151669, 151936), (151665, 152064), (49152, 49152), (300, 320)):
        check_pair(tokenizer(tokens), rows)
    with pytest.raises(DllamaError):
        check_pair(tokenizer(49153), 49152)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    h = tiny_header(vocab_size=VOCAB, seq_len=64)
    write_random_model(tmp_path / "m.m", h)
    tokenizer = Tokenizer(TokenizerData(vocab=[bytes([48 + i % 40, 65 + i // 40]) for i in range(VOCAB + 1)],
                                        scores=[0.0] * (VOCAB + 1)))
    with pytest.raises(DllamaError, match="do not belong together"):
        Session(Transformer(ModelFile(tmp_path / "m.m")), tokenizer)
