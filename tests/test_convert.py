"""GGUF import: a synthetic GGUF written with the gguf package, and broken inputs."""
import subprocess
import sys

import gguf
import numpy as np
import pytest

from dllama.errors import FormatError
from dllama.formats.gguf_import import convert_gguf
from dllama.formats.gguf_tokenizer import gpt2_unicode_to_byte
from dllama.formats.mfile import ArchType, ModelFile, RopeType
from dllama.kernels.quants import FloatType
from dllama.model.forward import Transformer
from tests.helpers import forward64


DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, CTX = 64, 96, 2, 4, 2, 128


def _byte_vocab():
    """A GPT-2 byte-level vocabulary: 256 byte tokens, two merges, and two special tokens."""
    byte_to_char = {b: c for c, b in gpt2_unicode_to_byte().items()}
    tokens = [byte_to_char[b] for b in range(256)] + ["Ġt", "Ġth", "<|start|>", "<|end|>"]
    types = [1] * 258 + [3, 3]
    merges = ["Ġ t", "Ġt h"]
    return tokens, types, merges


def random_blocks(rng, quant, shape) -> np.ndarray:
    """Blocks of ``quant`` with random scales and quants, as bytes (rows x row bytes): unlike
    what a max-abs quantizer writes, quantizing their values again would not give them back."""
    from dllama.kernels.quants import Q40_BLOCK, Q80_BLOCK

    dtype = Q40_BLOCK if quant == gguf.GGMLQuantizationType.Q4_0 else Q80_BLOCK
    blocks = np.zeros(shape[0] * shape[1] // 32, dtype=dtype)
    blocks["d"] = rng.uniform(0.001, 0.05, blocks.shape).astype(np.float16)
    blocks["qs"] = rng.integers(0, 256, blocks["qs"].shape).astype(blocks["qs"].dtype)
    return blocks.view(np.uint8).reshape(shape[0], -1)


def write_gguf(path, arch="llama", tied=True, quant=gguf.GGMLQuantizationType.Q8_0, seed=0, rope_freqs=None,
               theta=10000.0, raw_blocks=False):
    rng = np.random.default_rng(seed)
    tokens, types, merges = _byte_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    values = {}

    def add(name, shape, quantized=True):
        v = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        if name.endswith("norm.weight"):
            v = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if quantized and quant != gguf.GGMLQuantizationType.F32:
            data = random_blocks(rng, quant, shape) if raw_blocks else gguf.quants.quantize(v, quant)
            v = gguf.quants.dequantize(data, quant).reshape(shape)
            w.add_tensor(name, data, raw_dtype=quant)
        else:
            w.add_tensor(name, v)
        values[name] = v

    add("token_embd.weight", (vocab, DIM))
    hd = DIM // HEADS
    for i in range(LAYERS):
        add(f"blk.{i}.attn_q.weight", (HEADS * hd, DIM))
        add(f"blk.{i}.attn_k.weight", (KV_HEADS * hd, DIM))
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * hd, DIM))
        add(f"blk.{i}.attn_output.weight", (DIM, HEADS * hd))
        add(f"blk.{i}.ffn_gate.weight", (HIDDEN, DIM))
        add(f"blk.{i}.ffn_down.weight", (DIM, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", (HIDDEN, DIM))
        add(f"blk.{i}.attn_norm.weight", (DIM,), quantized=False)
        add(f"blk.{i}.ffn_norm.weight", (DIM,), quantized=False)
    add("output_norm.weight", (DIM,), quantized=False)
    if not tied:
        add("output.weight", (vocab, DIM))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def as_model_values(g: dict) -> dict:
    names = {"token_embd.weight": "embedding", "output_norm.weight": "final_norm", "output.weight": "output"}
    parts = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "w1",
             "ffn_down": "w2", "ffn_up": "w3", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    out = {}
    for name, v in g.items():
        if name in names:
            out[names[name]] = v
        else:
            _, i, part, _ = name.split(".")
            out[f"layers.{i}.{parts[part]}"] = v
    out.setdefault("output", out["embedding"])
    return out


def _no_calibration(*args):
    raise AssertionError("calibration runs only when some matrix is rounded to Q40")


@pytest.mark.parametrize("quant, ft", [(gguf.GGMLQuantizationType.Q4_0, FloatType.Q40),
                                       (gguf.GGMLQuantizationType.Q8_0, FloatType.Q80)])
def test_same_type_blocks_are_copied_bit_for_bit(tmp_path, quant, ft, capsys):
    """ggml's Q4_0 and Q8_0 blocks are our Q40 and Q80 blocks: copied, never rounded again (the
    blocks are random, so dequantizing and quantizing again would change them). Without a
    chosen type, the GGUF's own is chosen, and said."""
    write_gguf(tmp_path / "t.gguf", tied=False, quant=quant, raw_blocks=True)
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    source = {t.name: np.asarray(t.data).view(np.uint8).reshape(-1) for t in reader.tensors}
    said = []
    for chosen in (None, ft):
        out = tmp_path / f"out-{chosen}"
        model = ModelFile(convert_gguf(tmp_path / "t.gguf", out, chosen, progress=False, say=said.append,
                                       calibrate=_no_calibration).model)
        assert model.header.weight_type == ft
        names = {"output": "output.weight", "layers.0.q": "blk.0.attn_q.weight", "layers.1.w2": "blk.1.ffn_down.weight",
                 "layers.0.o": "blk.0.attn_output.weight", "layers.1.w3": "blk.1.ffn_up.weight"}
        for ours, theirs in names.items():
            got = np.ascontiguousarray(model.tensors[ours]).view(np.uint8).reshape(-1)
            assert np.array_equal(got, source[theirs]), ours
    assert said == [f"💡 weights: {ft.name} (the GGUF's matrices are {quant.name}: copied bit for bit; "
                    f"--weights-float-type chooses another)"]


def test_default_type_of_other_quantized_types_is_q80(tmp_path):
    from dllama.formats.gguf_import import default_weight_type

    write_gguf(tmp_path / "t.gguf", quant=gguf.GGMLQuantizationType.Q4_1)
    ft, why = default_weight_type(gguf.GGUFReader(tmp_path / "t.gguf"))
    assert ft == FloatType.Q80 and "Q4_1" in why and "rounds them the least" in why
    write_gguf(tmp_path / "f.gguf", quant=gguf.GGMLQuantizationType.F32)
    assert default_weight_type(gguf.GGUFReader(tmp_path / "f.gguf"))[0] == FloatType.F32


@pytest.mark.parametrize("tied", [True, False])
def test_converted_gguf_runs_like_its_weights(tmp_path, tied):
    values = write_gguf(tmp_path / "tiny.gguf", tied=tied)
    paths = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", FloatType.F32, progress=False)
    m = ModelFile(paths.model)
    h = m.header
    assert (h.arch, h.dim, h.n_layers, h.n_heads, h.n_kv_heads, h.seq_len, h.norm_epsilon) == (
        ArchType.LLAMA, DIM, LAYERS, HEADS, KV_HEADS, CTX, 1e-6)
    tokens = [5, 200, 258, 17, 99, 3, 256, 257]
    want = forward64(as_model_values(values), h, tokens)
    got = Transformer(m).forward(tokens, 0, all_logits=True)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert paths.tokenizer.exists() and paths.tokenizer.with_name(paths.tokenizer.name + ".json").exists()


def test_q40_conversion_stays_close(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", quant=gguf.GGMLQuantizationType.F32)
    f32 = ModelFile(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "a", FloatType.F32, progress=False).model)
    q40 = ModelFile(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "b", FloatType.Q40, progress=False).model)
    from dllama.kernels.quants import q40_block_errors, quantize_q40, quantize_q40_max_abs

    for name, spec in q40.specs.items():
        if spec.float_type == FloatType.Q40:
            x = np.asarray(f32.tensors[name])
            stored = np.asarray(q40.tensors[name])
            # The scale search's blocks (the NumPy reference's bytes), none worse than ggml's
            # max-abs rounding of the same values, and most of them better.
            assert np.array_equal(stored.view(np.uint8), quantize_q40(x).view(np.uint8)), name
            groups = x.reshape(-1, 32).astype(np.float64)
            new = q40_block_errors(groups, stored.reshape(-1))
            old = q40_block_errors(groups, quantize_q40_max_abs(x).reshape(-1))
            assert np.all(new <= old) and new.sum() < 0.95 * old.sum(), name


def test_calibrated_q40_conversion_weighs_each_matrix(tmp_path):
    # From Q4_1 (as SmolLM2 ships): the calibration sees the float32 model once, and each Q40
    # matrix is the search weighted by its own importance; the embedding stays F32.
    from dllama.engine.calibration import calibrate_q40
    from dllama.kernels.quants import quantize_q40

    write_gguf(tmp_path / "t.gguf", quant=gguf.GGMLQuantizationType.Q4_1)
    f32 = ModelFile(convert_gguf(tmp_path / "t.gguf", tmp_path / "a", FloatType.F32, progress=False).model)
    calls, said = [], []

    def calibrate(header, tokenizer, values_of):
        assert header.weight_type == FloatType.F32
        calls.append(calibrate_q40(header, tokenizer, values_of, say=said.append))
        return calls[-1]

    q40 = ModelFile(convert_gguf(tmp_path / "t.gguf", tmp_path / "b", FloatType.Q40, progress=False,
                                 calibrate=calibrate).model)
    assert len(calls) == 1 and len(said) == 1 and said[0].startswith("🎯 calibrated")
    importance = calls[0]
    weighted = [name for name, spec in q40.specs.items() if spec.float_type == FloatType.Q40]
    assert sorted(importance) == sorted(weighted)
    differs = 0
    for name in weighted:
        x = np.asarray(f32.tensors[name])
        stored = np.asarray(q40.tensors[name]).view(np.uint8)
        assert np.array_equal(stored, quantize_q40(x, importance[name]).view(np.uint8)), name
        differs += not np.array_equal(stored, quantize_q40(x).view(np.uint8))
    assert differs == len(weighted)  # the importance changed every matrix's blocks
    assert np.array_equal(q40.tensors["embedding"], f32.tensors["embedding"])


def test_broken_inputs(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path, FloatType.Q40, progress=False)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(FormatError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "text.gguf", tmp_path, FloatType.Q40, progress=False)
    write_gguf(tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        convert_gguf(tmp_path / "half.gguf", tmp_path / "o", FloatType.Q40, progress=False)
    assert not list((tmp_path / "o").glob("*.m")) if (tmp_path / "o").exists() else True


def test_convert_command_errors_are_one_line(tmp_path):
    (tmp_path / "text.gguf").write_text("hello")
    out = subprocess.run([sys.executable, "-m", "dllama", "convert", "gguf", str(tmp_path / "text.gguf"),
                          "--output-dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def llama31_divisors(head_dim, theta, factor=8.0, low=1.0, high=4.0, orig=8192):
    """llama.cpp's rope_freqs for Llama 3.1 (what convert_hf_to_gguf writes), from Meta's formula."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * np.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def test_llama31_rope_is_recovered_from_rope_freqs(tmp_path):
    theta = 500000.0
    values = write_gguf(tmp_path / "l31.gguf", theta=theta, rope_freqs=llama31_divisors(DIM // HEADS, theta))
    m = ModelFile(convert_gguf(tmp_path / "l31.gguf", tmp_path / "o", FloatType.F32, progress=False).model)
    h = m.header
    assert (h.rope_type, h.rope_scaling_factor, h.rope_scaling_low_freq_factor, h.rope_scaling_high_freq_factor,
            h.rope_scaling_orig_max_seq_len) == (RopeType.LLAMA3_1, 8.0, 1.0, 4.0, 8192)
    tokens = [5, 200, 17, 99, 3]
    np.testing.assert_allclose(Transformer(m).forward(tokens, 0, all_logits=True),
                               forward64(as_model_values(values), h, tokens), atol=2e-4, rtol=1e-4)


def test_unrecognized_rope_freqs_are_refused(tmp_path):
    write_gguf(tmp_path / "odd.gguf", rope_freqs=np.linspace(1, 3, DIM // HEADS // 2))
    with pytest.raises(FormatError, match="rope_freqs"):
        convert_gguf(tmp_path / "odd.gguf", tmp_path / "o", FloatType.F32, progress=False)


def test_bad_metadata_is_a_format_error(tmp_path):
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(32)
    w.add_head_count(0)  # would divide by zero
    w.add_layer_norm_rms_eps(1e-5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="bad.gguf"):
        convert_gguf(path, tmp_path / "o", FloatType.Q40, progress=False)
