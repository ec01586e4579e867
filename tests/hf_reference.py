"""A float64 forward pass of Hugging Face's Llama, Mistral, Qwen3 and Qwen3-MoE models.

Written from transformers' modeling_llama.py / modeling_mistral.py / modeling_qwen3.py /
modeling_qwen3_moe.py (and ``_compute_llama3_parameters`` of modeling_rope_utils.py), on the
checkpoint's own weights: Hugging Face names, (out_features, in_features) shapes, q/k rows
*unpermuted* (rotate_half rope), so that it checks the converter's permutation independently.
Nothing of dllama is imported. Whole sequence at positions 0..n-1, no cache; HF's float32
arithmetic is done in float64.
"""
from __future__ import annotations

import math

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """LlamaRMSNorm / Qwen3RMSNorm: x * rsqrt(mean(x²) + eps) * weight, over the last axis."""
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return weight * (x / np.sqrt(variance + eps))


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def inv_freq(config: dict) -> np.ndarray:
    """LlamaRotaryEmbedding's inv_freq: default rope, or Llama 3's scaling (rope_type "llama3")."""
    dim = head_dim(config)
    base = float(config.get("rope_theta", 10000.0))
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))
    scaling = config.get("rope_scaling")
    if not scaling:
        return inv
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return inv
    if rope_type != "llama3":
        raise NotImplementedError(f"rope_type {rope_type!r}")
    # _compute_llama3_parameters (attention_factor stays 1.0)
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_cos_sin(config: dict, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of cat(freqs, freqs): [n, head_dim]."""
    freqs = positions[:, None].astype(np.float64) * inv_freq(config)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([-x2, x1], axis=-1)


def apply_rotary_pos_emb(q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray):
    """q, k: [heads, n, head_dim]; cos, sin: [n, head_dim] (unsqueezed over heads)."""
    cos, sin = cos[None], sin[None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    """[kv_heads, n, d] -> [kv_heads * n_rep, n, d], each KV head repeated for its query heads."""
    return np.repeat(x, n_rep, axis=0)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """nn.Linear without bias: x @ W.T with W [out_features, in_features]."""
    return x @ np.asarray(w, dtype=np.float64).T


def mlp(x: np.ndarray, w: dict, prefix: str) -> np.ndarray:
    """LlamaMLP / Qwen3MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))."""
    return linear(silu(linear(x, w[prefix + "gate_proj.weight"])) * linear(x, w[prefix + "up_proj.weight"]),
                  w[prefix + "down_proj.weight"])


def is_sparse_layer(config: dict, i: int) -> bool:
    if config["model_type"] != "qwen3_moe":
        return False
    return (i not in config.get("mlp_only_layers", []) and config["num_experts"] > 0
            and (i + 1) % config.get("decoder_sparse_step", 1) == 0)


def sparse_moe_block(x: np.ndarray, w: dict, prefix: str, config: dict, trace: list | None = None) -> np.ndarray:
    """Qwen3MoeSparseMoeBlock: softmax over all router logits, top-k, optional renormalization,
    the experts' outputs summed with those weights."""
    top_k = config["num_experts_per_tok"]
    router_logits = linear(x, w[prefix + "gate.weight"])  # [n, experts]
    routing_weights = softmax(router_logits, axis=1)
    order = np.argsort(-routing_weights, axis=-1, kind="stable")
    selected = order[:, :top_k]
    weights = np.take_along_axis(routing_weights, selected, axis=-1)
    if config.get("norm_topk_prob", False):
        weights = weights / weights.sum(axis=-1, keepdims=True)
    if trace is not None:  # how far each token is from a different expert choice
        sorted_logits = np.take_along_axis(router_logits, order, axis=-1)
        trace.append({"selected": selected, "margin": sorted_logits[:, top_k - 1] - sorted_logits[:, top_k]})
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(top_k):
            e = int(selected[t, slot])
            out[t] += weights[t, slot] * mlp(x[t:t + 1], w, f"{prefix}experts.{e}.")[0]
    return out


def sliding_window(config: dict, layer: int) -> int | None:
    """The attention window of a layer: Mistral's sliding_window on every layer; Qwen3's only
    with use_sliding_window, on layers from max_window_layers on; None: full causal attention."""
    window = config.get("sliding_window")
    if not window:
        return None
    if config["model_type"] == "mistral":
        return window
    if config["model_type"] in ("qwen3", "qwen3_moe"):
        use = config.get("use_sliding_window", False) and layer >= config.get("max_window_layers", 0)
        return window if use else None
    return None


def attention(x: np.ndarray, w: dict, prefix: str, config: dict, cos: np.ndarray, sin: np.ndarray,
              window: int | None = None) -> np.ndarray:
    """LlamaAttention / Qwen3Attention (eager): projections, Qwen3's per-head q_norm/k_norm before
    rope, rope, GQA by repeat_kv, causal softmax(q k^T / sqrt(head_dim)) v, o_proj. With a
    sliding ``window``, query i sees keys j with i - window < j <= i."""
    n = x.shape[0]
    D = head_dim(config)
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    eps = config["rms_norm_eps"]
    q = linear(x, w[prefix + "q_proj.weight"]).reshape(n, nh, D)
    k = linear(x, w[prefix + "k_proj.weight"]).reshape(n, nkv, D)
    v = linear(x, w[prefix + "v_proj.weight"]).reshape(n, nkv, D)
    if prefix + "q_norm.weight" in w:
        q = rms_norm(q, w[prefix + "q_norm.weight"], eps)
        k = rms_norm(k, w[prefix + "k_norm.weight"], eps)
    q, k, v = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [heads, n, D]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = repeat_kv(k, nh // nkv), repeat_kv(v, nh // nkv)
    scores = q @ k.transpose(0, 2, 1) * D ** -0.5  # [heads, n, n]
    mask = np.triu(np.ones((n, n), dtype=bool), 1)
    if window is not None:
        mask |= np.tril(np.ones((n, n), dtype=bool), -window)
    scores = np.where(mask[None], -np.inf, scores)
    out = softmax(scores, axis=-1) @ v  # [heads, n, D]
    return linear(out.transpose(1, 0, 2).reshape(n, nh * D), w[prefix + "o_proj.weight"])


def forward(weights: dict[str, np.ndarray], config: dict, tokens, trace: list | None = None) -> np.ndarray:
    """Logits [len(tokens), vocab_size] (float64) for ``tokens`` at positions 0..n-1.

    ``weights``: Hugging Face names. The output head is ``lm_head.weight`` when present, else
    (tie_word_embeddings) ``model.embed_tokens.weight``. ``trace``, a list, receives each MoE
    layer's router choice and the logit margin between the k-th and (k+1)-th expert.
    """
    w = weights
    tokens = np.asarray(tokens, dtype=np.int64)
    eps = config["rms_norm_eps"]
    cos, sin = rope_cos_sin(config, np.arange(len(tokens)))
    h = np.asarray(w["model.embed_tokens.weight"], dtype=np.float64)[tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = h + attention(rms_norm(h, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.", config, cos, sin,
                          sliding_window(config, i))
        y = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        h = h + (sparse_moe_block(y, w, p + "mlp.", config, trace) if is_sparse_layer(config, i)
                 else mlp(y, w, p + "mlp."))
    h = rms_norm(h, w["model.norm.weight"], eps)
    if "lm_head.weight" in w:
        head = w["lm_head.weight"]
    elif config.get("tie_word_embeddings", False):
        head = w["model.embed_tokens.weight"]
    else:
        raise KeyError("lm_head.weight")
    return linear(h, head)
