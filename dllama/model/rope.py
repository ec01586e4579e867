"""Rotary position embedding tables for a model: cos/sin of position * pair frequency."""
from __future__ import annotations

import numpy as np

from dllama.formats.mfile import ModelHeader, RopeType
from dllama.kernels.reference import rope_frequencies


def header_rope_frequencies(h: ModelHeader) -> np.ndarray:
    scaling = None
    if h.effective_rope_type == RopeType.LLAMA3_1:
        scaling = (h.rope_scaling_factor, h.rope_scaling_low_freq_factor, h.rope_scaling_high_freq_factor,
                   h.rope_scaling_orig_max_seq_len)
    return rope_frequencies(h.head_dim, h.rope_theta, scaling)


def rope_tables(h: ModelHeader, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position * frequency, ``[seq_len, head_dim/2]`` float32."""
    angles = np.outer(np.arange(seq_len, dtype=np.float64), header_rope_frequencies(h))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
