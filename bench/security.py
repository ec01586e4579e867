"""What encrypted links cost: CurveZMQ against plaintext, in one run.

Two figures, each with and without CURVE, and a third run with strangers at the worker:
- one all-gather of a [1, 2048] row between 2 processes on loopback (bench/cluster.py's
  micro-benchmark: dllama's MeshSync over Mesh, interleaved with a bare pyzmq exchange, which
  stays plaintext and shows the machine's drift between the two runs);
- decode tokens/s and sync ms per token of 2 nodes (root + 1 worker, one thread each, loopback)
  on the synthetic Llama-1B-shaped Q40 model with q80 sync: `dllama worker --key DIR
  --authorized-keys FILE` and `dllama inference --key DIR --workers HOST:PORT@KEY` against the
  same commands without keys. Plaintext and CURVE runs alternate, `--repeats` times each;
- the CURVE run again while strangers hammer the worker's port (`--flood` attempts a second,
  half CURVE clients with unknown keys, half raw TCP connections sending garbage);
- `dllama api --api-key` on SmolLM2: one greedy chat answer's tokens/s and the server's RSS,
  alone and while strangers send it `--flood` requests a second (wrong keys, bodies over the
  4 MiB limit, garbage bytes), alternating `--repeats` times on one server.

    python bench/security.py            # 2 repeats of 128 steps each
    python bench/security.py --quick    # SmolLM2 instead of the 1B shape, 1 repeat

The issue's targets: CURVE decodes at most 10 % slower; strangers delay a session or an answer
by a few percent at most (here: 5 %). Prints a table and the target, writes
bench/results/security.json.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster import run_allgather, run_root
from common import (RESULTS, WorkerProcess, add_node_options, cluster_model, fill_defaults, fmt, machine_info,
                    print_table_head, report_targets, say, tail, write_results)

from dllama.transport.keys import keygen, public_key

PROMPT = "Tell me about the sea."


def keys(workdir: Path) -> dict[str, Any]:
    """A worker pair, a root pair and the worker's authorized-keys file naming the root."""
    out = {}
    for name in ("worker", "root"):
        public, _ = keygen(workdir / name)
        out[name] = (workdir / name, public_key(str(public)).decode())
    authorized = workdir / "authorized"
    authorized.write_text(out["root"][1] + "\n")
    return {**out, "authorized": authorized}


class Flood:
    """Strangers at a worker's port while it serves: CURVE clients with keys it does not know
    (each connects, is refused at the handshake and closes) and raw TCP connections sending
    garbage, ``rate`` attempts a second in all, from a thread of this process."""

    def __init__(self, port: int, worker_key: bytes, rate: float):
        import threading
        self.port, self.worker_key, self.rate = port, worker_key, rate
        self.attempts = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import os
        import socket

        import zmq
        ctx = zmq.Context()
        while not self.stop.wait(1 / self.rate):
            self.attempts += 1
            if self.attempts % 2:
                d = ctx.socket(zmq.DEALER)
                d.linger = 0
                d.curve_publickey, d.curve_secretkey = zmq.curve_keypair()
                d.curve_serverkey = self.worker_key
                d.connect(f"tcp://127.0.0.1:{self.port}")
                time.sleep(0.005)
                d.close()
            else:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                        s.sendall(os.urandom(512))
                except OSError:
                    pass
        ctx.term()

    def close(self) -> int:
        self.stop.set()
        self.thread.join(10)
        return self.attempts


def decode_run(model, steps: int, curve: bool, k: dict, args, workdir: Path, flood: float = 0.0) -> dict:
    worker_options = ["--key", str(k["worker"][0]), "--authorized-keys", str(k["authorized"])] if curve else []
    worker = WorkerProcess(workdir / f"worker-{time.monotonic_ns()}.log", worker_options)
    strangers = None
    try:
        worker.wait_listening(time.monotonic() + args.worker_start_timeout)
        address = f"{worker.address}@{k['worker'][1]}" if curve else worker.address
        args.root_extra = ["--key", str(k["root"][0])] if curve else []
        if flood:
            strangers = Flood(worker.port, k["worker"][1].encode(), flood)
        result = run_root(model, steps, "q80", [address], args)
    except RuntimeError as e:
        result = {"failed": True, "error": str(e).splitlines()[0], "stderr_tail": tail(str(e))}
    finally:
        if strangers is not None:
            result["flood_attempts"] = strangers.close()
        result["worker_rss_mb"] = worker_rss(worker.proc.pid)  # after the session: flood runs against the others
        worker.close()
    return result


def worker_rss(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def api_runs(workdir: Path, args) -> list[dict]:
    """`dllama api --api-key` on SmolLM2 (one thread): one greedy chat answer's tokens/s, alone and
    while strangers (``args.flood`` a second: wrong keys, garbage bytes, oversized bodies) hammer
    the server, alternating ``args.repeats`` times on one server (a fresh process per answer
    varied by more than the effect), and the server's RSS after each answer."""
    import socket
    import subprocess
    import sys
    import threading

    import httpx

    from common import ROOT, free_port, node_env, smollm2

    model, port = smollm2(), free_port()
    log = workdir / f"api-{time.monotonic_ns()}.log"
    with open(log, "w") as err:
        # --isolate: the server on CPU 0, the strangers' thread on CPU 1 (as if they were another machine)
        pin = ["taskset", "-c", "0"] if args.isolate else []
        proc = subprocess.Popen([*pin, sys.executable, "-m", "dllama", "api", "--model", str(model.path), "--tokenizer",
                                 str(model.tokenizer), "--port", str(port), "--nthreads", "1", "--api-key", "secret",
                                 "--max-seq-len", "512", "--parallel", "1"], cwd=ROOT, env=node_env(), stderr=err,
                                stdout=subprocess.DEVNULL)

    def strangers(stop: threading.Event, attempts: list[int]) -> None:
        if args.isolate:
            import os
            os.sched_setaffinity(0, {1})  # this thread only
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            while not stop.wait(1 / args.flood):
                attempts[0] += 1
                try:
                    kind = attempts[0] % 3
                    if kind == 0:
                        c.post("/v1/chat/completions", headers={"Authorization": "Bearer wrong"}, json={})
                    elif kind == 1:
                        c.post("/v1/completions", content=b"x" * (5 << 20))  # over the 4 MiB limit
                    else:
                        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                            raw.sendall(b"\x16\x03\x01garbage" * 64)
                except (httpx.HTTPError, OSError):
                    pass

    def failed(error: str) -> list[dict]:
        return [{"failed": True, "error": error, "stderr_tail": tail(log.read_text())}]
    rows = []
    try:
        deadline = time.monotonic() + args.worker_start_timeout
        while "OpenAI-compatible API on" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                return failed("the API server did not start")
            time.sleep(0.1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer secret"},
                          timeout=300) as c:
            # A chat answer: a bare completion of the prompt may end at once (greedy, an end token).
            body = {"messages": [{"role": "user", "content": args.prompt}], "max_tokens": args.api_tokens,
                    "temperature": 0, "stream": False}
            c.post("/v1/chat/completions", json=body)  # compile, warm up
            rss_start = worker_rss(proc.pid)
            for repeat in range(args.repeats):
                for flood in (0.0, args.flood):
                    say(f"· the API (SmolLM2, --api-key), {f'{flood:g} strangers/s' if flood else 'alone'} "
                        f"(run {repeat + 1})")
                    stop, attempts = threading.Event(), [0]
                    thread = threading.Thread(target=strangers, args=(stop, attempts), daemon=True)
                    if flood:
                        thread.start()
                    t0 = time.perf_counter()
                    reply = c.post("/v1/chat/completions", json=body).json()
                    seconds = time.perf_counter() - t0
                    stop.set()
                    if flood:
                        thread.join(15)
                    tokens = reply["usage"]["completion_tokens"]
                    if tokens < args.api_tokens // 2:  # too short to time
                        return failed(f"the answer ended after {tokens} tokens")
                    rows.append({"failed": False, "repeat": repeat, "flood": flood, "tokens": tokens,
                                 "tok_s": tokens / seconds, "attempts": attempts[0], "rss_before_mb": rss_start,
                                 "rss_after_mb": worker_rss(proc.pid)})
        return rows
    except (httpx.HTTPError, KeyError, ValueError) as e:
        return rows + failed(f"{type(e).__name__}: {e}")
    finally:
        proc.kill()
        proc.wait(10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="SmolLM2, 1 repeat, fewer all-gathers")
    p.add_argument("--steps", type=int, default=None, help="dllama --steps per decode run (default 128; --quick 48)")
    p.add_argument("--repeats", type=int, default=None, help="decode runs per mode (default 2; --quick 1)")
    p.add_argument("--allgather-iters", type=int, default=None, help="timed all-gathers (default 3000; --quick 400)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--api-tokens", type=int, default=200, help="tokens of the API's timed answer (default 200)")
    p.add_argument("--api-only", action="store_true", help="only the API runs (no keys, no cluster)")
    p.add_argument("--isolate", action="store_true",
                   help="API runs: the server on CPU 0, the strangers on CPU 1 (a 2-core stand-in for another machine)")
    p.add_argument("--flood", type=float, default=50.0,
                   help="connection attempts a second by strangers in the flood runs (default 50)")
    p.add_argument("--prompt", default=PROMPT)
    add_node_options(p, "security", "seconds one root run may take", "where the model and keys go")
    args = p.parse_args(argv)
    fill_defaults(args, {"steps": 48 if args.quick else 128, "repeats": 1 if args.quick else 2,
                         "allgather_iters": 400 if args.quick else 3000,
                         "output": str(RESULTS / ("security_quick.json" if args.quick else "security.json"))})
    workdir = Path(tempfile.mkdtemp(prefix="dllama-security-bench-", dir=args.tmp_dir))
    started = time.perf_counter()
    rows: list[dict] = []
    api_rows: list[dict] = []
    allgather: dict[str, Any] = {}
    try:
        k = keys(workdir)
        model = cluster_model("smollm2" if args.quick or args.api_only else "1b", workdir, args.prompt)
        for curve in () if args.api_only else (False, True):
            say(f"· all-gather micro-benchmark, {'CURVE' if curve else 'plaintext'}")
            args.curve = curve
            allgather["curve" if curve else "plaintext"] = run_allgather(args)
        for repeat in range(0 if args.api_only else args.repeats):
            for curve, flood in ((False, 0.0), (True, 0.0), (True, args.flood)):
                label = ("CURVE" if curve else "plaintext") + (f", {flood:g} strangers/s" if flood else "")
                say(f"· {model.label}, 2 nodes, q80, {label} (run {repeat + 1})")
                rows.append({"curve": curve, "flood": flood, "repeat": repeat,
                             **decode_run(model, args.steps, curve, k, args, workdir, flood)})
        api_rows = api_runs(workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table_head("| links | all-gather q80 µs | all-gather f32 µs | bare pyzmq q80 µs (plaintext, drift) | "
                     "decode tok/s (each run) | sync ms/token | worker RSS after, MB |")
    medians = {}
    for curve, flood in ((False, 0.0), (True, 0.0), (True, args.flood)):
        name = ("curve" if curve else "plaintext") + ("+flood" if flood else "")
        ag = {} if flood else allgather.get(name, {})
        codecs = {} if ag.get("failed", True) else ag["codecs"]
        runs = [r for r in rows if r["curve"] == curve and r["flood"] == flood and not r["failed"]]
        tok = [r["decode_tok_s"] for r in runs]
        medians[name] = statistics.median(tok) if tok else None
        sync = statistics.median(r["sync_ms_per_token"] for r in runs) if runs else None
        label = ("CURVE" if curve else "plaintext") + (f", {flood:g} strangers/s at the worker" if flood else "")
        print(f"| {label} | {fmt(codecs.get('q80', {}).get('dllama_us'), '.1f')} | "
              f"{fmt(codecs.get('f32', {}).get('dllama_us'), '.1f')} | "
              f"{fmt(codecs.get('q80', {}).get('bare_pyzmq_us'), '.1f')} | "
              f"{', '.join(f'{t:.2f}' for t in tok) or 'FAILED'} | {fmt(sync, '.2f')} | "
              f"{', '.join(fmt(r.get('worker_rss_mb'), '.0f') for r in runs)} |")
    for r in rows:
        if r["failed"]:
            print(f"FAILED {'CURVE' if r['curve'] else 'plaintext'} run {r['repeat'] + 1}: {r['error']}\n"
                  f"{r.get('stderr_tail', '')}")
    print()
    print_table_head("| the API | answer tokens/s (each run) | requests by strangers | RSS at the start → after, MB |")
    for flood in (0.0, args.flood):
        runs = [r for r in api_rows if r.get("flood") == flood and not r["failed"]]
        medians["api" + ("+flood" if flood else "")] = statistics.median(r["tok_s"] for r in runs) if runs else None
        speeds = ", ".join(format(r["tok_s"], ".1f") for r in runs) or "FAILED"
        attempts = ", ".join(str(r["attempts"]) for r in runs)
        rss = ", ".join(f"{fmt(r['rss_before_mb'], '.0f')} → {fmt(r['rss_after_mb'], '.0f')}" for r in runs)
        label = f"{flood:g} strangers/s" if flood else "alone"
        print(f"| {label} | {speeds} | {attempts} | {rss} |")
    for r in api_rows:
        if r["failed"]:
            print(f"FAILED the API runs: {r['error']}\n{r.get('stderr_tail', '')}")

    def slower(a: str, b: str) -> float | None:
        return (1 - medians[a] / medians[b]) if medians[a] and medians[b] else None
    # The API's answers alternate on one server: each flood answer against the alone one just
    # before it (this machine's speed drifts by 20 % within minutes, more than the effect).
    paired = [1 - f["tok_s"] / a["tok_s"] for a, f in zip(api_rows[::2], api_rows[1::2])
              if not a["failed"] and not f["failed"]]
    api_slower = statistics.median(paired) if paired else None
    if paired:
        print(f"the API, each answer with strangers against the one alone before it: "
              f"{', '.join(format(p, '.1%') for p in paired)} slower")
    print()
    targets = report_targets([
        ("2 nodes decode with CURVE at most 10 % slower than plaintext", slower("curve", "plaintext"),
         lambda v: v <= 0.10, "{:.1%} slower (medians)"),
        (f"strangers at the worker ({args.flood:g}/s, refused) slow a CURVE session by at most 5 %",
         slower("curve+flood", "curve"), lambda v: v <= 0.05, "{:.1%} slower (medians)"),
        (f"strangers at the API ({args.flood:g}/s: wrong keys, oversized bodies, garbage) slow an answer by at "
         f"most 5 %", api_slower, lambda v: v <= 0.05, "{:.1%} slower (median of the pairs)")])
    write_results(Path(args.output), {"machine": machine_info(), "settings": {k: v for k, v in vars(args).items()
                                                                              if k not in ("output", "tmp_dir")},
                                      "allgather": allgather, "rows": rows, "api": api_rows, "targets": targets,
                                      "seconds": time.perf_counter() - started}, None)


if __name__ == "__main__":
    main()
