"""The forward pass of every backend against an independent float64 implementation, on tiny random models."""
import numpy as np
import pytest

from dllama.errors import DllamaError
from dllama.formats.mfile import ArchType, HiddenAct, ModelFile, RopeType
from dllama.kernels.quants import FloatType, to_float32
from dllama.model.forward import Transformer
from tests.helpers import forward64, simd_paths, tiny_header, write_random_model

# The NumPy reference and the numba kernels (on this CPU's SIMD path; the Q40 test runs the
# numba kernels on every path, see simd_paths).
KERNELS = ["numpy", "numba"]


@pytest.fixture(params=KERNELS)
def kernels(request, monkeypatch) -> str:
    """The backend to run; "numba-PATH" forces that SIMD path (DLLAMA_CPU_PATH)."""
    name = request.param
    if name.startswith("numba-"):
        monkeypatch.setenv("DLLAMA_CPU_PATH", name.split("-", 1)[1])
        return "numba"
    return name


TOKENS = [3, 17, 42, 5, 5, 79, 0, 23, 61, 8, 11, 2, 33, 47, 70, 1, 9]


def run_in_pieces(tr: Transformer, tokens, pieces):
    """Logits of every position, feeding the sequence in the given batch sizes."""
    out, pos = [], 0
    for n in pieces:
        out.append(tr.forward(tokens[pos:pos + n], pos, all_logits=True))
        pos += n
    return np.concatenate(out)


def stored_values(m: ModelFile) -> dict:
    return {name: to_float32(m.tensors[name], spec.float_type) for name, spec in m.specs.items()}


CASES = {
    "llama": dict(),
    "llama-mha": dict(n_kv_heads=4),
    "llama-gelu": dict(hidden_act=HiddenAct.GELU),
    "llama-gqa4": dict(n_heads=8, n_kv_heads=2, head_dim=8),
    "llama3.1-rope": dict(rope_type=RopeType.LLAMA3_1, rope_scaling_factor=8.0, rope_scaling_low_freq_factor=1.0,
                          rope_scaling_high_freq_factor=4.0, rope_scaling_orig_max_seq_len=40, rope_theta=500000.0),  # all three bands
    "qwen3": dict(arch=ArchType.QWEN3, head_dim=32),
    "qwen3-moe": dict(arch=ArchType.QWEN3_MOE),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pieces", [[17], [1] * 17, [5, 1, 11]])
def test_f32_forward_matches_float64(tmp_path, case, pieces, kernels):
    h = tiny_header(FloatType.F32, **CASES[case])
    values = write_random_model(tmp_path / "m.m", h)
    tr = Transformer(ModelFile(tmp_path / "m.m"), backend=kernels)
    got = run_in_pieces(tr, TOKENS, pieces)
    want = forward64(values, h, TOKENS)
    # float32 accumulation over a few hundred products per layer: ~1e-6 relative each, a few
    # layers deep; logits are O(1). 2e-4 absolute leaves a wide margin without hiding bugs
    # (a wrong rope pair or mask moves logits by 1e-1 or more).
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("wt, kernels", [
    pytest.param(FloatType.Q40, "numpy", id="Q40-numpy"),
    *(pytest.param(FloatType.Q40, f"numba-{path}", marks=skip, id=f"Q40-numba-{path}") for path, skip in simd_paths()),
    *(pytest.param(wt, k, id=f"{wt.name}-{k}") for wt in (FloatType.Q80, FloatType.F16) for k in KERNELS),
], indirect=["kernels"])
def test_quantized_weights_match_float64_of_stored_values(tmp_path, wt, kernels):
    h = tiny_header(wt)
    write_random_model(tmp_path / "m.m", h)
    m = ModelFile(tmp_path / "m.m")
    want = forward64(stored_values(m), h, TOKENS)
    got = run_in_pieces(Transformer(m, backend=kernels), TOKENS, [9, 8])
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # Q80 activations: each matmul input moves by up to half a Q80 step (amax/254 per block);
    # through two layers that stays far below the logits' spread but above float32 noise.
    got_q80 = run_in_pieces(Transformer(m, buffer_type=FloatType.Q80, backend=kernels), TOKENS, [9, 8])
    err = np.abs(got_q80 - want).max()
    if wt.is_quantized:
        assert 0 < err < 0.05 * np.abs(want).max()
    else:
        assert err < 2e-4  # q80 buffers only apply to quantized weights


def test_last_token_logits_equal_all_logits_row(tmp_path, kernels):
    h = tiny_header()
    write_random_model(tmp_path / "m.m", h)
    m = ModelFile(tmp_path / "m.m")
    all_rows = Transformer(m, backend=kernels).forward(TOKENS[:7], 0, all_logits=True)
    last = Transformer(m, backend=kernels).forward(TOKENS[:7], 0)
    np.testing.assert_allclose(last, all_rows[-1], atol=1e-5)


def test_context_full_and_bad_tokens(tmp_path, kernels):
    h = tiny_header(seq_len=8)
    write_random_model(tmp_path / "m.m", h)
    tr = Transformer(ModelFile(tmp_path / "m.m"), backend=kernels)
    with pytest.raises(DllamaError, match="context is full"):
        tr.forward([1, 2, 3], 6)
    with pytest.raises(DllamaError, match="out of range"):
        tr.forward([h.vocab_size], 0)


def test_dense_budget_zero_gives_the_same_result(tmp_path):
    from dllama.model.dense import DenseBudget

    h = tiny_header(FloatType.Q40)
    write_random_model(tmp_path / "m.m", h)
    m = ModelFile(tmp_path / "m.m")
    a = Transformer(m, backend="numpy").forward(TOKENS[:5], 0, all_logits=True)
    b = Transformer(m, budget=DenseBudget(0), backend="numpy").forward(TOKENS[:5], 0, all_logits=True)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("wt", [FloatType.F32, FloatType.F16])
def test_jit_blocks_multiply_float_weights_in_place(tmp_path, wt):
    """F32 and F16 weights need no repacking: the JIT blocks read the memory map itself (a copy
    would hold those matrices twice). Only the stacked ones (q|k|v, w1|w3) are new arrays."""
    h = tiny_header(wt)
    write_random_model(tmp_path / "m.m", h)
    m = ModelFile(tmp_path / "m.m")
    blocks = Transformer(m, backend="numba").blocks
    assert np.shares_memory(blocks.end_args.w[0], m.tensors["output"])
    for i in range(h.n_layers):
        assert np.shares_memory(blocks.attention_args[i].o[0], m.tensors[f"layers.{i}.o"])
        assert np.shares_memory(blocks.ffn_args[i].w2[0], m.tensors[f"layers.{i}.w2"])
