"""Whole-model equivalence on SmolLM2: the numba kernels against the NumPy reference."""
import numpy as np
import pytest

from dllama.default_model import ensure_default_model
from dllama.engine.tokenizer import Tokenizer
from dllama.formats.mfile import ModelFile
from dllama.kernels.quants import FloatType
from dllama.model.forward import MAX_BATCH, Transformer
from tests.helpers import simd_paths

pytestmark = pytest.mark.slow
STEPS = 64
# SmolLM2's weights are Q40: every SIMD path computes them (a path this CPU lacks is skipped).
PATHS = [pytest.param(name, marks=skip, id=name) for name, skip in simd_paths()]


@pytest.fixture(scope="module")
def q40_model():
    model_path, tokenizer_path = ensure_default_model(FloatType.Q40)
    return ModelFile(model_path), Tokenizer.load(tokenizer_path)


@pytest.fixture(scope="module")
def numpy_greedy(q40_model):
    """The NumPy reference's prompt, greedy tokens and logits (computed once for every path)."""
    model, tokenizer = q40_model
    prompt = tokenizer.encode("The history of the bicycle begins in the early nineteenth century, when", add_bos=True)
    seq_len = len(prompt) + STEPS + 1
    return prompt, seq_len, greedy(Transformer(model, seq_len=seq_len, backend="numpy"), prompt, STEPS)


def greedy(tr: Transformer, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits of every step (prompt in batches, then one token at a time)."""
    for start in range(0, len(prompt), MAX_BATCH):
        logits = tr.forward(prompt[start:start + MAX_BATCH], start)
    tokens, all_logits, pos = [], [logits], len(prompt)
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = tr.forward([tokens[-1]], pos)
        all_logits.append(logits)
        pos += 1
    return tokens, all_logits


@pytest.mark.parametrize("path", PATHS)
def test_numba_equals_numpy_on_smollm2(q40_model, numpy_greedy, monkeypatch, path):
    model, _ = q40_model
    prompt, seq_len, (want_tokens, want_logits) = numpy_greedy
    monkeypatch.setenv("DLLAMA_CPU_PATH", path)
    got_tokens, got_logits = greedy(Transformer(model, seq_len=seq_len, backend="numba"), prompt, STEPS)
    assert got_tokens == want_tokens
    for step, (got, want) in enumerate(zip(got_logits, want_logits)):
        # Both sides multiply the same dequantized weights by the same float32 activations; they
        # differ only in float32 summation order: ~1e-6 relative per block (measured 3e-7 to
        # 8e-7), compounding over 60 blocks to ~1e-4 of the logits' scale. A wrong kernel (a
        # swapped rope pair, a bad scale) moves logits by more than 1e-1 of it.
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-3 * scale, f"step {step}"
