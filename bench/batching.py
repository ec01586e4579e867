"""Many users at once: aggregate and per-stream decode speed with 1, 2, 4 and 8 concurrent
streaming clients (the real ``openai`` client) against ``python -m dllama api`` (continuous
batching, ``--parallel 8``), plus the time to first token of a request that arrives while 3
others stream.

For SmolLM2-135M and the synthetic Llama-1B-shaped Q40 model, on one node (2 threads) and on
2 nodes (root and one worker, 1 thread each), q80 buffers. Each client streams a completion of
``--tokens`` tokens. SmolLM2 samples at temperature 0.8 and top-p 0.95 (an early end is rare
and counted as it is). The synthetic model is greedy: its random weights give nearly flat
logits, whose nucleus holds most of the 128256 tokens, and sorting it costs 15 ms a token (a
trained model's nucleus is a few hundred tokens: about 1 ms); its tokenizer has no end token.

    python bench/batching.py                  # everything (writes the 1.75 GB synthetic model)
    python bench/batching.py --models smollm2 --nodes 1 --quick

Aggregate decode tokens/s: the tokens that arrived while all the clients were decoding (from
the last stream's first token to the first stream's end), over that time. Overall tokens/s:
all completion tokens after each stream's first, from the first stream's first token to the
last stream's end, so it includes the steps that also evaluated the other clients' prompts.
Per-stream tokens/s: a stream's tokens after its first over its own time. Prints the table
and the target, writes bench/results/batching.json. One run on a noisy machine: read the
numbers as ratios.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (NOTE, RESULTS, ROOT, WorkerProcess, cluster_model, fill_defaults, fmt, free_port, machine_info,
                    measure_bandwidth, node_env, report_targets, say, stop_process, tail, weight_bytes_per_token,
                    write_results)

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
TEMPERATURE = {"smollm2": 0.8, "1b": 0.0}  # see above
CLIENTS = (1, 2, 4, 8)


class Server:
    """``python -m dllama api`` on a free port (and its workers), its log in a file."""

    def __init__(self, model, nodes: int, args, workdir: Path):
        self.temperature = TEMPERATURE[model.key]
        self.port = free_port()
        self.workers = [WorkerProcess(workdir / f"worker-{i}.log", []) for i in range(nodes - 1)]
        deadline = time.monotonic() + args.start_timeout
        for w in self.workers:
            w.wait_listening(deadline)
        threads = "2" if nodes == 1 else "1"
        cmd = [sys.executable, "-m", "dllama", "api", "--model", str(model.path), "--tokenizer", str(model.tokenizer),
               "--port", str(self.port), "--parallel", str(max(CLIENTS)), "--max-seq-len", str(args.max_seq_len),
               "--buffer-float-type", "q80", "--nthreads", threads, "--net-timeout", "60"]
        if self.workers:
            cmd += ["--workers", *[w.address for w in self.workers]]
        self.log_path = workdir / "api.log"
        env = dict(node_env(), NUMBA_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
        with open(self.log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        import httpx
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"api exited with {self.proc.returncode}:\n{tail(self.log_path.read_text())}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"api not healthy in time:\n{tail(self.log_path.read_text())}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def client(self):
        import openai
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                             timeout=600)

    def close(self) -> None:
        stop_process(self.proc)
        for w in self.workers:
            w.close()


def stream(server: Server, tokens: int, seed: int, out: dict, started: threading.Event | None = None) -> None:
    """One streaming completion: when it was sent, each chunk's arrival, the tokens."""
    client = server.client()
    out["sent"] = time.perf_counter()
    times = []
    usage = None
    response = client.completions.create(model="m", prompt=PROMPT, max_tokens=tokens, temperature=server.temperature,
                                         top_p=0.95, seed=seed, stream=True, stream_options={"include_usage": True})
    for chunk in response:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
            if started is not None:
                started.set()
    out["times"] = times
    out["tokens"] = usage.completion_tokens if usage is not None else len(times)


def concurrent(server: Server, n: int, tokens: int) -> dict:
    results = [{} for _ in range(n)]
    threads = [threading.Thread(target=stream, args=(server, tokens, 100 + i, results[i])) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    firsts = [r["times"][0] for r in results]
    ends = [r["times"][-1] for r in results]
    after_first = [r["tokens"] - 1 for r in results]
    per_stream = [k / (r["times"][-1] - r["times"][0]) for k, r in zip(after_first, results) if k > 0]
    # Decode with all n streaming: from the last stream's first token to the first end (of the
    # streams that ran their whole length), every token that arrived in between.
    start = max(firsts)
    end = min([e for e, r in zip(ends, results) if r["tokens"] >= tokens] or ends)
    in_window = sum(start < t <= end for r in results for t in r["times"])
    return {"clients": n, "aggregate_tok_s": in_window / (end - start) if end > start else float("nan"),
            "overall_tok_s": sum(after_first) / (max(ends) - min(firsts)),
            "per_stream_tok_s": statistics.median(per_stream), "tokens": sum(r["tokens"] for r in results),
            "ttft_s": statistics.median(f - r["sent"] for f, r in zip(firsts, results))}


def arriving_while_streaming(server: Server, tokens: int) -> dict:
    """The time to first token of a request sent while 3 others stream, and alone."""
    alone = {}
    stream(server, 8, 1, alone)
    started = [threading.Event() for _ in range(3)]
    runs = [{} for _ in range(3)]
    threads = [threading.Thread(target=stream, args=(server, tokens, 200 + i, runs[i], started[i]))
               for i in range(3)]
    for t in threads:
        t.start()
    for s in started:
        s.wait(600)
    time.sleep(0.5)  # well into their decoding
    late = {}
    stream(server, 8, 2, late)
    for t in threads:
        t.join()
    return {"ttft_alone_s": alone["times"][0] - alone["sent"], "ttft_beside_3_s": late["times"][0] - late["sent"]}


def run_config(model, nodes: int, args, workdir: Path) -> list[dict]:
    say(f"· {model.label}, {nodes} node{'s' if nodes > 1 else ''}")
    server = Server(model, nodes, args, workdir)
    try:
        stream(server, 16, 0, {})  # warm: the first request's costs are not the batch's
        rows = []
        for n in args.clients:
            row = concurrent(server, n, args.tokens)
            row.update(model=model.key, label=model.label, nodes=nodes)
            say(f"  {n} clients: aggregate {row['aggregate_tok_s']:.1f} tok/s, per stream "
                f"{row['per_stream_tok_s']:.1f}, ttft {row['ttft_s'] * 1e3:.0f} ms")
            rows.append(row)
        late = arriving_while_streaming(server, args.tokens)
        say(f"  ttft alone {late['ttft_alone_s'] * 1e3:.0f} ms, beside 3 streams {late['ttft_beside_3_s'] * 1e3:.0f} ms")
        for row in rows:
            row.update(late)
        return rows
    except Exception:
        say(tail(server.log_path.read_text(errors="replace"), 30))
        raise
    finally:
        server.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2", "1b"], choices=["smollm2", "1b"])
    p.add_argument("--nodes", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    p.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS))
    p.add_argument("--tokens", type=int, default=None, help="tokens per stream (default 96, --quick 32)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="bandwidth measured on these threads")
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    p.add_argument("--bandwidth-repeats", type=int, default=5)
    p.add_argument("--worker-timeout", type=float, default=600.0)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    fill_defaults(args, {"tokens": 32 if args.quick else 96})
    bandwidth = measure_bandwidth(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dllama-batching-") as tmp:
        workdir = Path(tmp)
        for key in args.models:
            model = cluster_model(key, workdir, PROMPT)
            for nodes in args.nodes:
                rows += run_config(model, nodes, args, workdir)
            if key == "1b":
                weight_bytes = weight_bytes_per_token(model.path)
                for row in rows:
                    if row["model"] == "1b":
                        row["weight_bytes_per_token"] = weight_bytes
    print(f"\n{'model':<28} {'nodes':>5} {'clients':>7} {'aggregate tok/s':>16} {'x 1 client':>10} "
          f"{'overall tok/s':>13} {'per stream':>10} {'ttft ms':>8}")
    for row in rows:
        one = next(r for r in rows if (r["model"], r["nodes"], r["clients"]) == (row["model"], row["nodes"], 1))
        row["vs_one_client"] = row["aggregate_tok_s"] / one["aggregate_tok_s"]
        print(f"{row['label']:<28} {row['nodes']:>5} {row['clients']:>7} {row['aggregate_tok_s']:>16.1f} "
              f"{row['vs_one_client']:>10.2f} {row['overall_tok_s']:>13.1f} {row['per_stream_tok_s']:>10.1f} {row['ttft_s'] * 1e3:>8.0f}")
    for key, nodes in dict.fromkeys((r["model"], r["nodes"]) for r in rows):
        r = next(r for r in rows if (r["model"], r["nodes"]) == (key, nodes))
        print(f"{r['label']}, {nodes} node(s): time to first token alone {r['ttft_alone_s'] * 1e3:.0f} ms, "
              f"arriving beside 3 streams {r['ttft_beside_3_s'] * 1e3:.0f} ms")
    four = next((r for r in rows if (r["model"], r["nodes"], r["clients"]) == ("1b", 1, 4)), None)
    targets = report_targets([("1B shape, 1 node, 4 clients: aggregate >= 3x one client",
                               four and four["vs_one_client"], lambda v: v >= 3.0, "{:.2f}x")])
    print(f"bandwidth (GB/s by threads): {fmt(bandwidth.get(1), '.1f')} / {fmt(bandwidth.get(2), '.1f')}. {NOTE}")
    out = Path(args.output) if args.output else RESULTS / ("batching_quick.json" if args.quick else "batching.json")
    write_results(out, {"machine": machine_info(bandwidth), "rows": rows, "targets": targets, "note": NOTE}, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
