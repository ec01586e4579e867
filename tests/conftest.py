"""Shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF, downloaded once into $DLLAMA_HOME by the default-model code."""
    from dllama.default_model import ensure_smollm2_gguf

    return ensure_smollm2_gguf()
