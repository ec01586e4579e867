"""What every converter ends with: ``<name>_<type>.m``, ``<name>.t`` and its sidecar in a folder.

The model is written tensor by tensor in ``.m`` plan order from a function that produces each
tensor's float32 values, so a converter never holds more than one tensor.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dllama.errors import DllamaError
from dllama.formats.mfile import ModelHeader, ModelWriter, TensorSpec, tensor_plan
from dllama.formats.tfile import TokenizerData, write_tokenizer


@dataclass
class ConvertedPaths:
    model: Path
    tokenizer: Path


def write_converted(source: Path, output_dir: str | Path, name: str, header: ModelHeader,
                    tokenizer: TokenizerData, values_of: Callable[[TensorSpec], np.ndarray],
                    progress: bool = True) -> ConvertedPaths:
    """Write the model (``values_of(spec)`` gives each tensor, shaped as ``spec``) and the
    tokenizer; a file appears only complete. Errors name ``source``."""
    from tqdm import tqdm

    out_dir = Path(output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DllamaError(f"{out_dir}: cannot create the output folder: {e.strerror or e}") from None
    paths = ConvertedPaths(out_dir / f"{name}_{header.weight_type.name.lower()}.m", out_dir / f"{name}.t")
    plan = tensor_plan(header)
    try:
        with ModelWriter(paths.model, header) as writer:
            # disable=None: a bar on a terminal only, not in logs or pipes.
            bar = tqdm(plan, desc=f"converting to {header.weight_type.name}", unit="tensor", file=sys.stderr,
                       disable=None if progress else True, leave=False)
            for spec in bar:
                writer.write(spec.name, values_of(spec))
        write_tokenizer(paths.tokenizer, tokenizer)
    except (ValueError, OSError) as e:
        raise DllamaError(f"{source}: conversion failed: {e}") from None
    return paths
