"""Calibration of Q40 conversions: each weight's mean squared input per column, measured by the
NumPy forward, against the independent float64 forward; the memory rule's fallback."""
import numpy as np
import pytest

from dllama.engine import calibration
from dllama.engine.calibration import calibrate_q40, calibration_text, input_statistics
from dllama.formats.mfile import ArchType, tensor_plan
from dllama.formats.tfile import TokenizerData
from dllama.model.forward import MAX_BATCH
from tests.helpers import forward64, tiny_header, write_random_model


def direct_statistics(values: dict, header, tokens: list[int]) -> dict[str, np.ndarray]:
    """The mean over the rows each weight multiplies of their squares, from forward64."""
    sums, rows = {}, {}

    def observe(name, x):
        sums[name] = sums.get(name, 0.0) + (x * x).sum(axis=0)
        rows[name] = rows.get(name, 0) + x.shape[0]

    forward64(values, header, tokens, observe=observe)
    return {name: sums[name] / rows[name] for name in sums}


@pytest.mark.parametrize("arch", [ArchType.LLAMA, ArchType.QWEN3, ArchType.QWEN3_MOE])
def test_statistics_equal_a_direct_computation(tmp_path, arch):
    header = tiny_header(arch=arch, seq_len=128)
    values = write_random_model(tmp_path / "m.m", header, scale=0.3)
    rng = np.random.default_rng(1)
    tokens = [int(t) for t in rng.integers(0, header.vocab_size, 2 * MAX_BATCH + 7)]  # three batches
    got = input_statistics(header, values, tokens)
    want = direct_statistics(values, header, tokens)
    matrices = {s.name for s in tensor_plan(header) if s.name.endswith((".q", ".k", ".v", ".o", "w1", "w2", "w3"))}
    # Every matrix has statistics (an expert no token chose would have none: in neither).
    assert set(got) == set(want) and set(got) <= matrices | {"output"} and "output" in got
    assert matrices - set(got) == {n for n in matrices if n not in want}
    for name, mean in want.items():
        assert got[name].dtype == np.float32 and got[name].shape == mean.shape
        np.testing.assert_allclose(got[name], mean, rtol=2e-4, atol=1e-7, err_msg=name)
    if arch == ArchType.QWEN3_MOE:  # experts saw only their tokens: fewer rows than q
        assert any(".experts." in n for n in got)


def test_calibrate_runs_the_text_and_names_every_matrix(tmp_path):
    header = tiny_header(vocab_size=260, seq_len=96)
    values = write_random_model(tmp_path / "m.m", header)
    vocab = [bytes([b]) for b in range(256)] + [b"<s>", b"</s>", b"x1", b"x2"]
    tokenizer = TokenizerData(vocab=vocab, scores=np.zeros(len(vocab), np.float32), bos_id=256, eos_ids=[257])
    said, asked = [], []

    def values_of(spec):
        asked.append(spec.name)
        return values[spec.name]

    importance = calibrate_q40(header, tokenizer, values_of, say=said.append)
    assert asked == [s.name for s in tensor_plan(header)]
    assert set(importance) == {s.name for s in tensor_plan(header) if s.float_type == header.weight_type
                               and len(s.shape) == 2 and s.name != "embedding"}
    assert all(np.isfinite(v).all() and (v >= 0).all() and v.max() > 0 for v in importance.values())
    assert len(said) == 1 and said[0].startswith("🎯 calibrated the Q40 rounding") and "96 tokens" in said[0]


def test_calibration_falls_back_when_memory_is_short(monkeypatch):
    header = tiny_header()
    need = calibration.float32_bytes(header)
    monkeypatch.setattr(calibration, "physical_memory", lambda: 4 * need - 4)  # a quarter is 1 byte short
    said = []

    def values_of(spec):
        raise AssertionError("no float32 copy is made")

    assert calibrate_q40(header, None, values_of, say=said.append) is None
    assert len(said) == 1 and said[0].startswith("⚠️  Q40 rounding not calibrated") and "1/4" in said[0]


def test_calibration_text_is_packaged_prose():
    text = calibration_text()
    assert 3000 < len(text) < 8000 and text.isascii()
    # Not the perplexity test's text: calibrating on it would flatter the Q40 perplexity.
    from tests.test_real_model import PARAGRAPH

    for sentence in PARAGRAPH.split(". "):
        assert sentence[:40] not in text
