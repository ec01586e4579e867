"""Shared test helpers: tiny random models, an independent float64 forward pass, and a reader of
a child process's output that never blocks the test."""
from __future__ import annotations

import codecs
import os
import threading
import time
from pathlib import Path
from typing import IO, Callable

import numpy as np
import pytest

from dllama.formats.mfile import ArchType, HiddenAct, ModelHeader, ModelWriter, RopeType, tensor_plan
from dllama.kernels.quants import FloatType


def tiny_header(weight_type: FloatType = FloatType.F32, arch: ArchType = ArchType.LLAMA, **kw) -> ModelHeader:
    args = dict(arch=arch, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80,
                seq_len=64, weight_type=weight_type, rope_theta=10000.0,
                rope_type=RopeType.FALCON if arch != ArchType.LLAMA else RopeType.LLAMA)
    if arch == ArchType.QWEN3_MOE:
        args.update(n_experts=4, n_active_experts=2, moe_hidden_dim=32, hidden_dim=0)
    args.update(kw)
    return ModelHeader(**args)


def write_random_model(path: Path, header: ModelHeader, seed: int = 0, scale: float = 0.15) -> dict:
    """Write a model with random weights; returns the float32 values written, by tensor name."""
    rng = np.random.default_rng(seed)
    values = {}
    with ModelWriter(path, header) as w:
        for spec in tensor_plan(header):
            if spec.name.endswith("norm"):
                v = (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
            else:
                v = (scale * rng.standard_normal(spec.shape)).astype(np.float32)
            w.write(spec.name, v)
            values[spec.name] = v
    return values


# Only the products with Q40 weights take the SIMD path (dllama/kernels/jit/matmul.py: _linear_q40_q80
# and _linear_q40_f32 take ``path``; Q80, F16 and F32 products, norms, attention and the rest
# do not). Tests run those on every path, and everything else once, on this CPU's own path.
def write_tiny_chat_tokenizer(path: Path) -> None:
    """A 40-token tokenizer (<s>, </s>, letters, punctuation and a few pairs) with a chat template
    that joins the messages' contents: for tiny random models served by `api`."""
    from dllama.formats.tfile import TokenizerData, write_tokenizer

    vocab = [b"<s>", b"</s>"] + [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz ,.?!\n"]
    vocab += [b"th", b"he", b"in", b"er", b"an", b"re"][: 40 - len(vocab)]
    write_tokenizer(path, TokenizerData(vocab=vocab, scores=[0.0] * 2 + [-1.0] * (len(vocab) - 2), bos_id=0,
                                        eos_ids=[1], add_bos=True,
                                        chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}"))


def simd_paths() -> list[tuple[str, pytest.MarkDecorator]]:
    """(name, mark) per SIMD path, best first; the mark skips, saying why, a path this CPU
    cannot run (a test for it is skipped, never left out)."""
    from dllama.kernels.jit import simd

    paths = [("avx512", simd.HOST_HAS_AVX512, "AVX512-VNNI"), ("vnni", simd.HOST_HAS_VNNI, "AVX-VNNI"),
             ("avx2", simd.HOST_HAS_AVX2, "AVX2, FMA and F16C"),
             ("dotprod", simd.HOST_HAS_DOTPROD, "AArch64's DotProd (tests/arm64/emulate.py runs it)"),
             ("neon", simd.HOST_HAS_NEON, "AArch64's NEON (tests/arm64/emulate.py runs it)"), ("portable", True, "")]
    return [(name, pytest.mark.skipif(not ok, reason=f"this CPU lacks {needs} (the {name} path)"))
            for name, ok, needs in paths]


def forward64(weights: dict, h: ModelHeader, tokens: list[int],
              observe: Callable[[str, np.ndarray], None] | None = None) -> np.ndarray:
    """Logits of every position for a whole sequence, in float64, from the model's definition.

    Written independently of dllama's forward (no KV cache, no batching): rms norm, q/k/v,
    rope (interleaved for Llama layout, half-split for NeoX), causal GQA softmax attention,
    gated feed-forward (SiLU or GELU; or top-k MoE), residuals, final norm, output head.
    ``observe(name, x)`` sees the input rows of every product by a weight matrix (calibration).
    """
    class Float64View(dict):  # converts on access: a real model's float64 copy would be large
        def __getitem__(self, name):
            return np.asarray(weights[name], dtype=np.float64)

        def __contains__(self, name):
            return name in weights

    W = Float64View()
    eps = h.norm_epsilon
    T, D = len(tokens), h.head_dim

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    inv = h.rope_theta ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    if h.rope_type == RopeType.LLAMA3_1:  # Meta's apply_scaling, pair by pair
        scaled = []
        for f in inv:
            wavelen = 2 * np.pi / f
            lo_wl = h.rope_scaling_orig_max_seq_len / h.rope_scaling_low_freq_factor
            hi_wl = h.rope_scaling_orig_max_seq_len / h.rope_scaling_high_freq_factor
            if wavelen < hi_wl:
                scaled.append(f)
            elif wavelen > lo_wl:
                scaled.append(f / h.rope_scaling_factor)
            else:
                smooth = (h.rope_scaling_orig_max_seq_len / wavelen - h.rope_scaling_low_freq_factor) / (
                    h.rope_scaling_high_freq_factor - h.rope_scaling_low_freq_factor)
                scaled.append((1 - smooth) * f / h.rope_scaling_factor + smooth * f)
        inv = np.array(scaled)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):  # [T, H, D]
        if h.effective_rope_type == RopeType.FALCON:
            a, b = x[..., : D // 2], x[..., D // 2:]
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    def act(x):
        if h.hidden_act == HiddenAct.GELU:  # the tanh approximation
            return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
        return x / (1 + np.exp(-x))  # SiLU

    def mm(y, name):  # y @ W.T for weight ``name``
        if observe is not None:
            observe(name, y)
        return y @ W[name].T

    def mlp(prefix, y):
        return mm(act(mm(y, prefix + "w1")) * mm(y, prefix + "w3"), prefix + "w2")

    x = np.asarray(weights["embedding"][tokens], dtype=np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    g = h.n_heads // h.n_kv_heads
    for i in range(h.n_layers):
        p = f"layers.{i}."
        y = norm(x, W[p + "attn_norm"])
        q = mm(y, p + "q").reshape(T, h.n_heads, D)
        k = mm(y, p + "k").reshape(T, h.n_kv_heads, D)
        v = mm(y, p + "v").reshape(T, h.n_kv_heads, D)
        if p + "q_norm" in W:
            q, k = norm(q, W[p + "q_norm"]), norm(k, W[p + "k_norm"])
        q, k = rope(q), rope(k)
        heads = []
        for hh in range(h.n_heads):
            s = q[:, hh] @ k[:, hh // g].T / np.sqrt(D) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ v[:, hh // g])
        x = x + mm(np.concatenate(heads, -1), p + "o")
        y = norm(x, W[p + "ffn_norm"])
        if p + "router" in W:
            logits = y @ W[p + "router"].T
            pr = np.exp(logits - logits.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            out = np.zeros_like(y)
            for t in range(T):
                top = np.argsort(-pr[t])[: h.n_active_experts]
                gates = pr[t, top] / pr[t, top].sum()
                for e, gate in zip(top, gates):
                    out[t] += gate * mlp(f"{p}experts.{e}.", y[t:t + 1])[0]
            x = x + out
        else:
            x = x + mlp(p, y)
    return mm(norm(x, W["final_norm"]), "output")


class PipeWatcher:
    """Reads a child's pipe in a thread as it arrives (a blocking read in the test would turn a
    stalled child into a hung test), and lets the test wait for a condition on what arrived."""

    def __init__(self, pipe: IO[bytes]):
        self.text = ""
        self.closed = False
        self._pipe = pipe
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd = self._pipe.fileno()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # characters cut between reads
        while chunk := os.read(fd, 65536):
            with self._changed:
                self.text += decoder.decode(chunk)
                self._changed.notify_all()
        with self._changed:
            self.text += decoder.decode(b"", final=True)
            self.closed = True
            self._changed.notify_all()

    def wait_for(self, condition: Callable[[str], bool], timeout: float) -> float:
        """Block until ``condition(text)`` holds (returns the time.monotonic() it was seen), or
        fail after ``timeout`` seconds or when the pipe closed without it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition(self.text):
                left = deadline - time.monotonic()
                assert not self.closed, f"the pipe closed first:\n{self.text[-2000:]}"
                assert left > 0, f"not seen within {timeout} s:\n{self.text[-2000:]}"
                self._changed.wait(left)
            return time.monotonic()

    def join(self, timeout: float) -> str:
        """Everything the pipe delivered until it closed."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the pipe did not close"
        return self.text
