"""``convert gguf``: llama.cpp GGUF files to distributed-llama ``.m`` and ``.t`` files."""
from __future__ import annotations

import argparse

from dllama.commands.common import info


def main(args: argparse.Namespace) -> int:
    from dllama.formats.gguf_import import convert_gguf
    from dllama.kernels.quants import FloatType

    paths = convert_gguf(args.file, args.output_dir, FloatType.parse(args.weights_float_type), name=args.name)
    info(f"✅ wrote {paths.model}")
    info(f"✅ wrote {paths.tokenizer} (+ {paths.tokenizer.name}.json)")
    print(f"python -m dllama inference --model {paths.model} --tokenizer {paths.tokenizer} "
          f"--prompt \"Hello\" --steps 64")
    return 0
