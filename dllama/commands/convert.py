"""``convert gguf`` / ``convert hf``: llama.cpp GGUF files or Hugging Face checkpoints to
distributed-llama ``.m`` and ``.t`` files."""
from __future__ import annotations

import argparse
import shlex

from dllama.commands.common import info


def main(args: argparse.Namespace) -> int:
    from dllama.engine.calibration import calibrate_q40
    from dllama.kernels.quants import FloatType

    weight_type = FloatType.parse(args.weights_float_type) if args.weights_float_type else None
    if args.source == "hf":
        from dllama.formats.hf_import import convert_hf

        paths = convert_hf(args.folder, args.output_dir, weight_type, name=args.name,
                           calibrate=lambda *a: calibrate_q40(*a, say=info))
    else:
        from dllama.formats.gguf_import import convert_gguf

        paths = convert_gguf(args.file, args.output_dir, weight_type, name=args.name, say=info,
                             calibrate=lambda *a: calibrate_q40(*a, say=info))
    info(f"✅ wrote {paths.model}")
    info(f"✅ wrote {paths.tokenizer} (+ {paths.tokenizer.name}.json)")
    print(f"python -m dllama inference --model {shlex.quote(str(paths.model))} "
          f"--tokenizer {shlex.quote(str(paths.tokenizer))} --prompt \"Hello\" --steps 64")
    return 0
