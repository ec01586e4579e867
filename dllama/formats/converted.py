"""What every converter ends with: ``<name>_<type>.m``, ``<name>.t`` and its sidecar in a folder.

The model is written tensor by tensor in ``.m`` plan order from a function that produces each
tensor's float32 values, so a converter never holds more than one tensor. A ``Calibration``
(given by the caller: file formats know nothing of running a model) may first read the whole
model to weigh where Q40's rounding error goes.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from dllama.errors import DllamaError
from dllama.formats.mfile import ModelHeader, ModelWriter, TensorSpec, tensor_plan
from dllama.formats.tfile import TokenizerData, write_tokenizer
from dllama.kernels.quants import FloatType

# (header of the model in F32, its tokenizer, each tensor's float32 values by spec) -> each
# weight's per-input-column importance for the Q40 search, by tensor name, or None (unweighted).
Calibration = Callable[[ModelHeader, TokenizerData, Callable[[TensorSpec], np.ndarray]],
                       Optional[Mapping[str, np.ndarray]]]


def calibrated_importance(calibrate: Calibration, header: ModelHeader, tokenizer: TokenizerData,
                          values_of: Callable[[TensorSpec], np.ndarray]) -> Mapping[str, np.ndarray] | None:
    """``calibrate`` run on the float32 model: ``values_of`` is asked for specs typed F32, which
    every converter answers with dequantized values (never with stored blocks)."""
    return calibrate(replace(header, weight_type=FloatType.F32), tokenizer, values_of)


@dataclass
class ConvertedPaths:
    model: Path
    tokenizer: Path


def write_converted(source: Path, output_dir: str | Path, name: str, header: ModelHeader,
                    tokenizer: TokenizerData, values_of: Callable[[TensorSpec], np.ndarray],
                    progress: bool = True, importance: Mapping[str, np.ndarray] | None = None) -> ConvertedPaths:
    """Write the model (``values_of(spec)`` gives each tensor, shaped as ``spec``) and the
    tokenizer; a file appears only complete. ``importance`` (by tensor name) steers the Q40
    rounding of the weights it names. Errors name ``source``."""
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
                writer.write(spec.name, values_of(spec), (importance or {}).get(spec.name))
        write_tokenizer(paths.tokenizer, tokenizer)
    except (ValueError, OSError) as e:
        raise DllamaError(f"{source}: conversion failed: {e}") from None
    return paths
