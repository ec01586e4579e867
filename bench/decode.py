"""Decode and prefill speed, bandwidth floor, Python overhead and startup time of dllama.

Models: a synthetic random-weight model with the shape of Llama 3.2 1B (Q40, written to a
temporary folder and deleted at the end) and the default model, SmolLM2-135M (Q40). For each
model, backend (numba, numpy) and thread count, a fresh subprocess (threads are fixed when numba
and BLAS start) measures decode and prefill tokens/s, decode time against the memory-bandwidth
floor, and the interpreter overhead per token. Separate subprocesses time the first token from
process start, with an empty and with a warm numba cache.

    python bench/decode.py            # everything (slow: run it on a quiet machine)
    python bench/decode.py --quick    # SmolLM2 only, few steps: a smoke test

Prints tables and the targets, writes bench/results/decode.json and decode.png. One run on a
noisy machine: read the numbers as ratios, not as absolutes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# bench/common.py: puts the repository on sys.path first. Only modules that do not import numba
# at the top: the parent process never starts numba, each worker configures it (threads, cache
# folder) before its first import.
from common import (
    LLAMA_LABEL,
    RESULTS,
    NOTE,
    SMOL_LABEL,
    BenchModel,
    WorkerFailed,
    fill_defaults,
    fmt,
    last_level_cache_bytes,
    llama_1b_label,
    machine_info,
    measure_bandwidth,
    pyplot,
    report_targets,
    run_worker,
    save_figure,
    say,
    smollm2,
    weight_bytes_per_token,
    worker_env,
    write_llama_1b,
    write_results,
)

from dllama.formats.mfile import ModelFile
from dllama.kernels.quants import FloatType

PROMPT_LEN = 128  # prefill: 4 forwards of MAX_BATCH (32) tokens
TTFT_PROMPT = "Write one sentence about the sea."



# -- models ------------------------------------------------------------------------------




# -- workers (each in its own process) -------------------------------------------------------

def _import_engine(backend: str, threads: int):
    """Configure numba for `threads`, then import the engine (numba reads its settings at import)."""
    from dllama.kernels.numba_config import configure_numba_environment
    if backend == "numba":
        configure_numba_environment(threads)
    from dllama.kernels.backend import set_threads
    from dllama.model import forward
    if backend == "numba":
        set_threads(threads)
    return forward


class BlockTimer:
    """Time spent inside the jitted block functions, by wrapping them where JitBlocks looks them up:
    the module attributes of ``dllama.kernels.jit.blocks`` (JitBlocks calls ``fused.attention_block``
    and so on, with ``fused`` that module, so every call goes through the wrappers).

    Per-token Python overhead = forward wall time - time inside the wrapped calls - the wrappers'
    own cost (calibrated). The calls' time includes numba's dispatch (argument unboxing, result
    boxing); `dispatch_us` estimates that separately with a jitted no-op taking the same arguments.
    """

    NAMES = ("start_block", "attention_block", "ffn_block", "end_block", "expert_ffn")

    def __init__(self) -> None:
        from dllama.kernels.jit import blocks
        self.module = blocks
        self.originals = {n: getattr(blocks, n) for n in self.NAMES if hasattr(blocks, n)}
        self.inside = 0.0
        self.calls: dict[str, int] = {}
        self.last_args: dict[str, tuple] = {}

    def _wrap(self, name: str, fn: Callable) -> Callable:
        clock = time.perf_counter

        def timed(*args):
            t = clock()
            out = fn(*args)
            self.inside += clock() - t
            self.calls[name] = self.calls.get(name, 0) + 1
            self.last_args[name] = args
            return out
        return timed

    def __enter__(self) -> BlockTimer:
        for name, fn in self.originals.items():
            setattr(self.module, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.originals.items():
            setattr(self.module, name, fn)

    def wrapper_cost(self, args: tuple, n: int = 2000) -> float:
        """Seconds per call the wrapper adds outside its timed region (call, clock reads, counting)."""
        def identity(*a):
            return None
        probe = self._wrap("_probe", identity)
        inside0, t = self.inside, time.perf_counter()
        for _ in range(n):
            probe(*args)
        total = time.perf_counter() - t
        spent_inside = self.inside - inside0
        self.inside = inside0
        self.calls.pop("_probe", None)
        self.last_args.pop("_probe", None)
        return max(0.0, (total - spent_inside) / n)

    def dispatch_cost(self, name: str, n: int = 500) -> float:
        """Seconds per call numba spends on a no-op's dispatch with this block's last arguments."""
        from numba import njit

        @njit
        def noop(*args):
            return 0
        args = self.last_args[name]
        noop(*args)  # compile
        t = time.perf_counter()
        for _ in range(n):
            noop(*args)
        return (time.perf_counter() - t) / n


def _measure_overhead(tr, token: int, pos: int, steps: int) -> dict:
    """Interpreter overhead per decode token (numba backend); see BlockTimer."""
    totals, insides, calls = [], [], 0
    with BlockTimer() as timer:
        if not timer.originals:
            return {"python_overhead_us": None, "overhead_note": "kernels.jit.blocks has no block functions to wrap"}
        for step in range(steps):
            timer.inside, timer.calls = 0.0, {}
            t = time.perf_counter()
            logits = tr.forward([token], pos + step)
            totals.append(time.perf_counter() - t)
            insides.append(timer.inside)
            calls = sum(timer.calls.values())
            token = int(np.argmax(logits))
        per_token_calls = dict(timer.calls)
        if calls == 0:
            return {"python_overhead_us": None, "overhead_note": "no block call went through the wrappers"}
        wrapper = timer.wrapper_cost(next(iter(timer.last_args.values())))
        dispatch = sum(k * timer.dispatch_cost(name) for name, k in per_token_calls.items())
    outside = [tot - ins - calls * wrapper for tot, ins in zip(totals, insides)]
    return {"python_overhead_us": float(np.median(outside)) * 1e6,
            "dispatch_us": dispatch * 1e6,
            "block_calls_per_token": calls,
            "wrapper_cost_us": wrapper * 1e6}


def worker_measure(cfg: dict) -> dict:
    """Decode and prefill speed of one (model, backend, threads, buffers) configuration."""
    forward = _import_engine(cfg["backend"], cfg["threads"])
    model = ModelFile(cfg["model_path"])
    buffer_type = FloatType.parse(cfg["buffers"])
    decode_steps, overhead_steps = cfg["decode_steps"], cfg["overhead_steps"]
    seq_len = PROMPT_LEN + 2 + decode_steps + overhead_steps + 1
    t = time.perf_counter()
    tr = forward.Transformer(model, seq_len=seq_len, buffer_type=buffer_type, backend=cfg["backend"])
    tr.prepare()  # numpy: the dense float32 copies; numba: nothing (packed at load)
    load_s = time.perf_counter() - t
    prompt = np.random.default_rng(0).integers(0, model.header.vocab_size, PROMPT_LEN).tolist()
    batch = forward.MAX_BATCH

    # Warm-up: load the cached machine code (numba), touch every weight page. The numpy backend
    # skips the 32-token warm-up, which is costly on the 1B model and warms nothing more.
    if cfg["backend"] == "numba":
        tr.forward(prompt[:batch], 0)
    tr.forward(prompt[:1], 0)

    result: dict[str, Any] = {"load_s": load_s}
    result.update(_measure_prefill(tr, prompt, batch, cfg["prefill_repeats"], cfg["prefill_limit_s"]))
    # Decode after the prompt's positions (attention reads PROMPT_LEN past keys), greedy.
    logits = tr.forward(prompt[-1:], PROMPT_LEN - 1)
    pos = PROMPT_LEN
    for _ in range(2):  # warm-up steps, untimed
        logits = tr.forward([int(np.argmax(logits))], pos)
        pos += 1
    times = []
    for _ in range(decode_steps):
        t = time.perf_counter()
        logits = tr.forward([int(np.argmax(logits))], pos)
        times.append(time.perf_counter() - t)
        pos += 1
    result.update({
        "decode_steps": decode_steps,
        "decode_ms_median": float(np.median(times)) * 1e3,
        "decode_ms_mean": float(np.mean(times)) * 1e3,
        "decode_ms_min": float(np.min(times)) * 1e3,
        "logits_finite": bool(np.isfinite(logits).all()),
    })
    if cfg["backend"] == "numba" and overhead_steps > 0:
        result.update(_measure_overhead(tr, int(np.argmax(logits)), pos, overhead_steps))
    return result


def _measure_prefill(tr, prompt: list[int], batch: int, repeats: int, limit_s: float) -> dict:
    """Best of `repeats` prompt evaluations in forwards of `batch` tokens. When the first forward
    shows the whole prompt would take longer than `limit_s`, stop there and report that one forward's
    rate, marked as an estimate."""
    chunks = [(s, prompt[s:s + batch]) for s in range(0, len(prompt), batch)]
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, (start, tokens) in enumerate(chunks):
            tr.forward(tokens, start)
            elapsed = time.perf_counter() - t0
            if i == 0 and elapsed * len(chunks) > limit_s:
                return {"prefill_tok_s": len(tokens) / elapsed,
                        "prefill_note": f"estimate from 1 forward of {len(tokens)} tokens ({elapsed:.1f} s): the "
                                        f"whole prompt would take over the {limit_s:g} s limit"}
        elapsed = time.perf_counter() - t0
        best = elapsed if best is None else min(best, elapsed)
    return {"prefill_tok_s": len(prompt) / best, "prefill_note": None}


def worker_ttft(cfg: dict) -> dict:
    """Load the model, evaluate a short prompt, pick the first token: report the wall clock then.

    The parent notes the wall clock just before starting this process, so the difference covers
    interpreter start, imports, numba's compile or cache load, model load and the prompt.
    """
    t_start = time.time()
    forward = _import_engine(cfg["backend"], cfg["threads"])
    t_imported = time.time()
    model = ModelFile(cfg["model_path"])
    if cfg["tokenizer"]:
        from dllama.engine.tokenizer import Tokenizer
        prompt = Tokenizer.load(cfg["tokenizer"]).encode(TTFT_PROMPT)
    else:
        prompt = np.random.default_rng(1).integers(0, model.header.vocab_size, 12).tolist()
    tr = forward.Transformer(model, seq_len=256, buffer_type=FloatType.Q80, backend=cfg["backend"])
    t_loaded = time.time()
    token = int(np.argmax(tr.forward(prompt[-forward.MAX_BATCH:], 0)))
    t_first = time.time()
    return {"first_token_wall": t_first, "script_start_wall": t_start, "imports_s": t_imported - t_start,
            "load_s": t_loaded - t_imported, "prompt_s": t_first - t_loaded, "prompt_tokens": len(prompt),
            "token": token}


def worker_bandwidth(cfg: dict) -> dict:
    """Memory read bandwidth (GB/s) per thread count: a parallel sum over an array far larger
    than the last-level cache, best of a few repeats."""
    from dllama.kernels.numba_config import configure_numba_environment
    configure_numba_environment(max(cfg["threads"]))
    import numba

    @numba.njit(parallel=True, cache=False)
    def total(a):
        # int64: integer adds reassociate, so LLVM vectorizes the loop (a float64 sum without
        # fastmath would be bound by the add latency, not by memory).
        s = 0
        for i in numba.prange(a.shape[0]):
            s += a[i]
        return s

    data = np.ones(int(cfg["gib"] * (1 << 30)) // 8, dtype=np.int64)  # pages written: resident
    total(data[:1024])  # compile
    result = {}
    for threads in cfg["threads"]:
        numba.set_num_threads(threads)
        best = float("inf")
        for _ in range(cfg["repeats"]):
            t = time.perf_counter()
            if total(data) != data.shape[0]:
                raise RuntimeError("bandwidth kernel summed wrong")
            best = min(best, time.perf_counter() - t)
        result[str(threads)] = data.nbytes / best / 1e9
    return {"gib": cfg["gib"], "gb_s": result}


WORKERS: dict[str, Callable[[dict], dict]] = {
    "measure": worker_measure, "ttft": worker_ttft, "bandwidth": worker_bandwidth}


# -- the parent: runs workers, collects rows ---------------------------------------------------










def attempt(what: str, failures: list[str], fn: Callable[[], Any]) -> Any:
    """fn(), or None after noting its failure: one broken configuration should not cost the
    whole (long) run."""
    try:
        return fn()
    except WorkerFailed as e:
        say(f"! {what}: {e}")
        failures.append(f"{what}: {str(e).splitlines()[0]}")
        return None





def measure_ttft(model: BenchModel, backend: str, threads: int, cache_dir: Path | None, timeout: float) -> dict:
    cfg = {"model_path": str(model.path), "tokenizer": str(model.tokenizer) if model.tokenizer else None,
           "backend": backend, "threads": threads}
    out, started = run_worker("ttft", cfg, worker_env(threads, backend, cache_dir), timeout)
    out["ttft_s"] = out["first_token_wall"] - started
    out["interpreter_start_s"] = out["script_start_wall"] - started
    return out


def measure_startup(model: BenchModel, threads: int, cache_dir: Path, timeout: float) -> dict:
    """First token from process start with an empty numba cache, then with the cache it left."""
    say(f"· {model.label}: first token with an empty numba cache (compiles), then a warm one")
    cache_dir.mkdir(parents=True, exist_ok=True)
    if any(cache_dir.iterdir()):
        raise RuntimeError(f"{cache_dir} should be empty for the compile measurement")
    cold = measure_ttft(model, "numba", threads, cache_dir, timeout)
    warm = measure_ttft(model, "numba", threads, cache_dir, timeout)
    return {"model": model.label, "threads": threads, "cold_ttft_s": cold["ttft_s"], "warm_ttft_s": warm["ttft_s"],
            "compile_s": cold["ttft_s"] - warm["ttft_s"], "cold": cold, "warm": warm}


def configurations(args) -> list[tuple[str, str, int]]:
    """(backend, buffers, threads) to measure, in run order."""
    out = []
    for backend in args.backends:
        buffers = args.numba_buffers if backend == "numba" else ["q80"]
        for buf in buffers:
            for threads in args.threads:
                out.append((backend, buf, threads))
    return out


def measure_model(model: BenchModel, args, bandwidth: dict[int, float], workdir: Path,
                  failures: list[str]) -> tuple[list[dict], dict | None]:
    """Every configuration of one model; numba rows share a cache folder warmed by the startup run."""
    cache_dir = workdir / f"numba-cache-{model.key}"
    startup = None
    ttft: dict[tuple[str, int], float | None] = {}
    if "numba" in args.backends:
        startup = attempt(f"{model.label} startup", failures,
                          lambda: measure_startup(model, max(args.threads), cache_dir, args.worker_timeout))
        ttft[("numba", max(args.threads))] = startup and startup["warm_ttft_s"]
    wbytes = weight_bytes_per_token(model.path)
    rows = []
    for backend, buffers, threads in configurations(args):
        if (backend, threads) not in ttft and buffers == "q80":
            say(f"· {model.label}: time to first token, {backend}, {threads} thread(s)")
            out = attempt(f"{model.label} {backend} {threads} thread(s) TTFT", failures,
                          lambda: measure_ttft(model, backend, threads, cache_dir if backend == "numba" else None,
                                               args.worker_timeout))
            ttft[(backend, threads)] = out and out["ttft_s"]
        numpy_run = backend == "numpy"
        cfg = {"model_path": str(model.path), "backend": backend, "threads": threads, "buffers": buffers,
               "decode_steps": args.numpy_decode_steps if numpy_run else args.decode_steps,
               "overhead_steps": 0 if numpy_run else args.overhead_steps,
               "prefill_repeats": 1 if numpy_run else args.prefill_repeats,
               "prefill_limit_s": args.numpy_prefill_limit if numpy_run else float("inf")}
        say(f"· {model.label}: {backend}, {buffers} buffers, {threads} thread(s)")
        env = worker_env(threads, backend, cache_dir if backend == "numba" else None)
        done = attempt(f"{model.label} {backend} {buffers} buffers {threads} thread(s)", failures,
                       lambda: run_worker("measure", cfg, env, args.worker_timeout))
        if done is None:
            continue
        out = done[0]
        rows.append(make_row(model, backend, buffers, threads, out, wbytes, bandwidth.get(threads),
                             ttft.get((backend, threads)) if buffers == "q80" else None))
    return rows, startup


def make_row(model: BenchModel, backend: str, buffers: str, threads: int, out: dict, wbytes: int,
             bandwidth_gb_s: float | None, ttft_s: float | None) -> dict:
    """One configuration's numbers; decode speed from the median step (robust to other processes)."""
    decode_s = out["decode_ms_median"] / 1e3
    floor_s = wbytes / (bandwidth_gb_s * 1e9) if bandwidth_gb_s else None
    row = {"model": model.label, "backend": backend, "buffers": buffers, "threads": threads,
           "decode_tok_s": 1.0 / decode_s, "decode_tok_s_mean": 1e3 / out["decode_ms_mean"],
           "weight_bytes_per_token": wbytes, "floor_ms": floor_s * 1e3 if floor_s else None,
           "floor_pct": floor_s / decode_s * 100 if floor_s else None, "ttft_s": ttft_s}
    row.update(out)
    if row.get("prefill_tok_s"):
        row["prefill_over_decode"] = row["prefill_tok_s"] / row["decode_tok_s"]
    return row


# -- report ------------------------------------------------------------------------------------

def print_tables(rows: list[dict], startup: list[dict], bandwidth: dict[int, float]) -> None:
    print(NOTE)
    print("memory read bandwidth: " + ", ".join(f"{t} thread(s) {bw:.1f} GB/s" for t, bw in sorted(bandwidth.items())))
    print()
    w = max([len("model")] + [len(r["model"]) for r in rows])
    head = (f"{'model':{w}} {'backend':7} {'buf':4} {'thr':>3} {'decode tok/s':>12} {'ms/tok':>8} "
            f"{'floor ms':>8} {'floor %':>7} {'prefill tok/s':>13} {'pf/dec':>6} {'py µs/tok':>9} "
            f"{'disp µs':>7} {'TTFT s':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        prefill = fmt(r.get("prefill_tok_s"), ".1f") + ("*" if r.get("prefill_note") else "")
        print(f"{r['model']:{w}} {r['backend']:7} {r['buffers']:4} {r['threads']:3d} {r['decode_tok_s']:12.2f} "
              f"{r['decode_ms_median']:8.2f} {fmt(r['floor_ms'], '8.2f'):>8} {fmt(r['floor_pct'], '7.1f'):>7} "
              f"{prefill:>13} {fmt(r.get('prefill_over_decode'), '6.1f'):>6} "
              f"{fmt(r.get('python_overhead_us'), '9.0f'):>9} {fmt(r.get('dispatch_us'), '7.0f'):>7} "
              f"{fmt(r['ttft_s'], '6.2f'):>6}")
    cache = last_level_cache_bytes()
    for model in dict.fromkeys(r["model"] for r in rows):
        wbytes = next(r["weight_bytes_per_token"] for r in rows if r["model"] == model)
        if cache and wbytes < cache:
            print(f"note: {model}'s weights per token ({wbytes / 1e6:.0f} MB) fit in the {cache >> 20} MiB "
                  f"last-level cache, so its decode can beat the DRAM floor (floor % over 100 is possible)")
    for r in rows:
        if r.get("prefill_note"):
            print(f"* {r['model']} {r['backend']} {r['threads']} thread(s): prefill {r['prefill_note']}")
        if not r["logits_finite"]:
            print(f"! {r['model']} {r['backend']} {r['threads']} thread(s): logits not finite")
    print("decode: median step; floor: weight bytes per token / bandwidth at that thread count; "
          "py µs/tok: forward time outside the jitted block calls; disp µs: numba's estimated "
          "argument handling per token inside those calls; TTFT: process start to first token, warm cache.")
    if startup:
        print()
        print(f"{'model':{w}} {'thr':>3} {'first token, empty cache s':>26} {'warm cache s':>12} {'compile s':>9}")
        for s in startup:
            print(f"{s['model']:{w}} {s['threads']:3d} {s['cold_ttft_s']:26.2f} {s['warm_ttft_s']:12.2f} "
                  f"{s['compile_s']:9.2f}")
    print()


def _find(rows: list[dict], model: str, backend: str = "numba", threads: int = 2, buffers: str = "q80") -> dict | None:
    for r in rows:
        if (r["model"], r["backend"], r["threads"], r["buffers"]) == (model, backend, threads, buffers):
            return r
    return None


def check_targets(rows: list[dict]) -> list[dict]:
    """The project's targets, each met, missed or not measured in this run."""
    big, small = _find(rows, LLAMA_LABEL), _find(rows, SMOL_LABEL)
    targets = [
        ("synthetic 1B Q40 decode, numba, 2 threads >= 70% of the bandwidth floor",
         big and big["floor_pct"], lambda v: v >= 70, "{:.1f}%"),
        ("SmolLM2 Q40 decode, numba, 2 threads >= 150 tok/s",
         small and small["decode_tok_s"], lambda v: v >= 150, "{:.1f} tok/s"),
    ]
    for label, r in ((LLAMA_LABEL, big), (SMOL_LABEL, small)):
        targets.append((f"{label} prefill >= 3x decode tok/s, numba, 2 threads",
                        r and r.get("prefill_over_decode"), lambda v: v >= 3, "{:.1f}x"))
    targets.append(("SmolLM2 cached time to first token < 2 s (numba, 2 threads)",
                    small and small["ttft_s"], lambda v: v < 2, "{:.2f} s"))
    return report_targets(targets)


def plot(rows: list[dict], bandwidth: dict[int, float], path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    models = list(dict.fromkeys(r["model"] for r in rows))
    most = max(sum(r["model"] == m for r in rows) for m in models)
    # One panel per model, stacked: their speeds differ tenfold, and the labels stay readable.
    fig, axes = plt.subplots(len(models), 1, figsize=(max(8.0, 1.7 * most), 4.8 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        mine = [r for r in rows if r["model"] == model]
        x = np.arange(len(mine))
        decode = [r["decode_tok_s"] for r in mine]
        prefill = [r.get("prefill_tok_s") or 0 for r in mine]
        ax.bar(x - 0.2, decode, 0.4, label="decode tok/s", color="tab:blue")
        ax.bar(x + 0.2, prefill, 0.4, label="prefill tok/s (128-token prompt)", color="tab:orange")
        for xi, r in zip(x, mine):
            if r["floor_pct"] is not None:
                ax.annotate(f"{r['floor_pct']:.0f}% of\nfloor", (xi - 0.2, r["decode_tok_s"]), ha="center",
                            va="bottom", fontsize=8)
        ax.set_xticks(x, [f"{r['backend']}\n{r['buffers']} bufs\n{r['threads']} thr" for r in mine], fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        # A common bottom well below the shortest bar, so bar heights compare on the log scale.
        ax.set_ylim(bottom=min(v for v in decode + prefill if v > 0) / 4)
        ax.set_ylabel("tokens/s (log)")
        ax.set_title(model)
        if model == SMOL_LABEL:
            ax.axhline(150, color="tab:blue", ls="--", lw=1, label="decode target 150 tok/s")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    bw = ", ".join(f"{t} thr {v:.1f} GB/s" for t, v in sorted(bandwidth.items()))
    fig.suptitle(f"dllama decode/prefill speed (bandwidth {bw}); one run on a noisy machine: ratios", fontsize=10)
    save_figure(fig, path)


# -- main ----------------------------------------------------------------------------------------

def prepare_models(args, workdir: Path) -> list[BenchModel]:
    models = []
    for key in args.models:
        if key == "smollm2":
            models.append(smollm2(key))
        elif key == "llama1b":
            path = workdir / "synthetic-llama-1b-q40.m"
            write_llama_1b(path, args.synthetic_layers)
            models.append(BenchModel(key, llama_1b_label(args.synthetic_layers), path, None))
    return models


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda text: [kind(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: SmolLM2 only, few steps, q80 buffers")
    p.add_argument("--models", type=_csv(str), default=None, help="llama1b,smollm2 (default both)")
    p.add_argument("--threads", type=_csv(int), default=[1, 2])
    p.add_argument("--backends", type=_csv(str), default=["numba", "numpy"])
    p.add_argument("--numba-buffers", type=_csv(str), default=None,
                   help="buffer types measured with numba: q80,f32 (default; --quick: q80)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps, numba (default 64)")
    p.add_argument("--numpy-decode-steps", type=int, default=None, help="timed decode steps, numpy (default 8)")
    p.add_argument("--overhead-steps", type=int, default=None, help="instrumented decode steps (default 16)")
    p.add_argument("--prefill-repeats", type=int, default=None, help="best of N prompt evaluations, numba")
    p.add_argument("--numpy-prefill-limit", type=float, default=120.0,
                   help="seconds: a numpy prefill projected to take longer is cut to one forward")
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    p.add_argument("--bandwidth-repeats", type=int, default=None)
    p.add_argument("--synthetic-layers", type=int, default=16, help="layers of the synthetic model (16 = 1B)")
    p.add_argument("--tmp-dir", default=None, help="where the synthetic model and numba caches go")
    p.add_argument("--worker-timeout", type=float, default=3600.0)
    p.add_argument("--output", default=None, help="JSON path; the PNG goes next to it")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"models": ["smollm2"] if quick else ["llama1b", "smollm2"],
                "numba_buffers": ["q80"] if quick else ["q80", "f32"],
                "decode_steps": 8 if quick else 64, "numpy_decode_steps": 3 if quick else 8,
                "overhead_steps": 4 if quick else 16, "prefill_repeats": 1 if quick else 2,
                "bandwidth_repeats": 2 if quick else 5,
                "output": str(RESULTS / ("decode_quick.json" if quick else "decode.json"))}
    fill_defaults(args, defaults)
    for name, allowed in (("models", {"llama1b", "smollm2"}), ("backends", {"numba", "numpy"}),
                          ("numba_buffers", {"q80", "f32"})):
        bad = set(getattr(args, name)) - allowed
        if bad:
            p.error(f"--{name.replace('_', '-')}: unknown {sorted(bad)}; use {sorted(allowed)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.config))))
        return
    say(NOTE)
    workdir = Path(tempfile.mkdtemp(prefix="dllama-bench-", dir=args.tmp_dir))
    try:
        bandwidth = measure_bandwidth(args)
        rows, startup, failures = [], [], []
        for model in prepare_models(args, workdir):
            model_rows, model_startup = measure_model(model, args, bandwidth, workdir, failures)
            rows += model_rows
            if model_startup:
                startup.append(model_startup)
            if model.path.is_relative_to(workdir):
                model.path.unlink()  # 1.75 GB: gone before the next model runs
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_tables(rows, startup, bandwidth)
    for failure in failures:
        print(f"FAILED {failure}")
    targets = check_targets(rows)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "config", "output", "tmp_dir")}
    settings["prompt_len"] = PROMPT_LEN
    result = {"note": NOTE, "machine": machine_info(bandwidth), "settings": settings, "rows": rows,
              "startup": startup, "targets": targets, "failures": failures}
    write_results(Path(args.output), result, (lambda png: plot(rows, bandwidth, png)) if rows else None)


if __name__ == "__main__":
    main()
