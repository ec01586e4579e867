"""Prompt evaluation by prompt length: short prompts (the fixed cost of a chat turn) against long
ones (attention over thousands of positions).

SmolLM2-135M Q40, q80 buffers, one thread, greedy, as a new user runs it: ``python -m dllama
inference`` in a fresh process per run, with prompts of 26, 101, 512 and 3034 tokens cut from
the calibration text (repeated as needed), each followed by 2 generated tokens. Each length runs
``--repeats`` times; the best evaluation rate counts (``totals.eval_tok_s`` of ``--stats-json``),
with the time to first token of that run.

    python bench/prompts.py
    python bench/prompts.py --lengths 26 3034 --threads 2

Target (printed): the longest prompt evaluates at 50 % or more of the shortest one's rate.
Results: bench/results/prompts.json.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (NOTE, RESULTS, ROOT, child_env, machine_info, read_stats, report_targets, say, smollm2, tail,
                    write_results)

TEXT = ROOT / "dllama" / "engine" / "calibration.txt"


def prompt_of(tokenizer, n: int) -> str:
    """Text of ``n`` tokens (as the tokenizer encodes it back): the calibration text, repeated, cut."""
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_bos=False)
    while len(ids) < n:
        ids = ids + ids
    return tokenizer.decode(ids[:n])


def run(model, prompt: str, n: int, threads: int, timeout: float) -> dict:
    """One ``inference`` of ``prompt`` (about ``n`` tokens) and 2 more tokens: its stats JSON."""
    with tempfile.TemporaryDirectory(prefix="dllama-prompts-") as tmp:
        stats = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "dllama", "inference", "--model", str(model.path), "--tokenizer",
               str(model.tokenizer), "--prompt", prompt, "--steps", str(n + 2), "--max-seq-len", str(n + 64),
               "--temperature", "0", "--nthreads", str(threads), "--buffer-float-type", "q80",
               "--stats-json", str(stats)]
        done = subprocess.run(cmd, cwd=ROOT, env=child_env(threads), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"inference exited with {done.returncode}:\n{tail(done.stderr)}")
        return read_stats(stats)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[26, 101, 512, 3034])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    from dllama.engine.tokenizer import Tokenizer  # no numba in this process

    model = smollm2()
    tokenizer = Tokenizer.load(model.tokenizer)
    run(model, prompt_of(tokenizer, 16), 16, args.threads, args.timeout)  # kernels compiled or loaded once
    rows = []
    for n in args.lengths:
        prompt = prompt_of(tokenizer, n)
        runs = [run(model, prompt, n, args.threads, args.timeout) for _ in range(args.repeats)]
        best = max(runs, key=lambda s: s["totals"]["eval_tok_s"])
        rows.append({"length": n, "prompt_tokens": best["prompt_tokens"], "eval_tok_s": best["totals"]["eval_tok_s"],
                     "ttft_s": best["totals"]["seconds_to_first_token"],
                     "all_eval_tok_s": [s["totals"]["eval_tok_s"] for s in runs]})
        say(f"  {best['prompt_tokens']} tokens: {rows[-1]['eval_tok_s']:.0f} tok/s, first token after "
            f"{rows[-1]['ttft_s'] * 1e3:.0f} ms")
    short = rows[0]["eval_tok_s"]
    print(f"\nSmolLM2-135M Q40, q80 buffers, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'prompt tokens':>13} {'eval tok/s':>10} {'x shortest':>10} {'first token ms':>14}")
    for row in rows:
        row["vs_shortest"] = row["eval_tok_s"] / short
        print(f"{row['prompt_tokens']:>13} {row['eval_tok_s']:>10.0f} {row['vs_shortest']:>10.2f} "
              f"{row['ttft_s'] * 1e3:>14.0f}")
    targets = report_targets([(f"a {rows[-1]['prompt_tokens']}-token prompt at >= 50 % of the shortest's rate",
                               rows[-1]["vs_shortest"] if len(rows) > 1 else None, lambda v: v >= 0.5, "{:.0%}")])
    print(NOTE)
    out = Path(args.output) if args.output else RESULTS / "prompts.json"
    write_results(out, {"machine": machine_info(), "threads": args.threads, "rows": rows, "targets": targets,
                        "note": NOTE}, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
