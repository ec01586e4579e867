"""Rotary position embedding: per-pair frequencies (with Llama 3.1 scaling) and cos/sin tables."""
from __future__ import annotations

import numpy as np

from dllama.formats.mfile import ModelHeader, RopeType


def rope_frequencies(h: ModelHeader) -> np.ndarray:
    """Angular frequency of each rotated pair of a head: theta^(-2i/head_dim), i < head_dim/2."""
    i = np.arange(h.head_dim // 2, dtype=np.float64)
    freq = h.rope_theta ** (-2.0 * i / h.head_dim)
    if h.effective_rope_type == RopeType.LLAMA3_1:
        factor = h.rope_scaling_factor
        low, high = h.rope_scaling_low_freq_factor, h.rope_scaling_high_freq_factor
        orig = h.rope_scaling_orig_max_seq_len
        wavelen = 2.0 * np.pi / freq
        # Long wavelengths are stretched by the factor, short ones kept, the band between blended.
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1.0 - smooth) * freq / factor + smooth * freq
        freq = np.where(wavelen < orig / high, freq, np.where(wavelen > orig / low, freq / factor, blended))
    return freq


def rope_tables(h: ModelHeader, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position * frequency, ``[seq_len, head_dim/2]`` float32."""
    angles = np.outer(np.arange(seq_len, dtype=np.float64), rope_frequencies(h))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
