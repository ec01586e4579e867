"""Resident memory of each node of a 2-node run of the Llama-3-8B shape (Q40, 6.3 GB file).

Writes the synthetic model (random weights, Llama 3 8B's layout) to a temporary folder, starts
a worker (``python -m dllama worker``, the root sends it its slice) and a root (``inference
--workers``), and samples both processes' resident memory from /proc every 0.1 s: the peak
(the kernel's high-water mark, VmHWM) and the steady value once the first token is out (the
largest sample after it). Each node's target is one copy of its share: the worker's peak within
15 % of its weight share plus its KV cache. The root's share counts the rows of its float32
embedding table a run reads, not the whole table (a memory map: only the rows read are
resident).

    python bench/memory.py                 # the 8B shape (about 7 minutes here)
    python bench/memory.py --layers 4      # a 4-layer model of the same width (quick)

Prints a table, writes bench/results/memory.json. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import (RESULTS, BenchModel, WorkerProcess, fill_defaults, machine_info, read_stats, root_command,
                    say, smollm2, spawn, stats_file, stop_process, write_results, write_synthetic_model,
                    write_synthetic_tokenizer)

from dllama.formats.mfile import ArchType, HiddenAct, ModelFile, ModelHeader, RopeType
from dllama.kernels.quants import FloatType
from dllama.model.slicing import node_kv_bytes, node_specs, plan_slices

PROMPT = "Tell me about the history of tea"


def llama_8b_header(n_layers: int) -> ModelHeader:
    """Llama 3 8B's shape and rope."""
    return ModelHeader(arch=ArchType.LLAMA, dim=4096, hidden_dim=14336, n_layers=n_layers, n_heads=32,
                       n_kv_heads=8, vocab_size=128256, seq_len=8192, weight_type=FloatType.Q40,
                       hidden_act=HiddenAct.SILU, rope_theta=500000.0, rope_type=RopeType.LLAMA3_1,
                       rope_scaling_factor=8.0, rope_scaling_low_freq_factor=1.0,
                       rope_scaling_high_freq_factor=4.0, rope_scaling_orig_max_seq_len=8192,
                       head_dim=128, norm_epsilon=1e-5)


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process, in kB ({} once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
    except (OSError, ValueError):
        return {}


class Sampler(threading.Thread):
    """Resident memory of some processes every 0.1 s; ``mark()`` starts the steady window."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = {name: 0 for name in pids}
        self.steady = {name: 0 for name in pids}
        self.steady_from: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, pid in self.pids.items():
                s = status_kb(pid)
                if s:
                    self.peak[name] = max(self.peak[name], s.get("VmHWM", 0) * 1024)
                    if self.steady_from is not None and time.monotonic() >= self.steady_from:
                        self.steady[name] = max(self.steady[name], s.get("VmRSS", 0) * 1024)
            self.stop.wait(0.1)


def shares(path: Path, seq_len: int) -> list[dict]:
    """Each node's weight bytes (the root's without its embedding table) and KV cache bytes."""
    h = ModelFile(path).header
    out = []
    for node in plan_slices(h, [1.0, 1.0]):
        specs = node_specs(h, node)
        weights = sum(s.nbytes for s in specs if s.name != "embedding")
        out.append({"weights": weights, "kv": node_kv_bytes(h, node, seq_len)})
    return out


def warm_kernels(workdir: Path, args) -> None:
    """A 2-node run of SmolLM2 with the same weight and buffer types first, in other processes:
    the measured ones then load the compiled kernels (about 10 MB) instead of compiling them
    (a few hundred MB of compiler memory, once per machine)."""
    say("· warming the kernel cache (a 2-node SmolLM2 run)")
    worker = WorkerProcess(workdir / "warm-worker.log", [])
    try:
        worker.wait_listening(time.monotonic() + 300)
        cmd = root_command(smollm2(), 8, "q80", stats_file(str(workdir)), [worker.address], args)
        root = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = root.communicate(timeout=args.timeout)
        if root.returncode != 0:
            raise SystemExit(f"the warm-up run failed:\n{out[-2000:]}")
    finally:
        worker.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="layers of the synthetic model (32 = 8B)")
    p.add_argument("--steps", type=int, default=24, help="positions generated, the prompt's included")
    p.add_argument("--net-timeout", type=float, default=120.0)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--tmp-dir", default=None, help="where the model goes (needs 6.5 GB)")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    fill_defaults(args, {"output": str(RESULTS / "memory.json")})
    args.prompt = PROMPT
    workdir = Path(tempfile.mkdtemp(prefix="dllama-bench-memory-", dir=args.tmp_dir))
    worker = None
    try:
        header = llama_8b_header(args.layers)
        path = workdir / "synthetic-llama-8b-q40.m"
        say(f"· writing the synthetic Llama-3-8B-shaped model ({args.layers} layers) to {path}")
        t = time.perf_counter()
        write_synthetic_model(path, header)
        say(f"  {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
        tokenizer = workdir / "synthetic.t"
        write_synthetic_tokenizer(tokenizer, header.vocab_size, PROMPT)
        model = BenchModel("8b", f"synthetic Llama-3-8B Q40, {args.layers} layers", path, tokenizer)
        warm_kernels(workdir, args)
        worker = WorkerProcess(workdir / "worker.log", [])
        worker.wait_listening(time.monotonic() + 300)
        stats = stats_file(str(workdir))
        cmd = root_command(model, args.steps, "q80", stats, [worker.address], args)
        say("· root and worker: generating")
        with open(workdir / "root.log", "w") as log:
            root = spawn(cmd, stdout=log, stderr=subprocess.STDOUT)
            sampler = Sampler({"root": root.pid, "worker": worker.proc.pid})
            sampler.start()
            started = time.monotonic()
            while root.poll() is None and time.monotonic() - started < args.timeout:
                text = (workdir / "root.log").read_text(errors="replace")
                if sampler.steady_from is None and "\n" in text.split(PROMPT, 1)[-1]:
                    sampler.steady_from = time.monotonic()  # the prompt is echoed: generation runs
                time.sleep(0.1)
            if root.poll() is None:
                stop_process(root)
                raise SystemExit(f"the root ran over {args.timeout:g} s:\n{(workdir / 'root.log').read_text()[-2000:]}")
            sampler.stop.set()
            sampler.join()
        if root.returncode != 0:
            raise SystemExit(f"the root exited with {root.returncode}:\n{(workdir / 'root.log').read_text()[-3000:]}")
        run = read_stats(stats)
        share = shares(path, args.steps)
        rows = []
        for i, name in enumerate(("root", "worker")):
            need = share[i]["weights"] + share[i]["kv"]
            rows.append({"node": name, "weights_bytes": share[i]["weights"], "kv_bytes": share[i]["kv"],
                         "peak_bytes": sampler.peak[name], "steady_bytes": sampler.steady[name],
                         "peak_over_share": sampler.peak[name] / need, "steady_over_share": sampler.steady[name] / need})
        print("| node | weights MB | KV MB | peak MB | steady MB | peak / (weights + KV) | steady / (weights + KV) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['node']} | {r['weights_bytes'] / 1e6:.0f} | {r['kv_bytes'] / 1e6:.1f} | "
                  f"{r['peak_bytes'] / 1e6:.0f} | {r['steady_bytes'] / 1e6:.0f} | {r['peak_over_share']:.3f} | "
                  f"{r['steady_over_share']:.3f} |")
        met = rows[1]["peak_over_share"] <= 1.15
        print(f"[{'met' if met else 'MISSED':^12}] worker peak within 15 % of its weights + KV cache: "
              f"{rows[1]['peak_over_share']:.3f}")
        decode = run.get("tokens") or []
        write_results(Path(args.output), {"machine": machine_info(), "settings": vars(args), "rows": rows,
                                          "target_met": met, "tokens": len(decode)}, None)
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
