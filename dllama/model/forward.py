"""The transformer forward pass, in blocks: start, then (attention, feed-forward) per layer, end.

Each block returns its *partial* output; the injected ``sync`` turns partial outputs into the
block's full output before the residual add. On one node that is the identity; in a cluster it
is the all-gather-and-sum between nodes, at exactly these boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from dllama.errors import DllamaError
from dllama.formats.mfile import HiddenAct, ModelFile, ModelHeader, RopeType
from dllama.kernels import reference as ref
from dllama.kernels.backend import NUMBA
from dllama.kernels.backend import backend as kernel_backend
from dllama.kernels.quants import FloatType
from dllama.model.rope import rope_tables
from dllama.model.slicing import NodeModel
from dllama.model.weights import DenseBudget, Linear

# Prompt tokens evaluated per forward: weights are read once per batch.
MAX_BATCH = 32


class Sync(Protocol):
    """How the nodes of a cluster meet inside a forward (the root's view)."""

    def begin(self, x: np.ndarray, pos: int, all_logits: bool) -> np.ndarray:
        """Start a forward of the embedded input ``x`` at ``pos`` on every node."""

    def all_reduce(self, partial: np.ndarray, layer: int, block: str) -> np.ndarray:
        """Sum the block's partial outputs of all nodes."""

    def finish(self, logits: np.ndarray) -> np.ndarray:
        """The root's slice of the logits joined with every other node's: all the vocabulary."""


class LocalSync:
    """One node holds the whole model: its partial output is the full output."""

    def begin(self, x: np.ndarray, pos: int, all_logits: bool) -> np.ndarray:
        return x

    def all_reduce(self, partial: np.ndarray, layer: int, block: str) -> np.ndarray:
        return partial

    def finish(self, logits: np.ndarray) -> np.ndarray:
        return logits


@dataclass
class FeedForward:
    w1: Linear  # gate
    w2: Linear  # down
    w3: Linear  # up


@dataclass
class Layer:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    ffn: FeedForward | None = None
    router: np.ndarray | None = None
    experts: list[FeedForward] | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None


class KVCache:
    """Keys and values of every past position: ``[layers, seq_len, kv_heads, head_dim]``."""

    def __init__(self, n_layers: int, seq_len: int, n_kv_heads: int, head_dim: int):
        shape = (n_layers, seq_len, n_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Transformer:
    """A model ready to run: weights from a ``.m`` file (or one node's share of them), a KV
    cache of ``seq_len`` positions for the node's KV heads."""

    def __init__(self, model: ModelFile | NodeModel, seq_len: int | None = None,
                 buffer_type: FloatType = FloatType.F32, sync: Sync | None = None,
                 budget: DenseBudget | None = None, backend: str | None = None):
        if not isinstance(model, NodeModel):
            model = NodeModel.from_model(model)
        h = model.header
        self.node = model.node
        self.header: ModelHeader = h if seq_len is None else h.with_seq_len(seq_len)
        self.group = h.n_heads // h.n_kv_heads
        self.head_offset = self.node.head_offset(self.group)
        self.q80_buffers = buffer_type == FloatType.Q80
        self.sync = sync or LocalSync()
        budget = budget or DenseBudget()
        t, wt = model.tensors, h.weight_type

        def lin(name: str) -> Linear:
            return Linear(t[name], wt, budget)

        def ffn(prefix: str) -> FeedForward:
            return FeedForward(lin(prefix + "w1"), lin(prefix + "w2"), lin(prefix + "w3"))

        self.embedding = t.get("embedding")  # the root's only
        self.layers: list[Layer] = []
        for i in range(h.n_layers):
            p = f"layers.{i}."
            layer = Layer(q=lin(p + "q"), k=lin(p + "k"), v=lin(p + "v"), o=lin(p + "o"),
                          attn_norm=np.asarray(t[p + "attn_norm"]), ffn_norm=np.asarray(t[p + "ffn_norm"]))
            if h.is_moe:
                layer.router = np.asarray(t[p + "router"])
                layer.experts = [ffn(f"{p}experts.{e}.") for e in range(h.n_experts)]
            else:
                layer.ffn = ffn(p)
            if h.has_qk_norm:
                layer.q_norm = np.asarray(t[p + "q_norm"])
                layer.k_norm = np.asarray(t[p + "k_norm"])
            self.layers.append(layer)
        self.final_norm = np.asarray(t["final_norm"])
        self.output = lin("output")
        self.kv_cache = KVCache(h.n_layers, self.header.seq_len, self.node.n_kv_heads, h.head_dim)
        self.rope_cos, self.rope_sin = rope_tables(h, self.header.seq_len)
        self.rope_is_falcon = h.effective_rope_type == RopeType.FALCON
        self.uses_gelu = h.hidden_act == HiddenAct.GELU
        self._rope = ref.rope_falcon if self.rope_is_falcon else ref.rope_llama
        self._act = ref.gelu if self.uses_gelu else ref.silu
        self.backend = backend or kernel_backend()
        self._jit = None
        if self.backend == NUMBA:
            from dllama.model.jit_blocks import JitBlocks
            self._jit = JitBlocks(self)

    @property
    def seq_len(self) -> int:
        return self.header.seq_len

    def prepare(self) -> None:
        """Build the dense weight copies now, so that the first forward is not the one to pay."""
        if self._jit is not None:
            return  # the JIT kernels read the packed weights, made when the model was loaded
        for layer in self.layers:
            ffns = layer.experts if layer.experts is not None else [layer.ffn]
            for lin in [layer.q, layer.k, layer.v, layer.o] + [w for f in ffns for w in (f.w1, f.w2, f.w3)]:
                lin.dense()
        self.output.dense()

    # -- blocks ---------------------------------------------------------------------------
    def start(self, tokens: np.ndarray) -> np.ndarray:
        if self._jit is not None:
            return self._jit.start(tokens)
        return np.array(self.embedding[tokens], dtype=np.float32)

    def attention_block(self, i: int, x: np.ndarray, pos: int) -> np.ndarray:
        if self._jit is not None:
            return self._jit.attention_block(i, x, pos)
        h, layer, node = self.header, self.layers[i], self.node
        n = x.shape[0]
        y = ref.rms_norm(x, layer.attn_norm, h.norm_epsilon)
        q = layer.q(y, self.q80_buffers).reshape(n, node.n_heads, h.head_dim)
        k = layer.k(y, self.q80_buffers).reshape(n, node.n_kv_heads, h.head_dim)
        v = layer.v(y, self.q80_buffers).reshape(n, node.n_kv_heads, h.head_dim)
        if layer.q_norm is not None:
            q = ref.rms_norm(q, layer.q_norm, h.norm_epsilon)
            k = ref.rms_norm(k, layer.k_norm, h.norm_epsilon)
        cos, sin = self.rope_cos[pos:pos + n], self.rope_sin[pos:pos + n]
        q = self._rope(q, cos, sin)
        self.kv_cache.k[i, pos:pos + n] = self._rope(k, cos, sin)
        self.kv_cache.v[i, pos:pos + n] = v
        z = ref.attention(q, self.kv_cache.k[i], self.kv_cache.v[i], pos, self.group, self.head_offset)
        return layer.o(z, self.q80_buffers)

    def _feed_forward(self, ffn: FeedForward, y: np.ndarray) -> np.ndarray:
        d = self._act(ffn.w1(y, self.q80_buffers)) * ffn.w3(y, self.q80_buffers)
        return ffn.w2(d, self.q80_buffers)

    def ffn_block(self, i: int, x: np.ndarray) -> np.ndarray:
        if self._jit is not None:
            return self._jit.ffn_block(i, x)
        h, layer = self.header, self.layers[i]
        y = ref.rms_norm(x, layer.ffn_norm, h.norm_epsilon)
        if layer.experts is None:
            return self._feed_forward(layer.ffn, y)
        probs = ref.softmax(ref.matmul(y, layer.router), axis=-1)
        return self.mix_experts(y, probs, lambda e, rows: self._feed_forward(layer.experts[e], rows))

    def mix_experts(self, y: np.ndarray, probs: np.ndarray,
                    run_expert: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
        """Qwen3-MoE: keep each token's top k experts by router probability, renormalize their
        weights, and sum the experts' outputs (each expert runs once, on the tokens it got)."""
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :self.header.n_active_experts]
        gates = np.take_along_axis(probs, top, axis=-1)
        gates /= gates.sum(axis=-1, keepdims=True)
        out = np.zeros_like(y)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            out[rows] += gates[rows, slot][:, None] * run_expert(int(e), np.ascontiguousarray(y[rows]))
        return out

    def end(self, x: np.ndarray) -> np.ndarray:
        if self._jit is not None:
            return self._jit.end(np.ascontiguousarray(x))
        y = ref.rms_norm(x, self.final_norm, self.header.norm_epsilon)
        return self.output(y, self.q80_buffers)

    # -- the whole pass -------------------------------------------------------------------
    def forward(self, tokens: Sequence[int], pos: int, all_logits: bool = False) -> np.ndarray:
        """Evaluate ``tokens`` at positions ``pos ..``; logits of the last token (or of all)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        if not 0 < n <= MAX_BATCH:
            raise ValueError(f"a forward takes 1 to {MAX_BATCH} tokens, got {n}")
        if pos < 0 or pos + n > self.seq_len:
            raise DllamaError(f"context is full: positions {pos}..{pos + n - 1} exceed the "
                              f"sequence length {self.seq_len} (raise --max-seq-len)")
        if tokens.min() < 0 or tokens.max() >= self.header.vocab_size:
            raise DllamaError(f"token id out of range 0..{self.header.vocab_size - 1}")
        x = self.sync.begin(self.start(tokens), pos, all_logits)
        logits = self.sync.finish(self.forward_embedded(x, pos, all_logits))
        return logits if all_logits else logits[0]

    def forward_embedded(self, x: np.ndarray, pos: int, all_logits: bool) -> np.ndarray:
        """The layers on an embedded input, then this node's slice of the logits (of the last
        token, or of all): what every node of a cluster runs."""
        for i in range(self.header.n_layers):
            x = x + self.sync.all_reduce(self.attention_block(i, x, pos), i, "attention")
            x = x + self.sync.all_reduce(self.ffn_block(i, x), i, "ffn")
        return self.end(x if all_logits else x[-1:])
