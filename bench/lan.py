"""Cluster speed on an emulated home LAN (bench/netlab.py), next to what a network model predicts.

Each layout puts the root and every worker in a network namespace of its own, joined through a
bridge by links shaped to one rate (1 Gbit/s and 100 Mbit/s by default; no added delay: this
kernel has no netem, so the rate's serialization delay is all the latency there is). The root
runs `python -m dllama inference --stats-json` on the synthetic Llama-1B-shaped Q40 model (and
SmolLM2 with --models), q80 sync, one thread per node, greedy and sampled (temperature 0.8,
top-p 0.9, seed 1); workers run `dllama worker --nthreads 1` and receive their weights at every
run (no slice cache), so every run also measures the weight transfer, beside plain TCP's rate
on the same link.

The network model: a token costs the compute the root measured (its --stats-json compute ms)
plus, per sync point (2 per layer, plus the root's input), a fixed cost c0 and the time each
node's link takes to carry its part to every other node, (N - 1) x part bytes / rate, plus the
logits (or their summaries) the workers send the root. c0 is fitted once, from the 2-node run
at the fastest rate (where the model equals the measurement by construction); every other row
is a prediction. With that c0 it states what Llama 3 8B Q40 on Raspberry Pi 5s would do.

    python bench/lan.py                         # 1B shape, 1-4 nodes, 1 Gbit/s and 100 Mbit/s
    python bench/lan.py --quick                 # 1 and 2 nodes, fewer steps

Needs root (network namespaces). All nodes share this machine's cores: 3 and 4 nodes measure
contention as much as the network. Prints tables, writes bench/results/lan.json and .png.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster import root_figures
from common import (RESULTS, BenchModel, add_node_options, cluster_model, fill_defaults, fmt, machine_info,
                    model_panels, print_table, read_stats, root_command, root_failure, save_figure, say, stats_file,
                    tail, write_results)
from netlab import NO_DELAY_NOTE, Lan, rate_bits, tcp_rate

from dllama.formats.mfile import ModelFile

PROMPT = "Tell me about the sea."
PORT = 9998
MODES = {"greedy": [], "sampled": ["--temperature", "0.8", "--topp", "0.9", "--seed", "1"]}
NOTE = ("Every node runs on this one machine, sharing its cores; links are shaped, not delayed. One run on "
        "a shared, noisy machine: read the numbers as ratios.")
# Bytes on the wire beyond a part's payload: the data frame's header and ZeroMQ's framing.
FRAME_BYTES = 16 + 9
# Distributed-llama's published Raspberry Pi 5 figures, Llama 3 8B Q40 (tokens/s by node count).
PI5_PUBLISHED = {1: 1.77, 2: 2.25, 4: 3.01}
LLAMA3_8B = {"dim": 4096, "n_layers": 32, "vocab": 128256}


def part_bytes(dim: int, q80: bool = True) -> int:
    """One node's partial output of a block on the wire (Q80: 34 bytes a block of 32)."""
    return (dim // 32 * 34 if q80 else dim * 4) + FRAME_BYTES


def sync_seconds(n_nodes: int, dim: int, n_layers: int, rate_bits: float, c0: float, logit_bytes: float) -> float:
    """The network model's sync time per token: every sync point costs c0 plus the time a node's
    link takes to carry its part to each other node; the root's input (float32) goes to every
    worker once; the workers' logits (or summaries) come to the root."""
    if n_nodes == 1:
        return 0.0
    per_sync = c0 + (n_nodes - 1) * part_bytes(dim) * 8 / rate_bits
    input_s = (n_nodes - 1) * (dim * 4 + FRAME_BYTES) * 8 / rate_bits
    return 2 * n_layers * per_sync + c0 + input_s + logit_bytes * 8 / rate_bits


def fit_c0(row: dict, dim: int, n_layers: int, rate_bits: float) -> float:
    """The fixed cost per sync point that makes the model meet a measured row."""
    bare = sync_seconds(row["nodes"], dim, n_layers, rate_bits, 0.0, row["logit_bytes"])
    return max(0.0, (row["sync_ms_per_token"] / 1e3 - bare) / (2 * n_layers + 1))


def start_workers(lan: Lan, nodes: int, log_dir: Path, timeout: float) -> list[subprocess.Popen]:
    procs = []
    for i in range(1, nodes):
        log = log_dir / f"node{i}.log"
        with open(log, "w", encoding="utf-8") as out:
            procs.append(lan.popen(i, [sys.executable, "-m", "dllama", "worker", "--host", lan.addresses[i],
                                       "--port", str(PORT), "--nthreads", "1"], stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    for i, proc in enumerate(procs, 1):
        log = log_dir / f"node{i}.log"
        while "Listening on" not in log.read_text(encoding="utf-8", errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {i} did not start:\n{tail(log.read_text(errors='replace'))}")
            time.sleep(0.05)
    return procs


def run_root(lan: Lan, model: BenchModel, steps: int, mode: str, addresses: list[str], args) -> dict:
    stats_path = stats_file(args.tmp_dir)
    cmd = root_command(model, steps, "q80", stats_path, addresses, args, *MODES[mode])
    try:
        spawned = time.time()
        t0 = time.perf_counter()
        try:
            done = lan.run(0, cmd, capture_output=True, text=True, errors="replace", timeout=args.timeout)
            rc, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired as e:
            rc, stderr = None, e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        wall = time.perf_counter() - t0
        if rc != 0:
            return {"failed": True, "error": root_failure(rc, args.timeout), "stderr_tail": tail(stderr or "")}
        return root_figures(read_stats(stats_path), spawned, wall)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        return {"failed": True, "error": str(e).splitlines()[0], "stderr_tail": tail(str(e))}
    finally:
        stats_path.unlink(missing_ok=True)


def measure(model: BenchModel, args, log_dir: Path) -> list[dict]:
    h = ModelFile(model.path).header
    steps = args.steps
    rows = []
    for rate in args.rates:
        for nodes in args.nodes:
            say(f"· {model.label}, {nodes} node(s) at {rate}")
            with Lan(nodes, rate) as lan:
                tcp = tcp_rate(lan, 0, 1, megabytes=32) if nodes > 1 else None
                try:
                    workers = start_workers(lan, nodes, log_dir, args.worker_start_timeout)
                except RuntimeError as e:
                    rows += [{"model": model.label, "rate": rate, "nodes": nodes, "mode": m, "failed": True,
                              "error": str(e).splitlines()[0], "stderr_tail": tail(str(e))} for m in args.modes]
                    continue
                try:
                    for mode in args.modes:
                        r = run_root(lan, model, steps, mode, [f"{a}:{PORT}" for a in lan.addresses[1:nodes]], args)
                        r.update(model=model.label, key=model.key, rate=rate, nodes=nodes, mode=mode, tcp_bits=tcp,
                                 dim=h.dim, n_layers=h.n_layers)
                        if not r["failed"]:
                            # What the workers sent per token beyond the activations: the logits.
                            per_sync = (nodes - 1) * part_bytes(h.dim)
                            r["logit_bytes"] = max(0.0, r["recv_kb_per_token"] * 1e3 - (2 * h.n_layers) * per_sync)
                            sent = r["weight_transfers"]
                            r["weights_mbit_s"] = (sum(w["mb"] for w in sent) * 8 / sum(w["s"] for w in sent)
                                                   if sent and sum(w["s"] for w in sent) else None)
                        else:
                            say(f"! {mode}: {r['error']}\n{r.get('stderr_tail', '')}")
                        rows.append(r)
                finally:
                    for w in workers:
                        w.terminate()
                        try:
                            w.wait(timeout=10)
                        except subprocess.TimeoutExpired:
                            w.kill()
    predict(rows, args)
    return rows


def predict(rows: list[dict], args) -> None:
    """The model's tokens/s for every row, c0 fitted on the 2-node greedy run at the fastest rate."""
    ok = [r for r in rows if not r["failed"]]
    fastest = max(args.rates, key=rate_bits)
    anchor = next((r for r in ok if r["nodes"] == 2 and r["mode"] == "greedy" and r["rate"] == fastest), None)
    if anchor is None:
        return
    c0 = fit_c0(anchor, anchor["dim"], anchor["n_layers"], rate_bits(fastest))
    for r in ok:
        per_token = (r["compute_ms_per_token"] or 0) + (r["sync_ms_per_token"] or 0)
        r["interval_tok_s"] = 1e3 / per_token if per_token else None  # what the model predicts
        sync = sync_seconds(r["nodes"], r["dim"], r["n_layers"], rate_bits(r["rate"]), c0, r["logit_bytes"])
        r["c0_ms"] = c0 * 1e3
        r["predicted_sync_ms"] = sync * 1e3
        r["predicted_tok_s"] = 1.0 / (r["compute_ms_per_token"] / 1e3 + sync) if r["compute_ms_per_token"] else None
        r["fitted_here"] = r is anchor


def pi5_expectations(c0: float) -> list[dict]:
    """Llama 3 8B Q40 on N Raspberry Pi 5s on gigabit Ethernet, by the network model: compute per
    token from distributed-llama's published 1-node figure, split N ways; greedy (a few bytes of
    logits); the fixed cost per sync point as measured here (x86, links without delay) and at
    0.5 and 1 ms (a Pi's slower Python, a real switch's latency; distributed-llama's all-reduce
    on gigabit costs close to 1 ms)."""
    compute = 1.0 / PI5_PUBLISHED[1]
    out = []
    for n in (1, 2, 4, 8):
        row = {"nodes": n, "compute_ms": compute / n * 1e3, "published": PI5_PUBLISHED.get(n)}
        for name, cost in (("here", c0), ("0.5ms", 0.5e-3), ("1ms", 1e-3)):
            sync = sync_seconds(n, LLAMA3_8B["dim"], LLAMA3_8B["n_layers"], 1e9, cost, 12 * (n - 1))
            row[f"tok_s_{name}"] = 1.0 / (compute / n + sync)
            row[f"sync_ms_{name}"] = sync * 1e3
        out.append(row)
    return out


def _cells(r: dict) -> str:
    if r["failed"]:
        return " failed | | | | | | | |"
    return (f" {fmt(r['decode_tok_s'], '.1f')} | {fmt(r.get('interval_tok_s'), '.1f')} | "
            f"{fmt(r.get('predicted_tok_s'), '.1f')}"
            f"{' (fit)' if r.get('fitted_here') else ''} | {fmt(r['sync_ms_per_token'], '.1f')} | "
            f"{fmt(r.get('predicted_sync_ms'), '.1f')} | {fmt(r['sent_kb_per_token'], '.1f')} | "
            f"{fmt(r['recv_kb_per_token'], '.1f')} | {fmt(r.get('weights_mbit_s'), '.0f')} / "
            f"{fmt(r['tcp_bits'] / 1e6 if r.get('tcp_bits') else None, '.0f')} |")


def print_report(rows: list[dict], pi5: list[dict] | None) -> None:
    print()
    print(NOTE)
    print(NO_DELAY_NOTE)
    print()
    print_table("| model | rate | nodes | mode | decode tok/s | tok/s by token interval | predicted | "
                "sync ms/token | predicted | "
                "kB/token sent | kB/token recv | weights / plain TCP Mbit/s |", rows,
                lambda r: f"| {r['model']} | {r['rate']} | {r['nodes']} | {r['mode']} |", _cells)
    c0 = next((r["c0_ms"] for r in rows if r.get("c0_ms") is not None), None)
    if c0 is not None:
        print(f"\nNetwork model: c0 = {c0:.3f} ms per sync point, fitted on the row marked (fit); the other "
              "predictions use the measured compute ms per token and the link's rate. Decode tok/s is the "
              "forwards' own rate (as the CLI prints it); the model predicts the rate of whole token intervals "
              "(sampling and printing included), the column beside it.")
    if pi5:
        print("\nLlama 3 8B Q40 on Raspberry Pi 5s, gigabit Ethernet, by the model (compute: distributed-llama's "
              f"published 1-node figure split N ways; c0 {c0:.2f} ms as measured here, or 0.5 or 1 ms):\n")
        print("| Pi 5 nodes | compute ms/token | tok/s, c0 here | tok/s, c0 0.5 ms | tok/s, c0 1 ms "
              "| distributed-llama published |")
        print("|---|---|---|---|---|---|")
        for p in pi5:
            print(f"| {p['nodes']} | {p['compute_ms']:.0f} | {p['tok_s_here']:.2f} | {p['tok_s_0.5ms']:.2f} | "
                  f"{p['tok_s_1ms']:.2f} | {fmt(p['published'], '.2f')} |")
    for r in rows:
        if r["failed"]:
            print(f"\nFAILED {r['model']}, {r['rate']}, {r['nodes']} node(s), {r['mode']}: {r['error']}\n"
                  f"{r.get('stderr_tail', '')}")
    print()


def plot(rows: list[dict], path: Path) -> None:
    fig, panels = model_panels(rows, 7.0)
    for ax, model, mine in panels:
        labels, measured, predicted = [], [], []
        for r in mine:
            if r["mode"] != "greedy":
                continue
            labels.append(f"{r['nodes']}n\n{r['rate']}")
            measured.append(0 if r["failed"] else r.get("interval_tok_s") or 0)
            predicted.append(0 if r["failed"] else r.get("predicted_tok_s") or 0)
        x = list(range(len(labels)))
        ax.bar([i - 0.2 for i in x], measured, 0.4, label="measured (token intervals)", color="tab:blue")
        ax.bar([i + 0.2 for i in x], predicted, 0.4, label="network model", color="tab:orange")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("decode tokens/s (greedy)")
        ax.set_title(model)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("dllama on an emulated LAN (one machine, shaped links, no added delay); one run: ratios",
                 fontsize=10)
    save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 and 2 nodes, fewer steps")
    p.add_argument("--models", nargs="+", default=["1b"], choices=["smollm2", "1b"])
    p.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"], help="link rates (tc syntax: 1gbit, 100mbit)")
    p.add_argument("--nodes", nargs="+", type=int, default=None, help="node counts (default 1 2 3 4)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--steps", type=int, default=None, help="dllama --steps (default 40; --quick 20)")
    p.add_argument("--prompt", default=PROMPT)
    add_node_options(p, "lan", "seconds one root run may take", "where the synthetic model goes")
    args = p.parse_args(argv)
    fill_defaults(args, {"nodes": [1, 2] if args.quick else [1, 2, 3, 4], "steps": 20 if args.quick else 40,
                         "output": str(RESULTS / ("lan_quick.json" if args.quick else "lan.json"))})
    for r in args.rates:
        try:
            rate_bits(r)
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dllama-lan-", dir=args.tmp_dir) as tmp:
        workdir = Path(tmp)
        rows: list[dict[str, Any]] = []
        for key in args.models:
            model = cluster_model(key, workdir, args.prompt)
            rows += measure(model, args, workdir)
    c0 = next((r["c0_ms"] / 1e3 for r in rows if r.get("c0_ms") is not None), None)
    pi5 = pi5_expectations(c0) if c0 is not None else None
    print_report(rows, pi5)
    write_results(Path(args.output), {"machine": machine_info(), "note": NOTE, "rows": rows, "pi5": pi5},
                  lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
