"""Hugging Face import: tiny checkpoints in HF's exact layout (bf16, sharded safetensors,
config.json, tokenizer.json; see tests/hf_checkpoints.py) are converted with ``convert_hf``
and run by dllama's forward; the logits are compared with a float64 forward written from
transformers' modeling code on the checkpoint's own (unpermuted) weights (tests/hf_reference.py).

Tolerances, relative to the largest reference logit (the logits here spread by ~4 and reach 16..25):

- F32: 1e-4. The stored values are the checkpoint's bf16 values exactly, so only float32
  arithmetic separates dllama from the float64 reference (measured 2e-7..7e-7, both backends,
  prompt and token by token). A wrong q/k permutation, a missed rope scaling (1e-3 even with
  Llama 3.1's own constants, whose long wavelengths barely move in 12 positions; units with a
  64-position original context), a wrong norm epsilon or head size each cost far more.
- Q80/Q40, exact: 1e-4 as well, against the same float64 forward run on the weights dllama must
  hold (every matrix it quantizes rounded through dllama's own Q80/Q40 blocks; quantization
  works on rows, so it commutes with the q/k row permutation). With float32 activation buffers
  the kernels multiply the dequantized weights in float32 (measured 2e-7..6e-7), so any mistake
  of the converter (a permutation, a transposition, another rounding) shows.
- Q80/Q40 against the unquantized reference, what weight quantization alone does to random
  Gaussian weights: Q80's absmax/127 step leaves ~0.5% error per weight, ~1.5% on the logits
  after seven matrices (measured <= 1.8%; bound 4%); Q40's absmax/8 step ~7.6% per weight, ~16x
  Q80's (measured <= 27%; bound 50%). Greedy argmax agreement: >= 10/12 positions (Q80,
  measured 11..12) and >= 6/12 (Q40, measured 7..12; the reference's smallest top-2 gap is
  0.02..0.5, so 4-bit weights flip some).
- 1, 2 and 3 nodes: 1e-5 (F32; only the order of the partial sums differs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dllama.errors import DllamaError, FormatError
from dllama.formats.hf_import import convert_hf
from dllama.formats.mfile import ArchType, ModelFile, RopeType
from dllama.kernels.backend import NUMBA, NUMPY
from dllama.kernels.quants import FloatType, from_float32, to_float32
from dllama.model.forward import Transformer
from tests import hf_checkpoints as hc
from tests import hf_reference as hr
from tests.threaded_cluster import ThreadedCluster

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 64
N_TOKENS = 12

# name -> write_checkpoint arguments
VARIANTS = {
    # Llama 3.2-like: Llama 3.1's exact rope scaling, head_dim spelled out, tied head, EOS list
    "llama3.1-rope": dict(arch="llama", rope_scaling=True, head_dim=16, tie_word_embeddings=True),
    # the same scaling rule with a 64-position original context: all three frequency bands
    # change within 12 positions, so ignoring or misreading the scaling shows plainly
    "llama-rope-short": dict(arch="llama", rope_scaling=dict(hc.LLAMA3_ROPE_SCALING, original_max_position_embeddings=64),
                             rope_theta=10000.0),
    "llama": dict(arch="llama", rope_theta=10000.0),
    "mistral": dict(arch="mistral"),
    "qwen3": dict(arch="qwen3"),
    "qwen3_moe": dict(arch="qwen3_moe"),
}
F32_TOL = 1e-4
QUANT_EXACT_TOL = 1e-4
QUANT_LOOSE_TOL = {FloatType.Q80: 0.04, FloatType.Q40: 0.5}
QUANT_ARGMAX = {FloatType.Q80: 10, FloatType.Q40: 6}
CLUSTER_TOL = 1e-5


class Store:
    """Checkpoints and conversions made once per module."""

    def __init__(self, root: Path):
        self.root = root
        self.checkpoints: dict[str, hc.Checkpoint] = {}
        self.converted: dict[tuple[str, FloatType], object] = {}
        self.refs: dict[tuple[str, FloatType | None], np.ndarray] = {}

    def checkpoint(self, variant: str) -> hc.Checkpoint:
        if variant not in self.checkpoints:
            args = dict(VARIANTS[variant])
            if variant == "llama3.1-rope":
                ids = hc.special_ids("llama", hc.make_config("llama")["vocab_size"])
                args["eos_token_id"] = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
            self.checkpoints[variant] = hc.write_checkpoint(self.root / "hf" / variant, **args)
        return self.checkpoints[variant]

    def convert(self, variant: str, wt: FloatType):
        key = (variant, wt)
        if key not in self.converted:
            out = self.root / "out" / f"{variant}-{wt.name.lower()}"
            self.converted[key] = convert_hf(self.checkpoint(variant).folder, out, wt, progress=False)
        return self.converted[key]

    def model(self, variant: str, wt: FloatType) -> ModelFile:
        return ModelFile(self.convert(variant, wt).model)

    def reference(self, variant: str, wt: FloatType | None = None) -> np.ndarray:
        """float64 logits of tokens(checkpoint): of the checkpoint, or (wt quantized) of the weights dllama
        must hold after quantizing every matrix it quantizes."""
        key = (variant, wt)
        if key not in self.refs:
            ck = self.checkpoint(variant)
            w = ck.weights if wt is None else quantized_weights(ck, wt)
            self.refs[key] = hr.forward(w, ck.config, tokens(ck))
        return self.refs[key]


def quantized_weights(ck: hc.Checkpoint, wt: FloatType) -> dict[str, np.ndarray]:
    """The checkpoint's weights as a ``wt`` model holds them: projections and the output head
    rounded through wt's blocks (rows are cut along the input axis, so a permutation of rows
    commutes with it); the embedding table, norms and router stay float32."""
    out = dict(ck.weights)
    if ck.config.get("tie_word_embeddings") and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    for name, v in list(out.items()):
        if v.ndim == 2 and (name.endswith("_proj.weight") or name == "lm_head.weight"):
            out[name] = to_float32(from_float32(v.astype(np.float32), wt), wt).astype(np.float64)
    return out


def tokens(ck: hc.Checkpoint) -> list[int]:
    """A fixed sequence of ordinary (non-special) tokens."""
    n_special = len(hc.special_ids(ck.config["model_type"], ck.config["vocab_size"]))
    rng = np.random.default_rng(123)
    return [int(t) for t in rng.integers(0, ck.config["vocab_size"] - n_special, N_TOKENS)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("hf"))


def max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / np.abs(want).max())


def run_prompt(model: ModelFile, toks: list[int], backend: str) -> np.ndarray:
    return Transformer(model, seq_len=SEQ_LEN, backend=backend).forward(toks, 0, all_logits=True)


def run_decode(model: ModelFile, toks: list[int], backend: str) -> np.ndarray:
    tr = Transformer(model, seq_len=SEQ_LEN, backend=backend)
    return np.stack([tr.forward([t], pos) for pos, t in enumerate(toks)])


# -- the fixtures themselves -------------------------------------------------------------------

def test_safetensors_layout_is_hugging_faces(tmp_path):
    ck = hc.write_checkpoint(tmp_path, "qwen3_moe", shards=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = [p.name for p in hc.shard_files(tmp_path)]
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert set(index["weight_map"]) == set(ck.weights) and set(index["weight_map"].values()) == set(files)
    total = 0
    for f in files:
        raw = (tmp_path / f).read_bytes()
        header, start = hc.read_safetensors_header(tmp_path / f)
        assert start % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
        end = 0
        for name, info in header.items():
            assert index["weight_map"][name] == f and info["dtype"] == "BF16"
            assert tuple(info["shape"]) == ck.weights[name].shape
            a, b = info["data_offsets"]
            bits = np.frombuffer(raw[start + a:start + b], dtype="<u2")
            np.testing.assert_array_equal(hc.from_bf16_bits(bits).reshape(info["shape"]), ck.weights[name])
            end = max(end, b)
            total += b - a
        assert start + end == len(raw)
        tensors, metadata = hc.read_tensors(tmp_path / f)  # as the safetensors library parses it
        assert metadata == {"format": "pt"} and set(tensors) == set(header)
        for name, t in tensors.items():
            np.testing.assert_array_equal(t.astype(np.float64), ck.weights[name])
    assert total == index["metadata"]["total_size"]
    assert "lm_head.weight" in ck.weights and "model.layers.1.mlp.experts.3.down_proj.weight" in ck.weights


def test_bf16_rounds_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -1.0 - 2**-8 - 2**-9, -2.5, 0.0],
                 dtype=np.float32)
    got = hc.from_bf16_bits(hc.to_bf16_bits(x))
    want = [1.0, 1.0, 1.0 + 2**-6, 1.0 + 2**-7, -1.0 - 2**-7, -2.5, 0.0]
    np.testing.assert_array_equal(got, np.array(want, dtype=np.float32))


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_other_dtypes_and_a_single_file(tmp_path, dtype):
    ck = hc.write_checkpoint(tmp_path, "llama", dtype=dtype, shards=1)
    assert [p.name for p in hc.shard_files(tmp_path)] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    header, start = hc.read_safetensors_header(tmp_path / "model.safetensors")
    info = header["model.layers.0.self_attn.q_proj.weight"]
    assert info["dtype"] == dtype.upper()
    raw = (tmp_path / "model.safetensors").read_bytes()[start + info["data_offsets"][0]:start + info["data_offsets"][1]]
    np.testing.assert_array_equal(np.frombuffer(raw, dtype={"f16": "<f2", "f32": "<f4"}[dtype]).reshape(info["shape"]), ck.weights["model.layers.0.self_attn.q_proj.weight"])
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == {"f16": "float16", "f32": "float32"}[dtype]


def test_reference_rope_is_neox_and_llama3_scaling_bands():
    """rotate_half rope turns the pairs (i, i + d/2) by position * inv_freq[i]; Llama 3's
    scaling keeps short wavelengths, divides long ones by the factor and blends between."""
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 10000.0, "rope_scaling": None}
    cos, sin = hr.rope_cos_sin(cfg, np.arange(5))
    q = np.random.default_rng(0).standard_normal((1, 5, 16))
    rq, _ = hr.apply_rotary_pos_emb(q, q, cos, sin)
    ang = np.arange(5)[:, None] * hr.inv_freq(cfg)[None]
    z = (q[0, :, :8] + 1j * q[0, :, 8:]) * np.exp(1j * ang)
    np.testing.assert_allclose(rq[0], np.concatenate([z.real, z.imag], -1), atol=1e-12)
    scaled = dict(cfg, rope_scaling=dict(hc.LLAMA3_ROPE_SCALING, original_max_position_embeddings=64))
    base, got = hr.inv_freq(cfg), hr.inv_freq(scaled)
    wavelen = 2 * np.pi / base
    assert np.array_equal(got[wavelen < 16], base[wavelen < 16])
    np.testing.assert_allclose(got[wavelen > 64], base[wavelen > 64] / 8)
    mid = (wavelen >= 16) & (wavelen <= 64)
    assert mid.any() and np.all((got[mid] < base[mid]) & (got[mid] > base[mid] / 8))


def test_moe_router_choices_are_not_near_ties(store):
    ck = store.checkpoint("qwen3_moe")
    trace: list = []
    hr.forward(ck.weights, ck.config, tokens(ck), trace)
    assert len(trace) == 2 and min(t["margin"].min() for t in trace) > 0.05
    # every expert is used somewhere
    assert len(np.unique(np.concatenate([t["selected"].ravel() for t in trace]))) == 4


def _meta_layout(ck: hc.Checkpoint) -> dict[str, np.ndarray]:
    """The checkpoint under .m names, q/k rows of Llama-family models put back into Meta's
    interleaved pair order (the inverse of transformers' convert_llama_weights_to_hf permute)."""
    c, w = ck.config, ck.weights
    qwen = c["model_type"].startswith("qwen3")

    def unpermute(x, n_heads):
        return x if qwen else x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, -1).transpose(0, 2, 1, 3).reshape(x.shape)

    m = {"embedding": w["model.embed_tokens.weight"], "final_norm": w["model.norm.weight"],
         "output": w.get("lm_head.weight", w["model.embed_tokens.weight"])}
    for i in range(c["num_hidden_layers"]):
        p, q, a = f"model.layers.{i}.", f"layers.{i}.", f"model.layers.{i}.self_attn."
        m[q + "q"] = unpermute(w[a + "q_proj.weight"], c["num_attention_heads"])
        m[q + "k"] = unpermute(w[a + "k_proj.weight"], c["num_key_value_heads"])
        m[q + "v"], m[q + "o"] = w[a + "v_proj.weight"], w[a + "o_proj.weight"]
        if qwen:
            m[q + "q_norm"], m[q + "k_norm"] = w[a + "q_norm.weight"], w[a + "k_norm.weight"]
        m[q + "attn_norm"], m[q + "ffn_norm"] = w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"]
        mlps = {q: p + "mlp."}
        if c["model_type"] == "qwen3_moe":
            m[q + "router"] = w[p + "mlp.gate.weight"]
            mlps = {f"{q}experts.{e}.": f"{p}mlp.experts.{e}." for e in range(c["num_experts"])}
        for ours, theirs in mlps.items():
            for a2, b in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
                m[ours + a2] = w[f"{theirs}{b}_proj.weight"]
    return m


@pytest.mark.parametrize("variant", ["llama-rope-short", "mistral", "qwen3", "qwen3_moe"])
def test_reference_agrees_with_the_meta_layout_forward(store, variant):
    """Two independent float64 forwards: HF's (rotate_half on HF rows) and tests/helpers' (pairs
    (2i, 2i+1) on Meta rows; NeoX for Qwen3): the permutation is the only bridge between them."""
    from dllama.formats.mfile import ModelHeader
    from tests.helpers import forward64

    ck = store.checkpoint(variant)
    c = ck.config
    arch = {"llama": ArchType.LLAMA, "mistral": ArchType.LLAMA, "qwen3": ArchType.QWEN3,
            "qwen3_moe": ArchType.QWEN3_MOE}[c["model_type"]]
    kw = {}
    if c.get("rope_scaling"):
        rs = c["rope_scaling"]
        kw = dict(rope_type=RopeType.LLAMA3_1, rope_scaling_factor=rs["factor"],
                  rope_scaling_low_freq_factor=rs["low_freq_factor"], rope_scaling_high_freq_factor=rs["high_freq_factor"],
                  rope_scaling_orig_max_seq_len=rs["original_max_position_embeddings"])
    h = ModelHeader(arch=arch, dim=c["hidden_size"], hidden_dim=c["intermediate_size"], n_layers=c["num_hidden_layers"],
                    n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"], vocab_size=c["vocab_size"],
                    seq_len=SEQ_LEN, weight_type=FloatType.F32, rope_theta=float(c["rope_theta"]), head_dim=hc.head_dim(c),
                    norm_epsilon=c["rms_norm_eps"], n_experts=c.get("num_experts", 0),
                    n_active_experts=c.get("num_experts_per_tok", 0), moe_hidden_dim=c.get("moe_intermediate_size", 0), **kw)
    np.testing.assert_allclose(forward64(_meta_layout(ck), h, tokens(ck)), store.reference(variant), rtol=0, atol=1e-10)


# -- conversion and forward --------------------------------------------------------------------

def test_header_follows_config(store):
    expect = {"llama3.1-rope": (ArchType.LLAMA, RopeType.LLAMA3_1, 16, 1e-5),
              "llama": (ArchType.LLAMA, RopeType.LLAMA, 16, 1e-5),
              "mistral": (ArchType.LLAMA, RopeType.LLAMA, 16, 1e-5),
              "qwen3": (ArchType.QWEN3, None, 32, 1e-6),
              "qwen3_moe": (ArchType.QWEN3_MOE, None, 32, 1e-6)}
    for variant, (arch, rope, head, eps) in expect.items():
        cfg = store.checkpoint(variant).config
        h = store.model(variant, FloatType.F32).header
        assert (h.arch, h.head_dim, h.norm_epsilon) == (arch, head, eps), variant
        assert (h.dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size) == (
            cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"]), variant
        assert h.rope_theta == pytest.approx(cfg["rope_theta"]), variant
        if rope is not None:
            assert h.rope_type == rope, variant
        if variant == "qwen3_moe":
            assert (h.n_experts, h.n_active_experts, h.moe_hidden_dim) == (4, 2, 96)
        else:
            assert h.hidden_dim == cfg["intermediate_size"], variant
    h = store.model("llama3.1-rope", FloatType.F32).header
    assert (h.rope_scaling_factor, h.rope_scaling_low_freq_factor, h.rope_scaling_high_freq_factor,
            h.rope_scaling_orig_max_seq_len) == (8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_matches_the_hugging_face_forward(store, variant):
    ck = store.checkpoint(variant)
    model = store.model(variant, FloatType.F32)
    want = store.reference(variant)
    toks = tokens(ck)
    for backend in (NUMBA, NUMPY):
        err = max_rel_err(run_prompt(model, toks, backend), want)
        assert err <= F32_TOL, f"{variant} {backend} prompt: max error {err:.2e} of the largest logit"
        err = max_rel_err(run_decode(model, toks, backend), want)
        assert err <= F32_TOL, f"{variant} {backend} token by token: max error {err:.2e} of the largest logit"


@pytest.mark.parametrize("case", [dict(arch="llama", dtype="f16", shards=1), dict(arch="qwen3_moe", dtype="f32", shards=3),
                                  dict(arch="qwen3", vocab_size=336, vocab_padding=16)],
                         ids=["llama-f16-one-file", "qwen3_moe-f32-3-shards", "qwen3-padded-vocab"])
def test_other_checkpoint_forms(tmp_path, case):
    ck = hc.write_checkpoint(tmp_path / "ckpt", seed=7, **case)
    model = ModelFile(convert_hf(ck.folder, tmp_path / "out", FloatType.F32, progress=False).model)
    want = hr.forward(ck.weights, ck.config, tokens(ck))
    err = max_rel_err(run_prompt(model, tokens(ck), NUMBA), want)
    assert err <= F32_TOL, f"{case}: {err:.2e}"


def test_f32_stores_the_checkpoints_values(store):
    """Tensor by tensor, for the tensors that need no reordering (a precise report if one is off)."""
    for variant, pairs in {"llama": [("embedding", "model.embed_tokens.weight"), ("output", "lm_head.weight"),
                                     ("layers.1.v", "model.layers.1.self_attn.v_proj.weight"),
                                     ("layers.0.w2", "model.layers.0.mlp.down_proj.weight"),
                                     ("layers.1.ffn_norm", "model.layers.1.post_attention_layernorm.weight")],
                           "qwen3": [("output", "model.embed_tokens.weight"),
                                     ("layers.0.q_norm", "model.layers.0.self_attn.q_norm.weight"),
                                     ("layers.1.q", "model.layers.1.self_attn.q_proj.weight")],
                           "qwen3_moe": [("layers.1.router", "model.layers.1.mlp.gate.weight"),
                                         ("layers.0.experts.2.w3", "model.layers.0.mlp.experts.2.up_proj.weight"),
                                         ("final_norm", "model.norm.weight")]}.items():
        t = store.model(variant, FloatType.F32).tensors
        w = store.checkpoint(variant).weights
        for ours, theirs in pairs:
            np.testing.assert_array_equal(np.asarray(t[ours], dtype=np.float64), w[theirs], err_msg=f"{variant} {ours}")


@pytest.mark.parametrize("wt", [FloatType.Q80, FloatType.Q40], ids=["q80", "q40"])
@pytest.mark.parametrize("variant", ["llama-rope-short", "mistral", "qwen3", "qwen3_moe"])
def test_quantized_weights(store, variant, wt):
    ck = store.checkpoint(variant)
    model = store.model(variant, wt)
    toks = tokens(ck)
    got = run_prompt(model, toks, NUMBA)
    exact = store.reference(variant, wt)
    err = max_rel_err(got, exact)
    assert err <= QUANT_EXACT_TOL, f"{variant} {wt.name}: {err:.2e} from the forward on {wt.name}-rounded weights"
    err = max_rel_err(run_decode(model, toks, NUMPY), exact)
    assert err <= QUANT_EXACT_TOL, f"{variant} {wt.name} numpy decode: {err:.2e}"
    want = store.reference(variant)
    err = max_rel_err(got, want)
    agree = int((got.argmax(-1) == want.argmax(-1)).sum())
    assert err <= QUANT_LOOSE_TOL[wt], f"{variant} {wt.name}: {err:.2e} from the unquantized forward"
    assert agree >= QUANT_ARGMAX[wt], f"{variant} {wt.name}: greedy choice agrees on {agree}/{N_TOKENS}"


def test_q40_calibration_weighs_each_matrix(tmp_path):
    # The calibration reads the float32 model (Llama q/k already in .m's layout), once, and
    # each Q40 matrix is the search weighted by the importance it returned; Q80 never asks.
    from dllama.kernels.quants import quantize_q40

    ck = hc.write_checkpoint(tmp_path / "ckpt", "llama", seed=5)
    f32 = ModelFile(convert_hf(ck.folder, tmp_path / "f32", FloatType.F32, progress=False).model)
    rng = np.random.default_rng(0)
    given = {}

    def calibrate(header, tokenizer, values_of):
        assert header.weight_type == FloatType.F32 and not given
        for name, spec in f32.specs.items():
            np.testing.assert_array_equal(values_of(spec), np.asarray(f32.tensors[name]).reshape(spec.shape))
            if name != "embedding" and len(spec.shape) == 2:
                given[name] = 10.0 ** rng.uniform(-3, 3, spec.shape[1])
        return given

    q40 = ModelFile(convert_hf(ck.folder, tmp_path / "q40", FloatType.Q40, progress=False, calibrate=calibrate).model)
    for name, imp in given.items():
        x = np.asarray(f32.tensors[name])
        assert np.array_equal(np.asarray(q40.tensors[name]).view(np.uint8), quantize_q40(x, imp).view(np.uint8)), name

    def refuse(*args):
        raise AssertionError("Q80 rounds each value to its nearest: nothing to calibrate")

    convert_hf(ck.folder, tmp_path / "q80", FloatType.Q80, progress=False, calibrate=refuse)


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen3", "qwen3_moe"])
def test_one_two_three_nodes_agree(store, variant):
    ck = store.checkpoint(variant)
    model = store.model(variant, FloatType.F32)
    toks = tokens(ck)
    one = run_prompt(model, toks, NUMBA)
    for split in ([1, 1], [1, 1, 1]):
        cluster = ThreadedCluster(model, split, seq_len=SEQ_LEN, backend=NUMBA)
        try:
            got = cluster.forward(toks, 0, all_logits=True)
            last = cluster.forward([toks[0]], len(toks))
        finally:
            cluster.close()
        err = max_rel_err(got, one)
        assert err <= CLUSTER_TOL, f"{variant} on {len(split)} nodes: {err:.2e}"
        ref_next = Transformer(model, seq_len=SEQ_LEN, backend=NUMBA)
        ref_next.forward(toks, 0)
        assert max_rel_err(last, ref_next.forward([toks[0]], len(toks))) <= CLUSTER_TOL


def test_quantized_three_nodes_agree(store):
    """Q80 split by whole 32-value blocks (Qwen3's head size is 32) gives the one-node logits."""
    model = store.model("qwen3", FloatType.Q80)
    toks = tokens(store.checkpoint("qwen3"))
    one = run_prompt(model, toks, NUMBA)
    cluster = ThreadedCluster(model, [1, 1, 1], seq_len=SEQ_LEN, backend=NUMBA)
    try:
        got = cluster.forward(toks, 0, all_logits=True)
    finally:
        cluster.close()
    assert max_rel_err(got, one) <= CLUSTER_TOL


# -- tokenizer -----------------------------------------------------------------------------------

TEXTS = ["Hello, world!", "The capital of France is Paris.", "  two  spaces and 12345 digits\n\nnew lines",
         "I'm fine; we'll see what they've done.", "Llamas and quantization blocks"]


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen3"])
def test_tokenizer_gives_the_same_ids(store, variant):
    from tokenizers import Tokenizer as HFTokenizer

    from dllama.engine.tokenizer import Tokenizer

    ck = store.checkpoint(variant)
    ours = Tokenizer.load(store.convert(variant, FloatType.F32).tokenizer)
    theirs = HFTokenizer.from_file(str(ck.folder / "tokenizer.json"))
    assert ours.vocab_size == ck.config["vocab_size"]
    fam = hc.TOKENIZER_FAMILIES[hc._FAMILY_OF[ck.config["model_type"]]]
    assert ours.add_bos == fam["add_bos"]
    assert ck.config["eos_token_id"] in ours.eos_ids
    if fam["add_bos"]:
        assert ours.bos_id == ck.config["bos_token_id"]
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text).ids, (variant, text)
        assert ours.decode(ours.encode(text, add_bos=False)) == text
    assert ours.chat_template == fam["template"]
    specials = "".join(fam["specials"][1:])
    text = f"{specials}Hello{fam['eos']} world"
    assert ours.encode(text, allow_special=True) == theirs.encode(text).ids, (variant, text)


def test_tokenizer_keeps_every_eos_of_a_list(store):
    from dllama.engine.tokenizer import Tokenizer

    ck = store.checkpoint("llama3.1-rope")
    ours = Tokenizer.load(store.convert("llama3.1-rope", FloatType.F32).tokenizer)
    assert set(ck.config["eos_token_id"]) <= set(ours.eos_ids)


# -- command line and errors ----------------------------------------------------------------------

def test_cli_converts_and_the_result_runs(tmp_path):
    # Qwen-style padded vocabulary: the model has 16 rows more than the tokenizer has tokens
    ck = hc.write_checkpoint(tmp_path / "TinyQwen3", "qwen3", vocab_size=336, vocab_padding=16)
    out_dir = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    conv = subprocess.run([sys.executable, "-m", "dllama", "convert", "hf", str(ck.folder), "--output-dir",
                           str(out_dir), "--weights-float-type", "q40"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert conv.returncode == 0, conv.stderr
    models, toks = sorted(out_dir.glob("*.m")), sorted(out_dir.glob("*.t"))
    assert len(models) == 1 and len(toks) == 1, sorted(p.name for p in out_dir.iterdir())
    assert ModelFile(models[0]).header.weight_type == FloatType.Q40
    assert "🎯 calibrated the Q40 rounding" in conv.stderr  # the command calibrates Q40 conversions
    run = subprocess.run([sys.executable, "-m", "dllama", "inference", "--model", str(models[0]), "--tokenizer",
                          str(toks[0]), "--prompt", "Hello world", "--steps", "8", "--temperature", "0"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and run.stdout.startswith("Hello world"), run.stdout


def _break(folder: Path, how: str) -> str:
    """Damage a checkpoint; returns a word the one-line error must name."""
    if how == "no-config":
        (folder / "config.json").unlink()
        return "config.json"
    if how == "gpt_neox":
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
        (folder / "config.json").write_text(json.dumps(cfg))
        return "gpt_neox"
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / "model-00002-of-00002.safetensors"
    tensors, meta = hc.read_tensors(shard)
    if how in ("missing-tensor", "no-lm-head"):
        # an untied model without its output head: HF would initialize one at random
        victim = "model.layers.1.self_attn.k_proj.weight" if how == "missing-tensor" else "lm_head.weight"
        assert index["weight_map"].pop(victim) == shard.name
        del tensors[victim]
        hc.write_safetensors(shard, tensors, meta)
        index_path.write_text(json.dumps(index))
        return victim
    header, start = hc.read_safetensors_header(shard)
    raw = shard.read_bytes()
    if how == "overlapping-offsets":
        # Written by hand on purpose: the safetensors library refuses to write (or read) a file
        # whose tensors overlap (InvalidOffset).
        header.pop("__metadata__")
        a, b = header["model.norm.weight"]["data_offsets"]
        header["model.norm.weight"]["data_offsets"] = [0, b - a]
        text = json.dumps(dict(__metadata__=meta, **header)).encode()
        text += b" " * (-len(text) % 8)
        shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[start:])
        return shard.name
    if how == "truncated":
        shard.write_bytes(raw[:len(raw) - 1000])
        return shard.name
    if how == "i32":  # a well-formed tensor of a type that weights never have
        victim = "model.layers.1.mlp.up_proj.weight"
        tensors[victim] = np.ones(tensors[victim].shape, dtype="<i4")
        hc.write_safetensors(shard, tensors, meta)
        return "I32"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["no-config", "gpt_neox", "missing-tensor", "no-lm-head", "truncated", "i32",
                                 "overlapping-offsets"])
def test_bad_checkpoints_are_one_line(tmp_path, capsys, how):
    from dllama.commands import main

    ck = hc.write_checkpoint(tmp_path / "ckpt", "llama", tokenizer=how != "no-config")
    word = _break(ck.folder, how)
    with pytest.raises(DllamaError) as e:
        convert_hf(ck.folder, tmp_path / "out", FloatType.Q40, progress=False)
    assert word in str(e.value) and "\n" not in str(e.value), str(e.value)
    if how in ("no-config", "gpt_neox", "missing-tensor", "no-lm-head"):
        assert isinstance(e.value, FormatError)
    capsys.readouterr()
    code = main(["convert", "hf", str(ck.folder), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    # one line (a progress bar may have drawn itself with carriage returns before it)
    last = err.split("\r")[-1]
    assert code == 1 and err.count("\n") == 1 and last.startswith("error: ") and word in last, err
    assert "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.m")) if (tmp_path / "out").exists() else True


def test_a_binding_sliding_window_is_not_dropped(tmp_path):
    """.m files have no attention window: a Mistral whose sliding_window is shorter than its
    context must be refused (one line naming sliding_window) or get a context no longer than
    the window, where full attention is the same thing. A window as long as the context
    (Mistral v0.3 has none; v0.1 has 4096 of 32768) binds nowhere and converts as usual."""
    ck = hc.write_checkpoint(tmp_path / "loose", "mistral", sliding_window=256, max_position_embeddings=256)
    model = ModelFile(convert_hf(ck.folder, tmp_path / "out1", FloatType.F32, progress=False).model)
    assert max_rel_err(run_prompt(model, tokens(ck), NUMBA), hr.forward(ck.weights, ck.config, tokens(ck))) <= F32_TOL

    ck = hc.write_checkpoint(tmp_path / "tight", "mistral", sliding_window=8)
    windowless = hr.forward(ck.weights, dict(ck.config, sliding_window=None), tokens(ck))
    assert max_rel_err(windowless, hr.forward(ck.weights, ck.config, tokens(ck))) > 0.01  # the window matters
    try:
        paths = convert_hf(ck.folder, tmp_path / "out2", FloatType.F32, progress=False)
    except FormatError as e:
        assert "sliding_window" in str(e) and "\n" not in str(e), str(e)
        return
    seq_len = ModelFile(paths.model).header.seq_len
    assert seq_len <= 8, f"sliding_window 8 dropped: the .m runs full attention over {seq_len} positions"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from Linux's /proc")
def test_conversion_memory_stays_near_the_largest_tensor(tmp_path):
    """Shards are streamed: the converting process's peak memory grows by far less than the
    checkpoint's size, both what it allocates and what it keeps mapped of the shards (their
    pages are released tensor by tensor)."""
    folder = tmp_path / "big"
    ck = hc.write_checkpoint(folder, "llama", shards=2, num_hidden_layers=24, hidden_size=512,
                             intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4)
    checkpoint_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    largest = max(v.size for v in ck.weights.values()) * 4  # as float32
    # Allocations: tracemalloc's peak (NumPy's arrays included), the same on any machine.
    # Resident memory: VmHWM (peak resident set) is per address space: unlike ru_maxrss it does
    # not carry the forking parent's peak across exec.
    script = (
        "import re, sys, tracemalloc\n"
        "from dllama.formats.hf_import import convert_hf\n"
        "from dllama.kernels.quants import FloatType\n"
        # what is loaded once, whatever the model's size, before measuring: modules, and numba's
        # machinery with the JIT Q40 search's compiled code (16 MB of Python objects, and 150 MB
        # more resident when loaded under tracemalloc)
        "import numpy, tqdm, dllama.formats.hf_tokenizer, dllama.formats.tfile\n"
        "from dllama.kernels.backend import q40_quantizer\n"
        "q40_quantizer()(numpy.ones((1, 32), numpy.float32))\n"
        "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "before = peak()\n"
        "tracemalloc.start()\n"
        "convert_hf(sys.argv[1], sys.argv[2], FloatType.Q40, progress=False)\n"
        "print(before, peak(), tracemalloc.get_traced_memory()[1])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before_kb, peak_kb, allocated = map(int, done.stdout.split())
    growth = (peak_kb - before_kb) * 1024
    # Measured for this 152 MB checkpoint, whose largest tensor is 3 MB as float32: 22.5 MB
    # allocated at the peak with the NumPy Q40 quantizer, 6.6 MB with the JIT one that
    # conversions now take (a few copies of a tensor while converting, permuting and
    # quantizing, and the output's buffers), whereas whole shards as float32 would be twice
    # the checkpoint's size.
    assert allocated < checkpoint_bytes / 4, (allocated, largest, checkpoint_bytes)
    # The resident peak adds the shard pages mapped at the time, and how many that is depends
    # on the page cache, not on dllama: 27 MB when the shards were written with many small
    # writes (the former hand-made writer), 38 MB as the safetensors library writes them,
    # 44 MB when read back from disk (large folios). Mapping shards without releasing their
    # pages would add the checkpoint's size.
    assert growth < checkpoint_bytes / 3, (growth, allocated, checkpoint_bytes)


def _config_header(config_changes: dict, arch: str = "llama", drop: tuple[str, ...] = ()):
    from dllama.formats.hf_import import header_from_config

    cfg = dict(hc.make_config(arch), **config_changes)
    for key in drop:
        cfg.pop(key, None)
    return header_from_config(cfg, Path("ckpt"), FloatType.F32)


def test_transformers_5_rope_parameters():
    """transformers 5 moves rope_theta and the scaling into rope_parameters."""
    params = dict(hc.LLAMA3_ROPE_SCALING, rope_theta=500000.0)
    h = _config_header({"rope_parameters": params}, drop=("rope_theta", "rope_scaling"))
    assert h.rope_theta == 500000 and h.rope_type == RopeType.LLAMA3_1 and h.rope_scaling_factor == 8
    h = _config_header({"rope_parameters": {"rope_type": "default", "rope_theta": 1000000}}, "qwen3",
                       drop=("rope_theta",))
    assert h.rope_theta == 1000000 and h.rope_type == RopeType.FALCON
    for bad, word in (({"rope_parameters": {"rope_type": "default", "rope_theta": 5.0}, "rope_theta": 7.0}, "disagree"),
                      ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
                      ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial")):
        with pytest.raises(FormatError, match=word):
            _config_header(bad)


def test_transformers_5_num_local_experts():
    """transformers 5 saves Qwen3-MoE's expert count as num_local_experts (4: num_experts)."""
    old = _config_header({}, "qwen3_moe")
    new = _config_header({"num_local_experts": old.n_experts}, "qwen3_moe", drop=("num_experts",))
    assert new == old and new.n_experts == 4
    assert _config_header({"num_local_experts": 4}, "qwen3_moe") == old  # both spellings, agreeing
    with pytest.raises(FormatError, match="num_experts 4 and num_local_experts 8 disagree"):
        _config_header({"num_local_experts": 8}, "qwen3_moe")
    with pytest.raises(FormatError, match="config has no num_experts or num_local_experts"):
        _config_header({}, "qwen3_moe", drop=("num_experts",))


def test_transformers_defaults_for_absent_and_null_values():
    assert _config_header({"num_key_value_heads": None}).n_kv_heads == 6  # null: as many as heads
    assert _config_header({"rope_theta": None}).rope_theta == 10000
    assert _config_header({}, "qwen3", drop=("head_dim",)).head_dim == 128  # Qwen3Config's default
    assert _config_header({}, "llama", drop=("head_dim",)).head_dim == 96 // 6
    # Mistral's window defaults to 4096 when the key is absent; null means none.
    assert _config_header({"max_position_embeddings": 32768}, "mistral", drop=("sliding_window",)).seq_len == 4096
    assert _config_header({"max_position_embeddings": 32768, "sliding_window": None}, "mistral").seq_len == 32768
    # Qwen3's window only applies with use_sliding_window (absent: false).
    qwen = {"max_position_embeddings": 40960, "sliding_window": 4096}
    assert _config_header(qwen, "qwen3", drop=("use_sliding_window",)).seq_len == 40960
    assert _config_header(dict(qwen, use_sliding_window=True), "qwen3").seq_len == 4096


@pytest.mark.parametrize("change", [{"hidden_size": float("inf")}, {"hidden_size": float("nan")},
                                    {"model_type": []}, {"max_position_embeddings": 2**40}, {"rope_theta": 3e9},
                                    {"rms_norm_eps": "small"}, {"rope_scaling": {"rope_type": "llama3"}}])
def test_bad_config_values_are_one_line(tmp_path, change):
    ck = hc.write_checkpoint(tmp_path / "ckpt", "llama")
    cfg = json.loads((ck.folder / "config.json").read_text())
    (ck.folder / "config.json").write_text(json.dumps(dict(cfg, **change)))
    with pytest.raises(FormatError) as e:
        convert_hf(ck.folder, tmp_path / "out", FloatType.Q40, progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no stray temporary file


@pytest.mark.parametrize("weight_map", [{"a": 1}, {"a": None}, {"a": ".."}, {"a": "../x.safetensors"}, []])
def test_bad_index_is_one_line(tmp_path, weight_map):
    ck = hc.write_checkpoint(tmp_path / "ckpt", "llama")
    (ck.folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FormatError) as e:
        convert_hf(ck.folder, tmp_path / "out", FloatType.Q40, progress=False)
    assert "model.safetensors.index.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("entry", [{"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
                                   {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}, ["F32"]])
def test_malformed_safetensors_headers_are_one_line(tmp_path, entry):
    from dllama.formats.safetensors import read_header

    text = json.dumps({"x": entry}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(8))
    with pytest.raises(FormatError) as e:
        read_header(path)
    assert "\n" not in str(e.value)


def test_unsupported_dtype_is_found_before_writing(tmp_path):
    ck = hc.write_checkpoint(tmp_path / "ckpt", "llama")
    _break(ck.folder, "i32")
    with pytest.raises(FormatError, match="I32"):
        convert_hf(ck.folder, tmp_path / "out", FloatType.Q40, progress=False)
    assert not (tmp_path / "out").exists()  # refused before any output


def test_default_name_of_a_hugging_face_cache_snapshot(tmp_path):
    from dllama.formats.hf_import import default_name

    snapshot = tmp_path / "models--Qwen--Qwen3-0.6B" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    assert default_name(snapshot) == "Qwen3-0.6B"
    assert default_name(tmp_path / "models--Qwen--Qwen3-0.6B") == "models--Qwen--Qwen3-0.6B"
