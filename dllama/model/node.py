"""A cluster node's model: from the root's configuration and the received slices to a
Transformer of that share. The worker's transport calls this; the math is the same forward
that runs on one node."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from dllama.errors import DllamaError
from dllama.formats.cuts import TensorCut
from dllama.formats.mfile import ModelFile, ModelHeader, encode_header, parse_header
from dllama.kernels import nucleus
from dllama.kernels.quants import BLOCK_SIZE, FloatType
from dllama.machine import physical_memory
from dllama.model.batch import Batch
from dllama.model.forward import Transformer
from dllama.model.slicing import NodeModel, NodeSlice, node_cuts, node_kv_bytes, node_specs, node_tensors
from dllama.model.sync import LOCAL, BlockSync

MAX_SEQ_LEN = 1 << 20
# KV cache slots: sequences a node may hold at once (the API's --parallel).
MAX_SLOTS = 64
# Bounds the tensor list a configuration can make a worker build (real models: ~10^4).
MAX_LAYER_TENSORS = 1 << 16


def node_config(h: ModelHeader, node: NodeSlice, seq_len: int, buffer_type: str, cache_key: str,
                model_digest: str, n_slots: int = 1) -> dict:
    """What the root tells a worker about its node (JSON)."""
    return {"header": encode_header(h).hex(), "node": node.to_json(), "seq_len": seq_len, "slots": n_slots,
            "buffer_float_type": buffer_type, "cache_key": cache_key, "model_digest": model_digest}


def _parse(config: dict) -> tuple[ModelHeader, NodeSlice, int, str, int]:
    """A node's configuration, checked as untrusted input: whatever it says, the worker either
    builds a node that fits its memory or refuses with one line."""
    try:
        h = parse_header(bytes.fromhex(config["header"]))
        node = NodeSlice.from_json(config["node"])
        seq_len = int(config["seq_len"])
        n_slots = int(config.get("slots", 1))
        buffer_type = str(config["buffer_float_type"])
    except (KeyError, TypeError, ValueError, OverflowError, DllamaError) as e:
        raise DllamaError(f"malformed node configuration ({e})") from None
    group = h.n_heads // h.n_kv_heads
    hidden = h.moe_hidden_dim if h.is_moe else h.hidden_dim
    quantized = h.weight_type.is_quantized
    plan_ok = (0 < node.index < node.n_nodes and 0 <= node.q_heads[0] < node.q_heads[1] <= h.n_heads
               and 0 <= node.kv_heads[0] < node.kv_heads[1] <= h.n_kv_heads
               and node.kv_heads[0] * group <= node.q_heads[0] and node.q_heads[1] <= node.kv_heads[1] * group
               and 0 <= node.hidden[0] < node.hidden[1] <= hidden
               and 0 <= node.vocab[0] < node.vocab[1] <= h.vocab_size
               # w2 and o are cut by columns: whole quantized blocks
               and not (quantized and (node.hidden[0] % BLOCK_SIZE or node.hidden[1] % BLOCK_SIZE
                                       or h.head_dim % BLOCK_SIZE)))
    if (not plan_ok or not 0 < seq_len <= min(h.seq_len, MAX_SEQ_LEN) or buffer_type not in ("f32", "q80")
            or not 0 < n_slots <= MAX_SLOTS):
        raise DllamaError("node configuration out of range")
    if buffer_type == "q80" and h.dim % BLOCK_SIZE:
        raise DllamaError(f"q80 buffers need a model dimension that is a multiple of {BLOCK_SIZE}")
    if h.n_layers * max(1, h.n_experts) > MAX_LAYER_TENSORS:
        raise DllamaError("node configuration out of range (layers x experts)")
    need = sum(s.nbytes for s in node_specs(h, node)) + node_kv_bytes(h, node, seq_len, n_slots)
    if need > physical_memory():
        raise DllamaError(f"this node's slice needs {need / 2**30:.1f} GiB, more than this worker's "
                          f"{physical_memory() / 2**30:.1f} GiB of memory: add nodes or lower --max-seq-len")
    return h, node, seq_len, buffer_type, n_slots


class WorkerNode:
    """A worker's share of the model (``transport.worker.Node``)."""

    def __init__(self, transformer: Transformer, wire_q80: bool, weight_bytes: int):
        self.transformer = transformer
        self.dim = transformer.header.dim
        self.wire_q80 = wire_q80
        self.weight_bytes = weight_bytes
        self.kv_bytes = transformer.kv_cache.nbytes
        self.draws: tuple = ()  # of the last forward

    def forward(self, x: np.ndarray, rows: dict, sync: BlockSync) -> np.ndarray:
        tr = self.transformer
        try:
            batch = Batch.from_json(rows)
        except ValueError as e:
            raise DllamaError(str(e)) from None
        if batch.rows != x.shape[0]:
            raise DllamaError(f"a forward of {batch.rows} rows with an input of {x.shape[0]}")
        batch.check(tr.kv_cache.n_slots, tr.seq_len)
        self.draws = batch.draws
        return tr.forward_embedded(x, batch, sync)

    def reply(self, logits: np.ndarray) -> bytes:
        """What the root gets of the last forward's logits: whole rows, or summaries of the rows
        it only draws from (``kernels.nucleus``)."""
        return nucleus.encode(nucleus.summarize_rows(logits, self.transformer.node.vocab[0], list(self.draws)))


def warm_up(tr: Transformer, batches: bool = False) -> None:
    """Run every block once alone, so kernels compile (or load from their cache) now and not
    inside the first timed sync; with ``batches`` also the prompt's batched kernels."""
    tr.forward_embedded(np.zeros((1, tr.header.dim), dtype=np.float32), Batch.run(1, 0), LOCAL)
    if batches and tr.seq_len >= 2:
        tr.forward_embedded(np.zeros((2, tr.header.dim), dtype=np.float32), Batch.run(2, 0, all_logits=True), LOCAL)


class NodeFactory:
    """Builds a worker's node (``transport.worker.NodeFactory``), from the bytes the root sent
    or, for a model this worker has a copy of (``local_models``: SHA-256 to path), from its file."""

    def __init__(self, local_models: Mapping[str, Path] | None = None):
        self.local_models = dict(local_models or {})

    def tensor_cuts(self, config: dict) -> list[TensorCut]:
        h, node, *_ = _parse(config)
        return node_cuts(h, node)

    def local_tensors(self, config: dict) -> dict[str, np.ndarray] | None:
        path = self.local_models.get(config.get("model_digest"))  # type: ignore[arg-type]
        if path is None:
            return None
        h, node, *_ = _parse(config)
        try:
            model = ModelFile(path)
        except (OSError, DllamaError):
            return None  # changed or gone since the worker started: the root sends the slices
        if model.header.with_seq_len(h.seq_len) != h:
            return None
        # Rows cut by output are views of the file's pages; columns are gathered (o and w2 only).
        return {name: np.ascontiguousarray(t).reshape(-1).view(np.uint8)
                for name, t in node_tensors(model.tensors, model.header, node).items()}

    def build(self, config: dict, tensors: dict[str, np.ndarray]) -> WorkerNode:
        """The node from its tensors, which it takes over: their memory may be given back (and
        read as zeros) once the node holds its packed copy."""
        h, node, seq_len, buffer_type, n_slots = _parse(config)
        typed = {}
        for spec in node_specs(h, node):
            raw = tensors[spec.name]
            typed[spec.name] = raw.view(spec.float_type.element_dtype).reshape(spec.stored_shape)
        tr = Transformer(NodeModel(h, node, typed, reclaimable=True), seq_len=seq_len,
                         buffer_type=FloatType.parse(buffer_type), n_slots=n_slots)
        tr.prepare()
        warm_up(tr)
        return WorkerNode(tr, buffer_type == "q80", sum(s.nbytes for s in node_specs(h, node)))

