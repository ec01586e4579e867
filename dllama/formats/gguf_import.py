"""GGUF (llama.cpp) to distributed-llama files: ``.m`` weights, ``.t`` tokenizer and its sidecar.

Tensors are read through the ``gguf`` package one at a time, so memory stays near the size of
the largest tensor. A tensor whose GGUF type is the ``.m`` type (ggml's Q4_0 and Q8_0 blocks are
our Q40 and Q80 blocks; F16, F32) is copied bit for bit; any other is dequantized and encoded in
the chosen type (rounded once more). Without a chosen type, ``default_weight_type`` picks the
one that loses nothing, or the least. When some matrix must be rounded to Q40, a caller's
``calibrate`` may first weigh that rounding by how much each input column matters (it reads
the whole model once; see ``formats.converted``). llama.cpp stores Llama q/k rows already
permuted for interleaved rope, the layout ``.m`` uses, so they are copied as they are (the
perplexity test guards this); Qwen3 uses NeoX rope and no permutation either.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from dllama.errors import FormatError
from dllama.formats.converted import Calibration, ConvertedPaths, calibrated_importance, write_converted
from dllama.formats.gguf_tokenizer import gguf_field
from dllama.formats.mfile import (
    ArchType,
    HiddenAct,
    ModelHeader,
    RopeType,
    TensorSpec,
    nearest_norm_epsilon,
    tensor_plan,
    validate_header,
)
from dllama.kernels.quants import FloatType
from dllama.kernels.reference import rope_frequencies

ARCHS = {"llama": ArchType.LLAMA, "qwen3": ArchType.QWEN3, "qwen3moe": ArchType.QWEN3_MOE}
# Llama 3.1 rope scaling as Meta ships it; llama.cpp keeps only the resulting per-pair factors.
LLAMA31_LOW_FREQ_FACTOR = 1.0
LLAMA31_HIGH_FREQ_FACTOR = 4.0
LLAMA31_ORIG_CONTEXT = 8192


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except Exception as e:  # the gguf package raises bare ValueError/struct errors on bad files
        raise FormatError(f"{path}: not a readable GGUF file ({e})") from None


def _llama31_rope(reader, tensors) -> tuple[dict, np.ndarray]:
    """Recover Llama 3.1 rope scaling from llama.cpp's ``rope_freqs`` tensor (pair divisors)."""
    from gguf import quants

    t = tensors["rope_freqs.weight"]
    divisors = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
    factor = float(divisors.max())
    params = dict(rope_scaling_factor=factor, rope_scaling_low_freq_factor=LLAMA31_LOW_FREQ_FACTOR,
                  rope_scaling_high_freq_factor=LLAMA31_HIGH_FREQ_FACTOR,
                  rope_scaling_orig_max_seq_len=int(gguf_field(reader, "llama.rope.scaling.original_context_length",
                                                            LLAMA31_ORIG_CONTEXT)))
    return params, divisors


def header_from_gguf(reader, path: Path, weight_type: FloatType) -> tuple[ModelHeader, dict]:
    arch_name = gguf_field(reader, "general.architecture")
    if arch_name not in ARCHS:
        raise FormatError(f"{path}: unsupported architecture {arch_name!r} (supported: {', '.join(ARCHS)})")
    a = arch_name
    tensors = {t.name: t for t in reader.tensors}

    def need(key: str):
        v = gguf_field(reader, f"{a}.{key}")
        if v is None:
            raise FormatError(f"{path}: GGUF has no {a}.{key}")
        return v

    dim = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = int(gguf_field(reader, f"{a}.vocab_size", len(tokens) if tokens is not None else 0))
    if "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])
    kwargs = dict(
        arch=ARCHS[a], dim=dim, n_layers=int(need("block_count")), n_heads=n_heads,
        n_kv_heads=int(gguf_field(reader, f"{a}.attention.head_count_kv", n_heads)),
        vocab_size=vocab, seq_len=int(need("context_length")), weight_type=weight_type,
        hidden_act=HiddenAct.SILU, rope_theta=float(gguf_field(reader, f"{a}.rope.freq_base", 10000.0)),
        head_dim=int(gguf_field(reader, f"{a}.attention.key_length", dim // n_heads)),
        norm_epsilon=nearest_norm_epsilon(float(need("attention.layer_norm_rms_epsilon"))),
        rope_type=RopeType.FALCON if a.startswith("qwen3") else RopeType.LLAMA,
        hidden_dim=int(gguf_field(reader, f"{a}.feed_forward_length", 0)),
    )
    if ARCHS[a] == ArchType.QWEN3_MOE:
        kwargs.update(n_experts=int(need("expert_count")), n_active_experts=int(need("expert_used_count")),
                      moe_hidden_dim=int(need("expert_feed_forward_length")))
    extra = {}
    if "rope_freqs.weight" in tensors:
        params, divisors = _llama31_rope(reader, tensors)
        kwargs.update(params, rope_type=RopeType.LLAMA3_1)
        extra["rope_divisors"] = divisors
    header = ModelHeader(**kwargs)
    if "rope_divisors" in extra:
        scaling = (header.rope_scaling_factor, header.rope_scaling_low_freq_factor,
                   header.rope_scaling_high_freq_factor, header.rope_scaling_orig_max_seq_len)
        divisors = rope_frequencies(header.head_dim, header.rope_theta) / rope_frequencies(
            header.head_dim, header.rope_theta, scaling)
        if not np.allclose(divisors, extra["rope_divisors"], rtol=1e-3):
            raise FormatError(f"{path}: rope_freqs do not match Llama 3.1 scaling; cannot convert")
    return header, tensors


def _same_blocks() -> dict:
    """GGUF tensor types stored exactly as a ``.m`` weight type stores them."""
    from gguf import GGMLQuantizationType as G

    return {G.Q4_0: FloatType.Q40, G.Q8_0: FloatType.Q80, G.F16: FloatType.F16, G.F32: FloatType.F32}


def default_weight_type(reader) -> tuple[FloatType, str]:
    """The ``.m`` weight type for a GGUF's matrices when the user chose none, and why: its own
    type when ``.m`` has it (copied bit for bit), Q80 for other quantized types (the least
    rounding ``.m`` offers), F32 when float weights are wider than F16."""
    from gguf import GGMLQuantizationType as G

    types = {t.tensor_type for t in reader.tensors if len(t.shape) >= 2 and t.name != "token_embd.weight"}
    names = ", ".join(sorted(t.name for t in types))
    same = _same_blocks()
    if len(types) == 1 and next(iter(types)) in same:
        chosen = same[next(iter(types))]
        return chosen, f"the GGUF's matrices are {names}: copied bit for bit"
    floats = {G.F32, G.F16, G.BF16}
    if types and not types & floats:
        return FloatType.Q80, f"the GGUF's matrices are {names}, which .m does not store: Q80 rounds them the least"
    if types & {G.F32, G.BF16}:
        return FloatType.F32, f"the GGUF's matrices are {names}: F32 holds them without rounding"
    return FloatType.F16, f"the GGUF's matrices are {names}: F16 holds them without rounding"


def _source_name(name: str) -> tuple[str, int | None]:
    """GGUF tensor (and expert index, for stacked MoE tensors) behind a ``.m`` tensor name."""
    if name == "embedding":
        return "token_embd.weight", None
    if name == "final_norm":
        return "output_norm.weight", None
    if name == "output":
        return "output.weight", None
    parts = name.split(".")
    layer = parts[1]
    simple = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "w1": "ffn_gate",
              "w2": "ffn_down", "w3": "ffn_up", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm",
              "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "router": "ffn_gate_inp"}
    if parts[2] == "experts":
        stacked = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}[parts[4]]
        return f"blk.{layer}.{stacked}.weight", int(parts[3])
    return f"blk.{layer}.{simple[parts[2]]}.weight", None


def _tensor_values(t, expert: int | None, spec: TensorSpec) -> np.ndarray:
    """The tensor as ``spec``'s stored elements: its blocks bit for bit when its GGUF type is
    ``spec``'s, else dequantized and encoded once (``ModelWriter`` takes float32 values)."""
    from gguf import GGMLQuantizationType, quants

    data = t.data if expert is None else t.data[expert]
    if _same_blocks().get(t.tensor_type) == spec.float_type:
        values = np.ascontiguousarray(data).view(np.uint8).reshape(-1).view(spec.float_type.element_dtype)
        n_wanted = int(np.prod(spec.stored_shape))
    elif t.tensor_type == GGMLQuantizationType.F32:
        values, n_wanted = np.asarray(data, dtype=np.float32).reshape(-1), spec.n_values
    else:
        values, n_wanted = np.asarray(quants.dequantize(data, t.tensor_type), dtype=np.float32).reshape(-1), spec.n_values
    if values.size != n_wanted:
        raise FormatError(f"tensor {t.name} has {values.size} values, expected {n_wanted} for shape {spec.shape}")
    return values.reshape(spec.stored_shape if values.dtype == spec.float_type.element_dtype else spec.shape)


def _rounds_to_q40(header: ModelHeader, source_of: Callable[[TensorSpec], object]) -> bool:
    """Whether some Q40 tensor of the plan is not a Q4_0 tensor in the GGUF (copied bit for bit
    otherwise, so nothing is left to calibrate)."""
    from gguf import GGMLQuantizationType as G

    return any(spec.float_type == FloatType.Q40 and source_of(spec).tensor_type != G.Q4_0
               for spec in tensor_plan(header))


def convert_gguf(path: str | Path, output_dir: str | Path, weight_type: FloatType | None,
                 name: str | None = None, progress: bool = True,
                 say: Callable[[str], None] | None = None, calibrate: Calibration | None = None) -> ConvertedPaths:
    """Write ``<name>_<type>.m``, ``<name>.t`` and ``<name>.t.json`` into ``output_dir``
    (``weight_type`` None: ``default_weight_type``'s choice, told to ``say``). ``calibrate``
    (see ``formats.converted``) runs when matrices are rounded to Q40 from another type."""
    from dllama.formats.gguf_tokenizer import tokenizer_from_gguf

    path = Path(path)
    reader = _open(path)
    if weight_type is None:
        weight_type, why = default_weight_type(reader)
        if say is not None:
            say(f"💡 weights: {weight_type.name} ({why}; --weights-float-type chooses another)")
    try:
        header, tensors = header_from_gguf(reader, path, weight_type)
        validate_header(header)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise FormatError(f"{path}: unusable model metadata: {e}") from None
    tok = tokenizer_from_gguf(reader)
    if len(tok.vocab) != header.vocab_size:
        raise FormatError(f"{path}: the tokenizer has {len(tok.vocab)} tokens, the embedding {header.vocab_size}")

    def source_of(spec: TensorSpec):
        src, _ = _source_name(spec.name)
        if src == "output.weight" and src not in tensors:
            src = "token_embd.weight"  # tied output head
        if src not in tensors:
            raise FormatError(f"{path}: GGUF has no tensor {src}")
        return tensors[src]

    def values_of(spec: TensorSpec) -> np.ndarray:
        src, expert = source_of(spec).name, _source_name(spec.name)[1]
        try:
            values = _tensor_values(tensors[src], expert, spec)
        except NotImplementedError:
            raise FormatError(f"{path}: tensor {src} is of type {tensors[src].tensor_type.name}, "
                              f"which the gguf package cannot dequantize") from None
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
        return values

    importance = None
    if calibrate is not None and _rounds_to_q40(header, source_of):
        importance = calibrated_importance(calibrate, header, tok, values_of)
    return write_converted(path, output_dir, name or path.stem, header, tok, values_of, progress, importance)
