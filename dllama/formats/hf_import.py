"""Hugging Face checkpoints (``config.json`` + safetensors) to distributed-llama ``.m`` and ``.t``.

Architectures: ``llama`` and ``mistral`` (Llama-family rope), ``qwen3`` and ``qwen3_moe``.
Tensors are streamed one at a time from memory-mapped shards, converted to the chosen weight
type and appended to the ``.m``, so memory stays near the size of the largest tensor.

Llama-family checkpoints rotate the two halves of each head (``rotate_half``); ``.m`` files
rotate adjacent pairs, so q and k rows are permuted per head as distributed-llama's converter
does. Qwen3 keeps NeoX rope and is copied as it is.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dllama.errors import FormatError
from dllama.formats.converted import Calibration, ConvertedPaths, calibrated_importance, write_converted
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
from dllama.formats.safetensors import Checkpoint
from dllama.kernels.quants import FloatType

ARCHS = {"llama": ArchType.LLAMA, "mistral": ArchType.LLAMA, "qwen3": ArchType.QWEN3,
         "qwen3_moe": ArchType.QWEN3_MOE}


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{folder}: no config.json (not a Hugging Face model folder)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path}: unreadable: {e}") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: not a JSON object")
    return config


def _value(config: dict, key: str, default=None):
    """A config value; ``null`` means the default, as in transformers."""
    value = config.get(key)
    return default if value is None else value


def _int(config: dict, key: str, path: Path, default: int | None = None) -> int:
    value = _value(config, key, default)
    if value is None:
        raise FormatError(f"{path}: config has no {key}")
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or value <= 0):
        raise FormatError(f"{path}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _int_spelled(config: dict, keys: tuple[str, ...], path: Path) -> int:
    """An integer that transformers versions spell differently (the first key is the oldest);
    spellings present must agree."""
    values = {key: _int(config, key, path) for key in keys if _value(config, key) is not None}
    if not values:
        raise FormatError(f"{path}: config has no {' or '.join(keys)}")
    if len(set(values.values())) > 1:
        raise FormatError(f"{path}: {' and '.join(f'{k} {v}' for k, v in values.items())} disagree")
    return next(iter(values.values()))


def _whole(value, what: str, path: Path) -> int:
    """``.m`` headers hold integers; a fractional value cannot be stored without changing the model."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise FormatError(f"{path}: {what} {value!r} is not a whole number, which .m files cannot hold")
    return int(value)


def _rope_settings(config: dict, path: Path) -> tuple[object, dict | None]:
    """(rope theta, scaling dict or None) from transformers 4's ``rope_theta``/``rope_scaling``
    or transformers 5's ``rope_parameters`` (both may be present; they must then agree)."""
    theta, scaling = config.get("rope_theta"), config.get("rope_scaling")
    params = config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise FormatError(f"{path}: rope_parameters is not an object")
        if params.get("partial_rotary_factor", 1) != 1:
            raise FormatError(f"{path}: partial rotary embeddings are not supported")
        p_theta = params.get("rope_theta")
        if theta is not None and p_theta is not None and theta != p_theta:
            raise FormatError(f"{path}: rope_theta {theta!r} and rope_parameters' {p_theta!r} disagree")
        theta = p_theta if p_theta is not None else theta
        p_scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if scaling is not None and p_scaling != {k: v for k, v in scaling.items() if k != "rope_theta"}:
            raise FormatError(f"{path}: rope_scaling and rope_parameters disagree")
        scaling = p_scaling
    return (10000 if theta is None else theta), scaling


def _rope(scaling, path: Path) -> dict:
    if scaling is None:
        return {}
    if not isinstance(scaling, dict):
        raise FormatError(f"{path}: rope_scaling is not an object")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return {}
    if kind != "llama3":
        raise FormatError(f"{path}: rope scaling {kind!r} is not supported (only Llama 3.1's 'llama3')")
    try:
        return {
            "rope_type": RopeType.LLAMA3_1,
            "rope_scaling_factor": float(_whole(scaling["factor"], "rope scaling factor", path)),
            "rope_scaling_low_freq_factor": float(_whole(scaling["low_freq_factor"], "low_freq_factor", path)),
            "rope_scaling_high_freq_factor": float(_whole(scaling["high_freq_factor"], "high_freq_factor", path)),
            "rope_scaling_orig_max_seq_len": _whole(scaling["original_max_position_embeddings"],
                                                    "original_max_position_embeddings", path),
        }
    except KeyError as e:
        raise FormatError(f"{path}: llama3 rope scaling lacks {e.args[0]}") from None


def _sliding_window(config: dict, model_type: str, path: Path) -> int | None:
    """The attention window, with transformers' defaults: Mistral's config defaults to 4096,
    Qwen3's window applies only with ``use_sliding_window``; Llama has none."""
    if model_type == "mistral":
        if "sliding_window" not in config:
            return 4096
        return None if config["sliding_window"] is None else _int(config, "sliding_window", path)
    if model_type.startswith("qwen3") and config.get("use_sliding_window"):
        return _int(config, "sliding_window", path, 4096)
    return None


def header_from_config(config: dict, folder: Path, weight_type: FloatType) -> ModelHeader:
    """The ``.m`` header of a checkpoint; FormatError for what the engine cannot run exactly."""
    path = folder / "config.json"
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHS:
        raise FormatError(f"{path}: architecture {model_type!r} is not supported "
                          f"(supported: {', '.join(ARCHS)})")
    arch = ARCHS[model_type]
    act = _value(config, "hidden_act", _value(config, "hidden_activation", "silu"))
    if act != "silu":
        raise FormatError(f"{path}: hidden activation {act!r} is not supported for {model_type} (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise FormatError(f"{path}: {flag} is set; biases are not supported")
    eps = _value(config, "rms_norm_eps", 1e-6)
    try:
        norm_epsilon = nearest_norm_epsilon(eps)
    except ValueError as e:
        raise FormatError(f"{path}: rms_norm_eps: {e}") from None
    dim = _int(config, "hidden_size", path)
    n_heads = _int(config, "num_attention_heads", path)
    seq_len = _int(config, "max_position_embeddings", path)
    window = _sliding_window(config, model_type, path)
    if window is not None:
        # Within its window, sliding-window attention is full attention: cap the context there.
        seq_len = min(seq_len, window)
    theta, scaling = _rope_settings(config, path)
    # transformers' Qwen3 configs default the head size to 128; the Llama family derives it.
    head_dim = _int(config, "head_dim", path, 128 if arch != ArchType.LLAMA else dim // n_heads)
    kwargs = {
        "arch": arch, "dim": dim, "hidden_dim": _int(config, "intermediate_size", path),
        "n_layers": _int(config, "num_hidden_layers", path), "n_heads": n_heads,
        "n_kv_heads": _int(config, "num_key_value_heads", path, n_heads),
        "vocab_size": _int(config, "vocab_size", path), "seq_len": seq_len, "weight_type": weight_type,
        "hidden_act": HiddenAct.SILU, "rope_theta": float(_whole(theta, "rope_theta", path)),
        "rope_type": RopeType.FALCON if arch != ArchType.LLAMA else RopeType.LLAMA,
        "head_dim": head_dim, "norm_epsilon": norm_epsilon,
    }
    kwargs.update(_rope(scaling, path))
    if arch == ArchType.QWEN3_MOE:
        if config.get("norm_topk_prob") is not True:
            raise FormatError(f"{path}: norm_topk_prob must be true (the engine renormalizes the top-k weights)")
        if _value(config, "decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
            raise FormatError(f"{path}: dense layers inside a MoE model (decoder_sparse_step, mlp_only_layers) "
                              f"are not supported")
        # transformers 5 writes num_local_experts where 4 wrote num_experts.
        kwargs.update(n_experts=_int_spelled(config, ("num_experts", "num_local_experts"), path),
                      n_active_experts=_int(config, "num_experts_per_tok", path),
                      moe_hidden_dim=_int(config, "moe_intermediate_size", path))
    header = ModelHeader(**kwargs)
    try:
        validate_header(header)
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    return header


def rope_pairs_from_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q or k reordered per head from ``rotate_half`` order (i, i + d/2) to adjacent
    pairs (2i, 2i + 1), the order ``.m`` Llama rope reads."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _source(spec_name: str) -> str:
    """The Hugging Face tensor behind a ``.m`` tensor."""
    if spec_name == "embedding":
        return "model.embed_tokens.weight"
    if spec_name == "final_norm":
        return "model.norm.weight"
    if spec_name == "output":
        return "lm_head.weight"
    parts = spec_name.split(".")
    p = f"model.layers.{parts[1]}."
    if parts[2] == "experts":
        ffn = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}[parts[4]]
        return f"{p}mlp.experts.{parts[3]}.{ffn}.weight"
    return p + {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm", "router": "mlp.gate",
        "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj",
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }[parts[2]] + ".weight"


def default_name(folder: Path) -> str:
    """The folder's name; for a Hugging Face cache snapshot (``models--Org--Name/snapshots/<hash>``)
    the model's name."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return folder.name


def _check_unused(ckpt: Checkpoint, used: set[str], folder: Path) -> None:
    """Tensors the plan does not read would be silently dropped: biases change the model."""
    for name in ckpt.tensors:
        if name not in used and (name.endswith(".bias") or name.startswith("model.layers.")):
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a cached buffer some exports keep, recomputed from the config
            raise FormatError(f"{folder}: tensor {name} is not part of the model as .m files hold it "
                              f"(biases or another unsupported variant)")


def convert_hf(folder: str | Path, output_dir: str | Path, weight_type: FloatType, name: str | None = None,
               progress: bool = True, calibrate: Calibration | None = None) -> ConvertedPaths:
    """Write ``<name>_<type>.m``, ``<name>.t`` and ``<name>.t.json`` into ``output_dir``.
    ``calibrate`` (see ``formats.converted``) runs for Q40: checkpoints hold floats, so every
    matrix is rounded."""
    from dllama.formats.hf_tokenizer import tokenizer_from_hf

    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder")
    config = read_config(folder)
    header = header_from_config(config, folder, weight_type)
    # Absent means untied for these architectures (their transformers configs default to False).
    tied = bool(config.get("tie_word_embeddings", False))
    ckpt = Checkpoint(folder)
    tokenizer = tokenizer_from_hf(folder)
    if len(tokenizer.vocab) > header.vocab_size:
        raise FormatError(f"{folder}: the tokenizer has {len(tokenizer.vocab)} tokens, more than the model's "
                          f"vocabulary of {header.vocab_size}")

    sources = {}
    for spec in tensor_plan(header):
        src = _source(spec.name)
        if spec.name == "output" and tied:
            src = "model.embed_tokens.weight"
        if src not in ckpt:
            raise FormatError(f"{folder}: the checkpoint has no tensor {src}")
        shape = ckpt.shape(src)
        if math.prod(shape) != spec.n_values or (len(spec.shape) == 2 and tuple(shape) != spec.shape):
            raise FormatError(f"{folder}: tensor {src} has shape {list(shape)}, the config implies {list(spec.shape)}")
        ckpt.check_dtype(src)
        sources[spec.name] = src
    _check_unused(ckpt, set(sources.values()), folder)

    def values_of(spec: TensorSpec) -> np.ndarray:
        src = sources[spec.name]
        values = ckpt.float32(src).reshape(spec.shape)
        if not np.isfinite(values).all():
            raise FormatError(f"{folder}: tensor {src} holds NaN or infinite values")
        if header.arch == ArchType.LLAMA and spec.name.endswith((".q", ".k")):
            values = rope_pairs_from_halves(values, header.n_heads if spec.name.endswith(".q") else header.n_kv_heads)
        return values

    try:
        importance = None
        if calibrate is not None and weight_type == FloatType.Q40:
            importance = calibrated_importance(calibrate, header, tokenizer, values_of)
        return write_converted(folder, output_dir, name or default_name(folder), header, tokenizer, values_of,
                               progress, importance)
    finally:
        ckpt.close()
