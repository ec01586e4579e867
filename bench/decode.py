"""Prefill and decode speed of the current forward pass on the default model (SmolLM2 Q40).

Prints a table and writes bench/results/decode.json. One run on a noisy machine: read the
numbers as ratios, not as absolutes.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from dllama.default_model import ensure_default_model
from dllama.formats.mfile import ModelFile
from dllama.kernels.quants import FloatType
from dllama.model.forward import MAX_BATCH, Transformer


def measure(model: ModelFile, buffer_type: FloatType, prompt_len: int, decode_steps: int) -> dict:
    tr = Transformer(model, seq_len=prompt_len + decode_steps + 1, buffer_type=buffer_type)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.header.vocab_size, prompt_len).tolist()
    tr.forward(prompt[:1], 0)  # first use: dense weights get built, pages get mapped
    t0 = time.perf_counter()
    for start in range(0, prompt_len, MAX_BATCH):
        logits = tr.forward(prompt[start:start + MAX_BATCH], start)
    prefill = time.perf_counter() - t0
    pos = prompt_len
    t0 = time.perf_counter()
    for _ in range(decode_steps):
        logits = tr.forward([int(np.argmax(logits))], pos)
        pos += 1
    decode = time.perf_counter() - t0
    return {
        "buffer_type": buffer_type.name.lower(),
        "prefill_tokens": prompt_len,
        "prefill_tokens_per_s": prompt_len / prefill,
        "decode_tokens": decode_steps,
        "decode_tokens_per_s": decode_steps / decode,
        "decode_ms_per_token": decode * 1000 / decode_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "decode.json"))
    args = parser.parse_args()
    model_path, _ = ensure_default_model(FloatType.Q40)
    model = ModelFile(model_path)
    rows = [measure(model, bt, args.prompt_len, args.decode_steps) for bt in (FloatType.F32, FloatType.Q80)]
    result = {"model": model_path.name, "backend": "numpy", "machine": platform.machine(),
              "python": platform.python_version(), "numpy": np.__version__, "runs": rows}
    print(f"{'buffers':8} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/tok':>8}")
    for r in rows:
        print(f"{r['buffer_type']:8} {r['prefill_tokens_per_s']:14.1f} {r['decode_tokens_per_s']:13.1f} "
              f"{r['decode_ms_per_token']:8.1f}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
