"""Decode and prefill speed by weight type: Q40, Q80, F16 and F32 weights, as % of the floor.

For SmolLM2-135M (converted from its GGUF into each type, kept in DLLAMA_HOME) and the synthetic
Llama-1B-shaped model (random weights written in each type to a temporary folder, deleted after
use), on 1 and 2 threads, with q80 buffers (the int8 products) and f32 buffers (exact float products;
float weights always take float32 activations): decode tokens/s, its share of the bandwidth floor (weight bytes read per token /
memory bandwidth measured in the same run), and prefill tokens/s. Each configuration runs in a
fresh subprocess (``decode.py``'s measuring worker).

    python bench/weights.py                      # everything (writes up to 5 GB of models)
    python bench/weights.py --models smollm2     # the real model only (quick)

Prints the table and the targets, writes bench/results/weights.json. One run on a noisy
machine: read the numbers as ratios.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import (NOTE, RESULTS, BenchModel, WorkerFailed, fill_defaults, fmt, machine_info, measure_bandwidth,
                    report_targets, run_worker, say, weight_bytes_per_token, worker_env, write_llama_1b, write_results)

from dllama.kernels.quants import FloatType

TYPES = ("q40", "q80", "f16", "f32")


def models_of(key: str, weight: str, workdir: Path, layers: int) -> BenchModel:
    ft = FloatType.parse(weight)
    if key == "smollm2":
        from dllama.default_model import ensure_default_model
        path, tokenizer = ensure_default_model(ft)
        return BenchModel(key, f"SmolLM2-135M {ft.name}", path, tokenizer)
    path = workdir / f"synthetic-llama-1b-{weight}.m"
    write_llama_1b(path, layers, ft)
    return BenchModel(key, f"synthetic Llama-1B {ft.name}", path, None)


def measure(model: BenchModel, weight: str, buffers: str, threads: int, bandwidth: dict[int, float], args,
            cache: Path) -> dict:
    cfg = {"model_path": str(model.path), "backend": "numba", "threads": threads, "buffers": buffers,
           "decode_steps": args.decode_steps, "overhead_steps": 0, "prefill_repeats": args.prefill_repeats,
           "prefill_limit_s": float("inf")}
    out, _ = run_worker("measure", cfg, worker_env(threads, "numba", cache), args.worker_timeout)
    wbytes = weight_bytes_per_token(model.path)
    decode_s = out["decode_ms_median"] / 1e3
    floor_s = wbytes / (bandwidth[threads] * 1e9)
    return {"model": model.key, "label": model.label, "weights": weight, "buffers": buffers, "threads": threads,
            "decode_tok_s": 1 / decode_s, "floor_pct": floor_s / decode_s * 100, "weight_bytes_per_token": wbytes,
            "prefill_tok_s": out.get("prefill_tok_s"), "logits_finite": out["logits_finite"]}


def find(rows: list[dict], model: str, weights: str, threads: int, buffers: str = "q80") -> dict | None:
    return next((r for r in rows if (r["model"], r["weights"], r["threads"], r["buffers"]) ==
                 (model, weights, threads, buffers)), None)


def check_targets(rows: list[dict]) -> list[dict]:
    targets = []
    for weights, buffers in (("q80", "q80"), ("f16", "f32")):
        r = find(rows, "llama1b", weights, 2, buffers)
        targets.append((f"synthetic 1B {weights.upper()} decode, 2 threads >= 70% of the bandwidth floor",
                        r and r["floor_pct"], lambda v: v >= 70, "{:.1f}%"))
    q40, q80 = find(rows, "llama1b", "q40", 2), find(rows, "llama1b", "q80", 2)
    targets.append(("synthetic 1B Q80 decode >= 0.45x Q40 decode (2 threads)",
                    q40 and q80 and q80["decode_tok_s"] / q40["decode_tok_s"], lambda v: v >= 0.45, "{:.2f}x"))
    return report_targets(targets)


def print_table(rows: list[dict], bandwidth: dict[int, float]) -> None:
    print(NOTE)
    print("memory read bandwidth: " + ", ".join(f"{t} thread(s) {bw:.1f} GB/s" for t, bw in sorted(bandwidth.items())))
    w = max(len(r["label"]) for r in rows)
    head = f"{'model':{w}} {'buf':4} {'thr':>3} {'MB/token':>8} {'decode tok/s':>12} {'floor %':>7} {'prefill tok/s':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['label']:{w}} {r['buffers']:4} {r['threads']:3d} {r['weight_bytes_per_token'] / 1e6:8.0f} "
              f"{r['decode_tok_s']:12.2f} "
              f"{r['floor_pct']:7.1f} {fmt(r['prefill_tok_s'], '13.1f'):>13}"
              + ("" if r["logits_finite"] else "  ! logits not finite"))
    print("floor %: (weight bytes per token / bandwidth at that thread count) / decode time per token; "
          "SmolLM2's weights can sit partly in the last-level cache (over 100 % is possible).")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda t: t.split(","), default=["smollm2", "llama1b"])
    p.add_argument("--weights", type=lambda t: t.split(","), default=list(TYPES))
    p.add_argument("--threads", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2])
    p.add_argument("--buffers", type=lambda t: t.split(","), default=["q80", "f32"],
                   help="buffer types for Q40 and Q80 weights (q80: int8 products; f32: exact float ones)")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--prefill-repeats", type=int, default=2)
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    p.add_argument("--bandwidth-repeats", type=int, default=5)
    p.add_argument("--synthetic-layers", type=int, default=16)
    p.add_argument("--tmp-dir", default=None)
    p.add_argument("--worker-timeout", type=float, default=3600.0)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    fill_defaults(args, {"output": str(RESULTS / "weights.json")})
    for name, allowed in (("models", {"smollm2", "llama1b"}), ("weights", set(TYPES)), ("buffers", {"q80", "f32"})):
        bad = set(getattr(args, name)) - allowed
        if bad:
            p.error(f"--{name}: unknown {sorted(bad)}; use {sorted(allowed)}")
    return args


def main() -> None:
    args = parse_args()
    say(NOTE)
    workdir = Path(tempfile.mkdtemp(prefix="dllama-bench-weights-", dir=args.tmp_dir))
    rows, failures = [], []
    try:
        bandwidth = measure_bandwidth(args)
        cache = workdir / "numba-cache"
        for key in args.models:
            for weight in args.weights:
                model = models_of(key, weight, workdir, args.synthetic_layers)
                # Float weights take float32 activations whatever the buffers: one row for them.
                for buffers in (args.buffers if FloatType.parse(weight).is_quantized else ["f32"]):
                    for threads in args.threads:
                        what = f"{model.label}, {buffers} buffers, {threads} thread(s)"
                        say(f"· {what}")
                        try:
                            rows.append(measure(model, weight, buffers, threads, bandwidth, args, cache))
                        except WorkerFailed as e:
                            say(f"! {what}: {e}")
                            failures.append(f"{what}: {str(e).splitlines()[0]}")
                if model.path.is_relative_to(workdir):
                    model.path.unlink()  # up to 5 GB: gone before the next one is written
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if rows:
        print_table(rows, bandwidth)
    for failure in failures:
        print(f"FAILED {failure}")
    targets = check_targets(rows)
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "tmp_dir")}
    write_results(Path(args.output), {"note": NOTE, "machine": machine_info(bandwidth), "settings": settings,
                                      "rows": rows, "targets": targets, "failures": failures}, None)
    print(json.dumps({"targets_met": sum(bool(t["met"]) for t in targets), "targets": len(targets)}))


if __name__ == "__main__":
    main()
