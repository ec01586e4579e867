import struct
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dllama.errors import FormatError
from dllama.formats.mfile import (MAGIC, ArchType, HeaderKey, ModelFile, RopeType,
                                  encode_header, read_header, tensor_plan)
from dllama.kernels.quants import FloatType
from tests.helpers import tiny_header, write_random_model


@st.composite
def headers(draw):
    arch = draw(st.sampled_from(list(ArchType)))
    wt = draw(st.sampled_from(list(FloatType)))
    n_kv = draw(st.integers(1, 3))
    n_heads = n_kv * draw(st.integers(1, 3))
    head_dim = 32 * draw(st.integers(1, 2))
    kw = dict(arch=arch, weight_type=wt, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
              dim=32 * draw(st.integers(1, 3)), hidden_dim=32 * draw(st.integers(1, 3)),
              n_layers=draw(st.integers(1, 3)), vocab_size=draw(st.integers(1, 40)),
              seq_len=draw(st.integers(1, 5000)), rope_theta=float(draw(st.integers(1, 10**6))),
              norm_epsilon=draw(st.sampled_from([1e-5, 1e-6])))
    if arch == ArchType.LLAMA and draw(st.booleans()):
        kw.update(rope_type=RopeType.LLAMA3_1, rope_scaling_factor=8.0, rope_scaling_low_freq_factor=1.0,
                  rope_scaling_high_freq_factor=4.0, rope_scaling_orig_max_seq_len=8192)
    return tiny_header(**kw)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers(), st.integers(0, 2**16))
def test_random_models_round_trip(tmp_path, header, seed):
    path = tmp_path / f"m{seed}.m"
    values = write_random_model(path, header, seed)
    m = ModelFile(path)
    assert replace(m.header, header_size=0) == header
    for spec in tensor_plan(header):
        expected = values[spec.name]
        stored = m.tensors[spec.name]
        from dllama.kernels.quants import from_float32
        assert np.array_equal(np.asarray(stored).view(np.uint8),
                              np.asarray(from_float32(expected, spec.float_type)).view(np.uint8)), spec.name


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "small.m"
    write_random_model(path, tiny_header(FloatType.Q40, n_layers=1, vocab_size=8))
    return path.read_bytes()


def _load(tmp_path, data: bytes):
    path = tmp_path / "bad.m"
    path.write_bytes(data)
    with pytest.raises(FormatError) as info:
        ModelFile(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_truncated_anywhere_is_a_clean_error(tmp_path, small_model):
    header_size = struct.unpack("<i", small_model[4:8])[0]
    cuts = list(range(0, header_size + 2)) + list(range(header_size, len(small_model), 97)) + [len(small_model) - 1]
    for cut in cuts:
        _load(tmp_path, small_model[:cut])


def test_padded_file(tmp_path, small_model):
    assert "unexpected bytes" in _load(tmp_path, small_model + b"\0")


def test_bad_and_old_magic(tmp_path, small_model):
    assert "not a distributed-llama model" in _load(tmp_path, b"GGUF" + small_model[4:])
    assert "old model format" in _load(tmp_path, struct.pack("<i", 0xABCD00) + small_model[4:])


def _with_pairs(small_model: bytes, pairs) -> bytes:
    size = struct.unpack("<i", small_model[4:8])[0]
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    return struct.pack("<ii", MAGIC, 8 + len(body)) + body + small_model[size:]


def _pairs(small_model: bytes):
    size = struct.unpack("<i", small_model[4:8])[0]
    ints = struct.unpack(f"<{(size - 8) // 4}i", small_model[8:size])
    return list(zip(ints[0::2], ints[1::2]))


def test_unknown_and_duplicate_keys(tmp_path, small_model):
    pairs = _pairs(small_model)
    assert "unknown header key 99" in _load(tmp_path, _with_pairs(small_model, pairs + [(99, 1)]))
    assert "twice" in _load(tmp_path, _with_pairs(small_model, pairs + [pairs[2]]))


def test_missing_and_invalid_values(tmp_path, small_model):
    pairs = _pairs(small_model)
    no_type = [p for p in pairs if p[0] != HeaderKey.WEIGHT_FLOAT_TYPE]
    assert "weight_float_type" in _load(tmp_path, _with_pairs(small_model, no_type))
    bad = [(k, 7 if k == HeaderKey.WEIGHT_FLOAT_TYPE else v) for k, v in pairs]
    assert "weight float type" in _load(tmp_path, _with_pairs(small_model, bad))
    bad = [(k, 3 if k == HeaderKey.N_KV_HEADS else v) for k, v in pairs]
    assert "multiple of KV heads" in _load(tmp_path, _with_pairs(small_model, bad))
    bad = [(k, 0 if k == HeaderKey.DIM else v) for k, v in pairs]
    assert "must be positive" in _load(tmp_path, _with_pairs(small_model, bad))
    bad = [(k, 7 if k == HeaderKey.NORM_EPSILON else v) for k, v in pairs]
    assert "norm epsilon" in _load(tmp_path, _with_pairs(small_model, bad))
    # a header size that is not whole pairs
    assert "header size" in _load(tmp_path, small_model[:4] + struct.pack("<i", 12) + small_model[8:])


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="cannot read"):
        read_header(tmp_path / "nope.m")


def test_header_writes_only_keys_distributed_llama_knows():
    h = tiny_header()
    keys = [k for k, _ in _pairs(encode_header(h) + b"")]
    assert set(keys) <= set(range(0, 21))
    assert HeaderKey.MOE_HIDDEN_DIM not in keys and HeaderKey.ROPE_SCALING_FACTOR not in keys


def test_distributed_llama_converter_header_loads(tmp_path):
    """A header as distributed-llama's writer.py emits it (its key set and order), then tensors."""
    h = tiny_header(FloatType.Q40, n_layers=1, vocab_size=8)
    params = [(0, 0), (1, ArchType.LLAMA), (2, h.dim), (3, h.hidden_dim), (4, h.n_layers), (5, h.n_heads),
              (6, h.n_kv_heads), (7, 0), (8, 0), (9, h.vocab_size), (10, h.seq_len), (11, 1),
              (12, 10000), (13, 2), (18, 0)]
    ref = tmp_path / "ours.m"
    write_random_model(ref, h)
    data = ref.read_bytes()
    theirs = tmp_path / "theirs.m"
    theirs.write_bytes(_with_pairs(data, params))
    m = ModelFile(theirs)
    assert m.header.head_dim == h.dim // h.n_heads and m.header.norm_epsilon == 1e-5
    assert np.array_equal(np.asarray(m.tensors["output"]).view(np.uint8),
                          np.asarray(ModelFile(ref).tensors["output"]).view(np.uint8))


def test_qwen3_uses_neox_rope_whatever_the_header_says():
    h = tiny_header(arch=ArchType.QWEN3, rope_type=RopeType.LLAMA)
    assert h.effective_rope_type == RopeType.FALCON
    names = [s.name for s in tensor_plan(h)]
    assert names[1:10] == ["layers.0.q", "layers.0.k", "layers.0.v", "layers.0.o", "layers.0.w1",
                           "layers.0.w2", "layers.0.w3", "layers.0.q_norm", "layers.0.k_norm"]


def test_moe_plan_order():
    h = tiny_header(arch=ArchType.QWEN3_MOE)
    names = [s.name for s in tensor_plan(h)]
    assert names[5:9] == ["layers.0.router", "layers.0.experts.0.w1", "layers.0.experts.0.w2",
                          "layers.0.experts.0.w3"]


def test_absurd_sizes_fail_fast_on_the_file_size(tmp_path, small_model):
    """A corrupt layer or expert count must not make the reader list billions of tensors."""
    for key in (HeaderKey.N_LAYERS, HeaderKey.VOCAB_SIZE):
        bad = [(k, 2**31 - 1 if k == key else v) for k, v in _pairs(small_model)]
        assert "truncated" in _load(tmp_path, _with_pairs(small_model, bad))


def test_non_positive_rope_theta(tmp_path, small_model):
    bad = [(k, -5 if k == HeaderKey.ROPE_THETA else v) for k, v in _pairs(small_model)]
    assert "rope theta" in _load(tmp_path, _with_pairs(small_model, bad))


def test_expected_size_matches_the_plan_for_moe():
    from dllama.formats.mfile import expected_file_size

    h = tiny_header(arch=ArchType.QWEN3_MOE, n_experts=5, n_layers=3)
    assert expected_file_size(h) == sum(s.nbytes for s in tensor_plan(h))
