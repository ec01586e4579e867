"""Calibrated Q40 conversion: which input columns of each weight matter, measured by running the
model on a built-in text.

Re-rounding weights to Q40 (from floats, Q4_1 or K-quants) adds error that no choice of block
scale removes: Q4_1's levels are offset from Q40's. What a conversion can choose is where the
error goes. A matrix's output error is ``sum_j error[:, j] * x_j``, so an error in a column whose
input ``x_j`` is small costs little. As llama.cpp's importance matrix (imatrix), the importance
of column ``j`` of a weight is the mean over tokens of ``x_j ** 2``, its input's square; the Q40
search then weighs each value's squared error by it (``kernels.quants.quantize_q40``).

The model runs on the NumPy backend from a float32 copy held in memory; that needs memory,
so calibration runs only when the copy takes at most ``1 / MEMORY_FRACTION`` of physical memory
and the conversion falls back to the unweighted search otherwise (file formats stream tensor
by tensor and need no such copy).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Mapping, Sequence

import numpy as np

from dllama.formats.mfile import ModelHeader, TensorSpec, tensor_plan
from dllama.formats.tfile import TokenizerData
from dllama.kernels.backend import NUMPY
from dllama.machine import physical_memory
from dllama.model.dense import DenseBudget, DenseWeights
from dllama.model.forward import MAX_BATCH, Transformer
from dllama.model.slicing import NodeModel
from dllama.model.weights import Weight

# Calibrate only when the model's float32 copy takes at most this fraction of physical memory:
# the copy, the GGUF's pages and the conversion's own tensor then fit with room to spare.
MEMORY_FRACTION = 4
CALIBRATION_FILE = "calibration.txt"


def calibration_text() -> str:
    """The built-in calibration text: original prose of several kinds (a how-to, a story, news,
    a dialogue, code comments, an explanation, a letter), so no one register decides."""
    return resources.files(__package__).joinpath(CALIBRATION_FILE).read_text(encoding="utf-8")


def float32_bytes(header: ModelHeader) -> int:
    """Bytes of the model's tensors as float32 values."""
    return sum(spec.n_values * 4 for spec in tensor_plan(header))


class InputSquares(DenseWeights):
    """The dense products of the NumPy blocks, which also add up, per weight (by its name), the
    square of each input column over the rows it multiplies. q, k and v share one input (as w1
    and w3 do), so one input's squares are computed once. Calibration reads no logits: the
    product by the output head (a fifth of the work with SmolLM2's 49k vocabulary) is not
    computed, its rows are zeros."""

    def __init__(self, budget: DenseBudget):
        super().__init__(budget)
        self.sums: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (input, its column sums of squares)

    def matmul(self, x: np.ndarray, w: Weight, q80_input: bool) -> np.ndarray:
        name = w.name
        if name and x.shape[0] > 0:
            if self._last is None or self._last[0] is not x:
                x64 = x.astype(np.float64)
                self._last = (x, (x64 * x64).sum(axis=0))  # keeps x alive: its id is not reused
            self.sums[name] = self.sums.get(name, 0.0) + self._last[1]
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        if name == "output":
            return np.zeros((x.shape[0], w.rows), dtype=np.float32)
        return super().matmul(x, w, q80_input)

    def means(self) -> dict[str, np.ndarray]:
        """Each observed weight's mean squared input per column, float32."""
        return {name: (total / self.rows[name]).astype(np.float32) for name, total in self.sums.items()}


@dataclass
class _InMemoryModel:
    """What ``NodeModel.from_model`` reads of a model file: a header and whole tensors."""

    header: ModelHeader
    tensors: Mapping[str, np.ndarray]


def input_statistics(header: ModelHeader, tensors: Mapping[str, np.ndarray],
                     tokens: Sequence[int]) -> dict[str, np.ndarray]:
    """Run the model (``header`` typed F32, float32 ``tensors`` by name) over ``tokens`` in
    batches of MAX_BATCH on the NumPy backend; per weight matrix, the mean over the tokens it
    saw of each input column's square. An expert no token chose is absent."""
    # The NumPy blocks multiply through the ``dense`` products they are given: an observing
    # subclass sees every matrix's input (dllama.model stays unaware of calibration).
    observer = InputSquares(DenseBudget())
    model = Transformer(NodeModel.from_model(_InMemoryModel(header, tensors)), seq_len=len(tokens),
                        backend=NUMPY, dense=observer)
    for start in range(0, len(tokens), MAX_BATCH):
        model.forward(tokens[start:start + MAX_BATCH], start, all_logits=True)  # all rows reach the output head
    return observer.means()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def calibrate_q40(header: ModelHeader, tokenizer: TokenizerData, values_of: Callable[[TensorSpec], np.ndarray],
                  say: Callable[[str], None] = _say) -> dict[str, np.ndarray] | None:
    """A ``formats.converted.Calibration``: each weight's input importance measured on the
    built-in text, or None (one line to ``say`` why) when the float32 copy would take more
    than 1 / MEMORY_FRACTION of physical memory."""
    from dllama.engine.tokenizer import Tokenizer  # the tokenizer's tables: only when calibrating

    need, limit = float32_bytes(header), physical_memory() // MEMORY_FRACTION
    if need > limit:
        say(f"⚠️  Q40 rounding not calibrated: the model's float32 copy ({need / 2**30:.1f} GiB) would take more "
            f"than 1/{MEMORY_FRACTION} of this machine's memory ({limit / 2**30:.1f} GiB); block scales "
            f"minimise the unweighted error")
        return None
    began = time.perf_counter()
    tokens = Tokenizer(tokenizer).encode(calibration_text())[:header.seq_len]
    tensors = {spec.name: values_of(spec) for spec in tensor_plan(header)}
    importance = input_statistics(header, tensors, tokens)
    say(f"🎯 calibrated the Q40 rounding: {len(importance)} matrices' input columns weighed on {len(tokens)} "
        f"tokens of built-in text ({time.perf_counter() - began:.1f} s)")
    return importance
