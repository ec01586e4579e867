"""SmolLM2-135M-Instruct end to end: conversion, greedy text, perplexity against float64."""
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from dllama.default_model import ensure_smollm2_gguf
from dllama.engine.calibration import calibrate_q40
from dllama.engine.session import Session
from dllama.engine.tokenizer import Tokenizer
from dllama.formats.gguf_import import convert_gguf
from dllama.formats.mfile import ModelFile, tensor_plan
from dllama.kernels.quants import FloatType, quantize_q40_max_abs
from dllama.model.forward import Transformer
from dllama.model.slicing import NodeModel
from tests.helpers import forward64

# Three paragraphs of plain English (encyclopedia, science, story), about 200 tokens: one short
# paragraph alone swings the Q40/F32 ratio between 0.98 and 1.33 on this model.
PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece "
    "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution. "
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to "
    "synthesize foods from carbon dioxide and water. It generally involves the green pigment "
    "chlorophyll and generates oxygen as a byproduct. Most life on Earth depends on it, directly or "
    "indirectly. Once upon a time, in a small village at the edge of a great forest, there lived a "
    "young girl named Lily. Every morning she walked to the river to fetch water for her grandmother, "
    "and every morning she stopped to listen to the birds singing in the tall oak trees."
)


@pytest.fixture(scope="module")
def q40_files(tmp_path_factory):
    # Converted here, not taken from $DLLAMA_HOME: a Q40 file cached by an earlier release holds
    # the blocks of its quantizer, and the perplexity test measures this one's: calibrated on
    # the built-in text, as `convert gguf` and the default model's conversion do.
    paths = convert_gguf(ensure_smollm2_gguf(), tmp_path_factory.mktemp("q40"), FloatType.Q40,
                         name="smollm2", progress=False, calibrate=calibrate_q40)
    return paths.model, paths.tokenizer


@pytest.fixture(scope="module")
def f32_files(tmp_path_factory):
    paths = convert_gguf(ensure_smollm2_gguf(), tmp_path_factory.mktemp("f32"), FloatType.F32,
                         name="smollm2", progress=False)
    return paths.model, paths.tokenizer


@pytest.fixture(scope="module")
def tokenizer(q40_files):
    return Tokenizer.load(q40_files[1])


def perplexity(model_path, tokenizer, tokens, transform=None) -> float:
    """Perplexity of the model at ``model_path``, its weights changed by ``transform`` first."""
    share = NodeModel.from_model(ModelFile(model_path))
    tr = Transformer(transform(share) if transform else share, seq_len=256)
    return Session(tr, tokenizer).perplexity(tokens)


def test_greedy_capital_of_france_mentions_paris(q40_files):
    out = subprocess.run([sys.executable, "-m", "dllama", "inference", "--prompt", "The capital of France is",
                          "--steps", "64", "--temperature", "0"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The capital of France is")
    generated = out.stdout.split("\n\nEvaluation")[0]
    assert "Paris" in generated, generated
    assert "Prediction" in out.stdout and "tokens/s" in out.stdout
    assert "SeqLen: 4096" in out.stderr  # the model's 8192 capped, and said


def test_f32_perplexity_matches_float64_and_q40_is_close(f32_files, q40_files, tokenizer):
    tokens = tokenizer.encode(PARAGRAPH)
    assert len(tokens) > 150
    ppl_f32 = perplexity(f32_files[0], tokenizer, tokens)

    m = ModelFile(f32_files[0])
    logits = forward64(m.tensors, m.header, tokens[:-1])
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ppl_64 = float(np.exp(-log_probs[np.arange(len(tokens) - 1), tokens[1:]].mean()))

    ppl_q40 = perplexity(q40_files[0], tokenizer, tokens)
    print(f"\nSmolLM2 perplexity: f32 {ppl_f32:.4f}, float64 reference {ppl_64:.4f}, q40 {ppl_q40:.4f}")
    assert abs(ppl_f32 / ppl_64 - 1) < 0.005
    # Measured (2026-12, this text, 196 tokens): f32 8.6307, float64 8.6307, q40 9.0876, so Q40
    # costs a ratio of 1.0529. Both files come from the same GGUF through deterministic
    # converters (the calibration's NumPy sums may differ in the last bits between BLAS builds,
    # which moves a few blocks at most), and the kernels only sum in other orders (numba on
    # every SIMD path and the NumPy reference agree on the Q40 value to 2e-7), so the ratio
    # moves only when the Q40 quantizer, its calibration or the products change. 1.04..1.065
    # leaves about +-0.012 and catches a Q40 product that loses more, a conversion that is not
    # calibrated (the unweighted search: 10.7090, ratio 1.2408; ggml's max-abs rounding: 10.2610,
    # ratio 1.1889), or a "Q40" run that is not quantized at all.
    # The Q40 blocks re-round the GGUF's Q4_1 ones, which no scale does without error (the two
    # grids are offset); the calibration (engine.calibration: each column's mean squared input
    # on the built-in text, ~1000 tokens, none of them this text) puts that error where the
    # inputs are small, as llama.cpp's importance matrix does.
    assert 1.04 < ppl_q40 / ppl_f32 < 1.065, ppl_q40 / ppl_f32


def _max_abs_q40(share: NodeModel) -> NodeModel:
    """The F32 model's matrices rounded to Q40 as ggml (and this converter before the scale
    search) does: the value of largest magnitude at level -8. The F32 values are the GGUF's
    Q4_1 blocks dequantized, which is what the conversion used to round."""
    h = replace(share.header, weight_type=FloatType.Q40)
    tensors = dict(share.tensors)
    for spec in tensor_plan(h):
        if spec.float_type == FloatType.Q40:
            tensors[spec.name] = quantize_q40_max_abs(np.asarray(tensors[spec.name]))
    return NodeModel(h, share.node, tensors)


def test_calibrated_q40_removes_a_third_of_the_loss(f32_files, q40_files, tokenizer):
    # Against the Q40 conversion before calibration and the scale search (ggml's max-abs
    # rounding), on the same text. Measured (2026-12): f32 8.6307, max-abs 10.2610, calibrated
    # 9.0876: 72 % of max-abs's loss against F32 removed (78 % of the unweighted search's,
    # 10.7090). The goal is a third at least. On 512 tokens of other prose (the GPL-3
    # preamble): f32 22.65, max-abs 26.87, search 25.04, calibrated 24.15 (64 % removed).
    # Converting SmolLM2 to Q40 on 2 cores took 6.3 s with max-abs rounding, 7.5 s with the
    # search, 15.1 s calibrated (the calibration's forward over 1015 tokens: 7.9 s).
    tokens = tokenizer.encode(PARAGRAPH)
    ppl_f32 = perplexity(f32_files[0], tokenizer, tokens)
    ppl_max_abs = perplexity(f32_files[0], tokenizer, tokens, transform=_max_abs_q40)
    ppl_q40 = perplexity(q40_files[0], tokenizer, tokens)
    removed = (ppl_max_abs - ppl_q40) / (ppl_max_abs - ppl_f32)
    print(f"\nSmolLM2 perplexity: f32 {ppl_f32:.4f}, max-abs q40 {ppl_max_abs:.4f}, calibrated q40 {ppl_q40:.4f}: "
          f"{removed:.0%} of the loss removed")
    assert abs(ppl_max_abs - 10.2610) < 0.01  # the old conversion, reproduced
    assert removed >= 1 / 3, removed


def _permute_again(share: NodeModel) -> NodeModel:
    """Apply llama.cpp's HF-to-interleaved q/k permutation a second time (F32 weights)."""
    h = share.header

    def permute(w, n_heads):
        w = np.asarray(w)
        return np.ascontiguousarray(w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1])
                                    .swapaxes(1, 2).reshape(w.shape))

    tensors = dict(share.tensors)
    for i in range(h.n_layers):
        tensors[f"layers.{i}.q"] = permute(tensors[f"layers.{i}.q"], h.n_heads)
        tensors[f"layers.{i}.k"] = permute(tensors[f"layers.{i}.k"], h.n_kv_heads)
    return NodeModel(h, share.node, tensors)


def test_gguf_qk_layout_is_already_permuted(f32_files, tokenizer):
    """A second permutation still writes sentences, but its perplexity is several times worse."""
    tokens = tokenizer.encode(PARAGRAPH)
    as_is = perplexity(f32_files[0], tokenizer, tokens)
    again = perplexity(f32_files[0], tokenizer, tokens, transform=_permute_again)
    print(f"\nperplexity as converted {as_is:.3f}, permuted once more {again:.3f}")
    assert again > 2 * as_is


def test_q80_buffers_stay_close(q40_files, tokenizer):
    tokens = tokenizer.encode(PARAGRAPH)
    m = ModelFile(q40_files[0])
    f32 = Session(Transformer(m, seq_len=256), tokenizer).perplexity(tokens)
    q80 = Session(Transformer(m, seq_len=256, buffer_type=FloatType.Q80), tokenizer).perplexity(tokens)
    assert q80 != f32 and abs(q80 / f32 - 1) < 0.05  # q80 buffers change the arithmetic, slightly
