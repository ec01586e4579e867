"""A cluster inside one process: one thread per node, meeting at barriers. It checks the
slicing and the forward's sync points without any transport (the same forward code runs)."""
from __future__ import annotations

import threading

import numpy as np

from dllama.kernels import quants
from dllama.model.forward import Transformer
from dllama.model.slicing import NodeModel, plan_slices
from dllama.model.sync import LOCAL


class _Hub:
    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=60)
        self.parts: list = [None] * n
        self.job = None


class _NodeSync:
    def __init__(self, hub: _Hub, index: int, wire_q80: bool):
        self.hub, self.index, self.wire_q80 = hub, index, wire_q80

    def all_reduce(self, partial, layer, block):
        if self.wire_q80:  # what a q80 cluster sends: each part rounded to Q80 blocks
            partial = quants.dequantize_q80(quants.quantize_q80(partial))
        self.hub.parts[self.index] = partial
        self.hub.barrier.wait()
        total = self.hub.parts[0].copy()
        for p in self.hub.parts[1:]:
            total += p  # node order, as the real all-gather sums
        self.hub.barrier.wait()
        return total

    def begin(self, x, batch):
        self.hub.job = (x, batch)
        self.hub.barrier.wait()
        return self

    def finish(self, logits):
        self.hub.parts[0] = logits
        self.hub.barrier.wait()  # the workers' slices are in
        out = np.concatenate(self.hub.parts, axis=1)
        self.hub.barrier.wait()
        return out


class ThreadedCluster:
    """``forward`` like a Transformer's; the root is node 0, workers run in threads."""

    def __init__(self, model, split, wire_q80: bool = False, **kw):
        h = model.header
        self.plan = plan_slices(h, split)
        self.hub = _Hub(len(split))
        self.syncs = [_NodeSync(self.hub, s.index, wire_q80) for s in self.plan]
        self.nodes = [Transformer(NodeModel.from_model(model, s), sync=self.syncs[0] if s.index == 0 else LOCAL, **kw)
                      for s in self.plan]
        self.threads = [threading.Thread(target=self._serve, args=(tr,), daemon=True) for tr in self.nodes[1:]]
        for t in self.threads:
            t.start()

    def _serve(self, tr: Transformer) -> None:
        while True:
            self.hub.barrier.wait()
            if self.hub.job is None:
                return
            x, batch = self.hub.job
            logits = tr.forward_embedded(x.copy(), batch, self.syncs[tr.node.index])
            self.hub.parts[tr.node.index] = logits
            self.hub.barrier.wait()
            self.hub.barrier.wait()

    def forward(self, tokens, pos, all_logits=False):
        return self.nodes[0].forward(tokens, pos, all_logits)

    def forward_batch(self, tokens, batch):
        return self.nodes[0].forward_batch(tokens, batch)

    def close(self) -> None:
        self.hub.job = None
        self.hub.barrier.wait()
        for t in self.threads:
            t.join()
