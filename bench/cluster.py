"""Cluster speed on one machine: the root plus 0..3 workers over loopback, and what one all-gather costs.

For each model (SmolLM2-135M Q40, the default model, and a random-weight model with Llama 3.2 1B's
shape, Q40) and each node count, the root runs `python -m dllama inference --stats-json FILE`
(greedy, a fixed prompt, one thread per node) with workers started as `python -m dllama worker
--nthreads 1 --cache-dir DIR` on free loopback ports. From the root's stats JSON: decode and prompt
tokens/s, sync ms per token, kB sent and received per token, the seconds spent sending weights,
the first token's wall clock. The same layout runs a second time with fresh workers on the slice
caches the first run filled: the warm-cache start (no weights sent).

A micro-benchmark times one all-gather of a [1, dim] float32 vector between 2 processes on
loopback, through dllama's MeshSync over Mesh (f32 and q80 on the wire), against a bare pyzmq
PUB/SUB exchange of the same bytes, the two interleaved: how much of the sync cost is ZeroMQ and
how much is ours. Then the send side alone, with warm caches and after streaming 32 MB, as a
decode's blocks do between syncs. The memory bandwidth on 1 and 2 threads, measured in the same
run, gives the ceiling for 2 nodes that share this machine's memory bus; the 1B shape's 2-node
run is held against the issue's loopback targets.

    python bench/cluster.py            # SmolLM2 and the synthetic 1B, 1-4 nodes (slow; quiet machine)
    python bench/cluster.py --quick    # SmolLM2 only, 1 and 2 nodes, few steps: a smoke test

Every node shares the machine's cores: the numbers say what the protocol and our Python cost, not
what separate machines would gain. Prints a table, writes bench/results/cluster.json and .png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# bench/common.py: puts the repository on sys.path first.
from common import (
    RESULTS,
    ROOT,
    BenchModel,
    WorkerProcess,
    add_node_options,
    cluster_model,
    fill_defaults,
    fmt,
    machine_info,
    measure_bandwidth,
    model_panels,
    node_env,
    print_table,
    print_table_head,
    print_tails,
    read_stats,
    report_targets,
    root_command,
    root_failure,
    save_figure,
    say,
    stats_file,
    stop_process,
    tail,
    write_results,
)

PROMPT = "Tell me about the sea."
NOTE = ("Every node runs on this one machine, sharing its cores and talking over loopback; one run on a "
        "shared, noisy machine: read the numbers as ratios, not as absolutes.")


# -- processes --------------------------------------------------------------------------------

class Lines:
    """A child's output stream read on a thread, each line with the perf_counter() it arrived
    (the all-gather micro-benchmark's processes tell their ports this way)."""

    def __init__(self, stream) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.perf_counter(), line.rstrip("\n")))
        stream.close()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, prefix: str, timeout: float, proc: subprocess.Popen) -> str:
        """The first line starting with ``prefix``; RuntimeError when it does not come in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if proc.poll() is not None and not self._thread.is_alive():
                raise RuntimeError(f"exited with {proc.returncode} before printing {prefix!r}")
            time.sleep(0.02)
        raise RuntimeError(f"no {prefix!r} line within {timeout:g} s")


def from_cache(transfer: dict) -> bool:
    """Whether a worker's weights came without the root sending any (a ``network.weights`` entry:
    its ``source``, "local" or "cache"; ``from_cache`` in older stats)."""
    if "from_cache" in transfer:
        return bool(transfer["from_cache"])
    return transfer.get("source") in ("local", "cache")


def run_root(model: BenchModel, steps: int, buffer: str, addresses: list[str], args) -> dict:
    """One `dllama inference --stats-json FILE` run; its numbers, or a failure with its stderr tail."""
    stats_path = stats_file(args.tmp_dir)
    cmd = root_command(model, steps, buffer, stats_path, addresses, args, *getattr(args, "root_extra", ()))
    try:
        spawned_unix = time.time()  # first token s: the root's first_token_unix minus this
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=node_env(), stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, encoding="utf-8", errors="replace", timeout=args.timeout, check=False)
            rc, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired as e:  # run() has killed and reaped it
            rc, stderr = None, e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else e.stderr
        wall = time.perf_counter() - t0
        if rc != 0:
            return {"failed": True, "error": root_failure(rc, args.timeout), "stderr_tail": tail(stderr or ""),
                    "wall_s": wall}
        try:
            stats = read_stats(stats_path)
        except RuntimeError as e:
            return {"failed": True, "error": str(e), "stderr_tail": tail(stderr), "wall_s": wall}
    finally:
        stats_path.unlink(missing_ok=True)
    try:
        return root_figures(stats, spawned_unix, wall)
    except (KeyError, TypeError, ValueError) as e:
        return {"failed": True, "error": f"unexpected --stats-json content: {type(e).__name__}: {e}",
                "stderr_tail": tail(stderr), "wall_s": wall}


def root_figures(stats: dict, spawned_unix: float, wall: float) -> dict:
    """The figures of one run from the root's ``--stats-json`` (see dllama/commands/run.py)."""
    totals, network = stats["totals"], stats["network"]
    decode = stats["tokens"]  # one per decode step: the prompt's interval is stats["prompt"], apart

    def mean(key: str, scale: float = 1.0) -> float | None:
        return statistics.fmean(t[key] for t in decode) * scale if decode else None

    first = totals["first_token_unix"]
    row: dict[str, Any] = {
        "failed": False,
        "wall_s": wall,
        "first_token_s": first - spawned_unix if first is not None else None,
        "prompt_tokens": totals["eval_tokens"],
        "prefill_tok_s": totals["eval_tok_s"],
        "decode_tokens": totals["pred_tokens"],
        "decode_tok_s": totals["pred_tok_s"],
        "finish_reason": stats["finish_reason"],
        "sync_ms_per_token": mean("sync_ms"),
        "compute_ms_per_token": mean("compute_ms"),
        "sent_kb_per_token": mean("sent_bytes", 1e-3),
        "recv_kb_per_token": mean("recv_bytes", 1e-3),
        "weights_sent_mb": 0.0,
        "weight_transfer_s": None,
        "weight_transfers": [],
        "cached_workers": 0,
        "network": None,
        "text": stats["text"],
    }
    if network is not None:
        sent = [w for w in network["weights"] if not from_cache(w)]
        row["weights_sent_mb"] = sum(w["bytes_sent"] for w in sent) / 1e6
        row["weight_transfer_s"] = sum(w["seconds"] for w in sent) if sent else None
        row["weight_transfers"] = [{"worker": w["address"], "node": w["node"], "mb": w["bytes_sent"] / 1e6,
                                    "s": w["seconds"]} for w in sent]
        row["cached_workers"] = sum(from_cache(w) for w in network["weights"])
        # The generation's traffic (the weights sent at the start are counted above, apart).
        row["network"] = {
            "nodes": network["nodes"], "forwards": network["forwards"],
            "sync_ms_per_forward": network["sync_seconds"] * 1000 / network["forwards"] if network["forwards"]
            else None,
            "sent_kb": network["sent_bytes"] / 1e3,
            "recv_kb": network["recv_bytes"] / 1e3,
        }
    return row


def run_layout(model: BenchModel, nodes: int, steps: int, buffer: str, cache_root: Path, args) -> dict:
    """One run with ``nodes - 1`` fresh workers on the slice cache folders under ``cache_root``."""
    workers: list[WorkerProcess] = []
    try:
        for i in range(1, nodes):
            cache = cache_root / f"node{i}"
            cache.mkdir(parents=True, exist_ok=True)
            log = cache_root / f"node{i}-{time.monotonic_ns()}.log"
            workers.append(WorkerProcess(log, ["--cache-dir", str(cache)]))
        deadline = time.monotonic() + args.worker_start_timeout
        for w in workers:
            w.wait_listening(deadline)
        result = run_root(model, steps, buffer, [w.address for w in workers], args)
    except RuntimeError as e:
        result = {"failed": True, "error": str(e).splitlines()[0], "stderr_tail": tail(str(e))}
    finally:
        for w in workers:
            w.close()
    if result["failed"]:
        for i, w in enumerate(workers, 1):
            if w.output():
                result.setdefault("worker_tails", {})[f"node {i}"] = tail(w.output(), 6)
    return result


def measure_model(model: BenchModel, args, workdir: Path, failures: list[str]) -> list[dict]:
    steps = args.steps_1b if model.key == "1b" else args.steps_smollm2
    rows = []
    for nodes in args.nodes:
        what = f"{model.label}, {nodes} node(s), {args.buffer} buffers"
        cache_root = workdir / f"cache-{model.key}-{nodes}"
        say(f"· {what}: {steps} steps" + (", workers with an empty slice cache" if nodes > 1 else ""))
        cold = run_layout(model, nodes, steps, args.buffer, cache_root, args)
        row: dict[str, Any] = {"model": model.label, "key": model.key, "nodes": nodes, "buffer": args.buffer,
                               "steps": steps, **cold}
        if cold["failed"]:
            failures.append(f"{what}: {cold['error']}")
            say(f"! {what}: {cold['error']}\n{cold.get('stderr_tail', '')}")
        elif nodes > 1:
            say(f"· {what}: again, fresh workers on the slice caches the first run filled")
            warm = run_layout(model, nodes, steps, args.buffer, cache_root, args)
            row["warm"] = warm
            if warm["failed"]:
                failures.append(f"{what}, warm cache: {warm['error']}")
                say(f"! {what}, warm cache: {warm['error']}\n{warm.get('stderr_tail', '')}")
            elif warm["weights_sent_mb"] or warm["cached_workers"] != nodes - 1:
                failures.append(f"{what}, warm cache: {warm['weights_sent_mb']:.1f} MB of weights sent, "
                                f"{warm['cached_workers']} of {nodes - 1} workers from their cache")
        shutil.rmtree(cache_root, ignore_errors=True)
        rows.append(row)
    base = next((r for r in rows if r["nodes"] == 1 and not r["failed"]), None)
    for r in rows:
        ok = base and base["decode_tok_s"] and not r["failed"] and r["decode_tok_s"]
        r["speedup"] = r["decode_tok_s"] / base["decode_tok_s"] if ok else None
    return rows


# -- the all-gather micro-benchmark ---------------------------------------------------------------

FLUSH_MB = 32  # streamed between sends for the cold-cache figures: more than this machine's L2 caches


def _handshake_bare(pub, sub, linger: float, timeout: float) -> None:
    """Publish hellos until the peer's arrive, and ``linger`` seconds more (so it sees ours)."""
    seen_at = None
    deadline = time.monotonic() + timeout
    while seen_at is None or time.monotonic() - seen_at < linger:
        pub.send(b"H")
        if sub.poll(20):
            while sub.poll(0):
                if sub.recv() == b"H" and seen_at is None:
                    seen_at = time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError("bare pyzmq handshake: no hello from the peer")


def _bare_exchange(pub, sub, nbytes: int, n: int, first: int) -> list[float]:
    """Each side publishes a frame of ``nbytes`` tagged with a counter and waits for the peer's:
    the message pattern of one all-gather between 2 nodes, without dllama."""
    buf = bytearray(nbytes)
    times = []
    for k in range(first, first + n):
        struct.pack_into("<I", buf, 0, k)
        t = time.perf_counter()
        pub.send(buf)
        while True:
            frame = sub.recv()
            if len(frame) >= 4:  # not a late hello
                got = struct.unpack_from("<I", frame)[0]
                if got == k:
                    break
                raise RuntimeError(f"bare exchange: frame {got} while {k} was due")
        times.append(time.perf_counter() - t)
    return times


def allgather_child(cfg: dict) -> dict:
    """One of the 2 processes: codec cost alone, then MeshSync all-reduces, then bare pyzmq."""
    import numpy as np
    import zmq

    from dllama.model.sync import ATTENTION
    from dllama.transport.links import PLAINTEXT
    from dllama.transport.mesh import Mesh
    from dllama.transport.protocol import DATA_HEADER
    from dllama.transport.sync import ForwardSync, MeshSync
    from dllama.transport.wire import WireCodec

    index, dim, iters, warmup = cfg["index"], cfg["dim"], cfg["iters"], cfg["warmup"]
    peer = 1 - index
    x = np.random.default_rng(index).standard_normal((1, dim)).astype(np.float32)
    codecs = {name: WireCodec(name == "q80", "numba") for name in cfg["codecs"]}

    # The codec's share of an all-reduce: encode ours in place, then sum 2 parts into a fresh total.
    codec_us = {}
    for name, codec in codecs.items():
        frames = np.zeros((2, DATA_HEADER.size + codec.nbytes(1, dim)), dtype=np.uint8)
        order = np.arange(2)
        times = []
        for _ in range(warmup + iters):
            t = time.perf_counter()
            codec.encode_into(x, frames[0, DATA_HEADER.size:])
            codec.sum_rows(frames, order, DATA_HEADER.size, 1, dim)
            times.append(time.perf_counter() - t)
        codec_us[name] = statistics.median(times[warmup:]) * 1e6

    ctx = zmq.Context()
    security, gate, keys = PLAINTEXT, None, None
    if cfg.get("keys"):  # CURVE: this node's pair, the peer's public key (cfg["keys"]: both pairs, Z85)
        from dllama.transport.links import CurveSecurity
        from dllama.transport.zap import DATA, Gatekeeper

        pairs = [(p.encode(), s.encode()) for p, s in cfg["keys"]]
        security = CurveSecurity(*pairs[index])
        gate = Gatekeeper(ctx, lambda line: print(line, file=sys.stderr))
        gate.allow(DATA, [pairs[peer][0]])
        keys = {peer: pairs[peer][0]}
    mesh = Mesh(ctx, index, cfg["net_timeout"], cfg["heartbeat"], bind_host="127.0.0.1", security=security)
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    bare_port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    print("PORTS " + json.dumps({"mesh": mesh.port, "bare": bare_port}), flush=True)
    ports = cfg.get("peer") or json.loads(sys.stdin.readline())
    mesh.connect({peer: f"tcp://127.0.0.1:{ports['mesh']}"}, keys)
    sub.connect(f"tcp://127.0.0.1:{ports['bare']}")

    seen_at: list[float] = []

    def is_done(seen: set[int]) -> bool:
        # Keep publishing a while after the peer's hello: it may not have seen ours yet.
        if peer in seen and not seen_at:
            seen_at.append(time.monotonic())
        return bool(seen_at) and time.monotonic() - seen_at[0] > cfg["linger"]

    mesh.handshake(is_done)
    _handshake_bare(pub, sub, cfg["linger"], cfg["net_timeout"])

    out: dict[str, Any] = {"index": index, "codec_us": codec_us, "dllama_us": {}, "bare_us": {},
                           "frame_bytes": {}, "dllama_us_p90": {}, "bare_us_p90": {}}
    fwd = 0
    counter = 0
    for name, codec in codecs.items():
        sync = MeshSync(mesh, codec, 2, dim)
        frame = DATA_HEADER.size + codec.nbytes(1, dim)
        times, bare = [], []
        for _ in range(warmup + iters):  # interleaved, so both see the same machine
            fwd += 1
            step = ForwardSync(sync, fwd, 1)  # a forward of 1 row: what publish_input/receive_input return
            t = time.perf_counter()
            step.all_reduce(x, 0, ATTENTION)
            times.append(time.perf_counter() - t)
            bare += _bare_exchange(pub, sub, frame, 1, counter)
            counter += 1
        for key, values in (("dllama", times[warmup:]), ("bare", bare[warmup:])):
            out[f"{key}_us"][name] = statistics.median(values) * 1e6
            out[f"{key}_us_p90"][name] = sorted(values)[int(0.9 * (len(values) - 1))] * 1e6
        out["frame_bytes"][name] = frame
        # The send side alone, with warm caches and after streaming more memory than the caches
        # hold (as every block's weights do in a decode): encode + publish, against a bare send.
        flush = np.ones(cfg["flush_mb"] << 18, dtype=np.float32)
        for cold in (False, True):
            publish, send = [], []
            for _ in range(cfg["send_iters"]):
                fwd += 1
                if cold:
                    flush.sum()
                t = time.perf_counter()
                size = codec.nbytes(1, dim)
                codec.encode_into(x, mesh.own_part(size))
                mesh.publish_part(fwd, 1, size)
                publish.append(time.perf_counter() - t)
                mesh.gather_parts(fwd, 1, size)
                if cold:
                    flush.sum()
                buf = struct.pack("<I", counter) + bytes(frame - 4)
                t = time.perf_counter()
                pub.send(buf)
                send.append(time.perf_counter() - t)
                while len(got := sub.recv()) < 4 or struct.unpack_from("<I", got)[0] != counter:
                    pass  # a late hello
                counter += 1
            key = "cold" if cold else "warm"
            out.setdefault(f"publish_{key}_us", {})[name] = statistics.median(publish) * 1e6
            out.setdefault(f"send_{key}_us", {})[name] = statistics.median(send) * 1e6
    time.sleep(cfg["linger"])  # our last frames are the peer's last parts: let them leave before closing
    mesh.close()
    pub.close(0)
    sub.close(0)
    if gate is not None:
        gate.close()
    ctx.term()
    return out


def run_allgather(args) -> dict:
    """Start the 2 processes (node 1 learns node 0's ports from its argv, node 0 node 1's on stdin)."""
    cfg = {"dim": args.dim, "iters": args.allgather_iters, "warmup": max(20, args.allgather_iters // 10),
           "codecs": ["f32", "q80"], "net_timeout": 30.0, "heartbeat": 30.0, "linger": 0.5,
           "send_iters": max(50, args.allgather_iters // 10), "flush_mb": FLUSH_MB}
    if getattr(args, "curve", False):  # the dllama side over CurveZMQ (the bare exchange stays plaintext)
        import zmq
        cfg["keys"] = [[k.decode() for k in zmq.curve_keypair()] for _ in range(2)]
    env = node_env()
    procs: list[subprocess.Popen] = []
    outs: list[Lines] = []
    errs: list[Lines] = []

    def start(index: int, peer: dict | None) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "allgather", "--config",
               json.dumps({**cfg, "index": index, "peer": peer})]
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
        procs.append(p)
        outs.append(Lines(p.stdout))
        errs.append(Lines(p.stderr))
        return json.loads(outs[-1].wait_for("PORTS ", args.worker_start_timeout, p)[len("PORTS "):])

    try:
        ports0 = start(0, None)
        ports1 = start(1, ports0)
        procs[0].stdin.write(json.dumps(ports1) + "\n")
        procs[0].stdin.flush()
        deadline = time.monotonic() + args.timeout
        for p in procs:
            p.wait(max(1.0, deadline - time.monotonic()))
        results = []
        for p, o, e in zip(procs, outs, errs):
            o.join()
            e.join()
            if p.returncode != 0:
                raise RuntimeError(f"node exited with {p.returncode}:\n{tail(e.text())}")
            results.append(json.loads(o.lines[-1][1]))
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError, OSError) as e:
        detail = "\n".join(tail(x.text(), 8) for x in errs if x.text())
        return {"failed": True, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                "stderr_tail": detail}
    finally:
        for p in procs:
            stop_process(p, grace=5.0)
    summary: dict[str, Any] = {"failed": False, "dim": args.dim, "iters": cfg["iters"], "warmup": cfg["warmup"],
                               "nodes": results, "codecs": {}}
    for name in cfg["codecs"]:
        def both(key: str, name: str = name) -> float:
            return statistics.fmean(r[key][name] for r in results)
        dllama, bare, codec = both("dllama_us"), both("bare_us"), both("codec_us")
        summary["codecs"][name] = {"frame_bytes": results[0]["frame_bytes"][name], "dllama_us": dllama,
                                   "bare_pyzmq_us": bare, "codec_us": codec,
                                   "mesh_python_us": dllama - bare - codec,
                                   "zmq_share": bare / dllama if dllama else None,
                                   **{k: both(k) for k in ("publish_warm_us", "publish_cold_us",
                                                           "send_warm_us", "send_cold_us")}}
    return summary


# -- report -------------------------------------------------------------------------------------

def _kb(row: dict) -> str:
    if row.get("sent_kb_per_token") is None:
        return "-"
    return f"{row['sent_kb_per_token']:.1f}+{row['recv_kb_per_token']:.1f}"


def _cells(r: dict) -> str:
    """The main table's cells of a run that did not fail."""
    warm = r.get("warm")
    if r["nodes"] == 1:
        warm_text = f"(no workers: {fmt(r['first_token_s'], '.2f')} / {r['wall_s']:.2f})"
    elif warm is None or warm["failed"]:
        warm_text = "FAILED" if warm else "-"
    else:
        sent = "no weights sent" if not warm["weights_sent_mb"] else f"{warm['weights_sent_mb']:.1f} MB SENT"
        warm_text = f"{fmt(warm['first_token_s'], '.2f')} / {warm['wall_s']:.2f} ({sent})"
    return (f"{fmt(r['decode_tok_s'], '.2f')} | {fmt(r['speedup'], '.2f')}x | "
            f"{fmt(r['prefill_tok_s'], '.1f')} | {fmt(r['sync_ms_per_token'], '.2f')} | {_kb(r)} | "
            f"{fmt(r['weight_transfer_s'], '.1f')} | {fmt(r['first_token_s'], '.2f')} | {warm_text} |")


def print_report(rows: list[dict], allgather: dict | None, failures: list[str]) -> None:
    print()
    print(NOTE)
    print()
    print_table("| model | nodes | decode tok/s | speedup vs 1 node | prefill tok/s | sync ms/token "
                "| kB/token sent+recv | weight transfer s | first token s (cold) "
                "| warm-cache start s (first token / total) |",
                rows, lambda r: f"| {r['model']} | {r['nodes']} |", _cells)
    print()
    print("From the root's --stats-json: decode/prefill tok/s: totals pred_tok_s/eval_tok_s; sync ms, kB: means "
          "over the decode steps (tokens, without the prompt's interval); weight transfer: network.weights' "
          "seconds, summed; first token: root process start to totals.first_token_unix; warm cache: fresh "
          "workers on the slice caches the first run filled.")
    if allgather:
        print()
        if allgather["failed"]:
            print(f"all-gather micro-benchmark FAILED: {allgather['error']}\n{allgather.get('stderr_tail', '')}")
        else:
            print(f"one all-gather of a [1, {allgather['dim']}] float32 vector between 2 processes on loopback "
                  f"(median of {allgather['iters']}, µs):")
            print()
            print_table_head("| wire | frame bytes | dllama MeshSync.all_reduce | bare pyzmq PUB/SUB exchange | codec "
                             "(encode + 2 adds) | the rest (mesh Python) | ZeroMQ share |")
            for name, c in allgather["codecs"].items():
                print(f"| {name} | {c['frame_bytes']} | {c['dllama_us']:.1f} | {c['bare_pyzmq_us']:.1f} | "
                      f"{c['codec_us']:.1f} | {c['mesh_python_us']:.1f} | {fmt(c['zmq_share'], '.0%')} |")
            print()
            print(f"the send side alone (median, µs), with warm caches and after streaming {FLUSH_MB} MB (what a "
                  "decode's blocks do between syncs):")
            print()
            print_table_head("| wire | dllama encode + publish, warm | cold | bare pyzmq send, warm | cold |")
            for name, c in allgather["codecs"].items():
                print(f"| {name} | {c['publish_warm_us']:.1f} | {c['publish_cold_us']:.1f} | "
                      f"{c['send_warm_us']:.1f} | {c['send_cold_us']:.1f} |")
    for r in rows:
        for run, label in ((r, ""), (r.get("warm") or {}, ", warm cache")):
            if run.get("failed"):
                print(f"\nFAILED {r['model']}, {r['nodes']} node(s){label}: {run['error']}")
                print_tails(run)
    for f in failures:
        print(f"FAILED {f}")
    print()


def report_loopback_targets(rows: list[dict], bandwidth: dict[int, float]) -> list[dict]:
    """The issue's loopback targets for the 1B shape: sync ms per token of 2 nodes, and their
    speed-up over one node against what the 2-thread/1-thread bandwidth ratio allows."""
    runs = {r["nodes"]: r for r in rows if r["key"] == "1b" and not r["failed"]}
    two = runs.get(2)
    ratio = bandwidth[2] / bandwidth[1] if 1 in bandwidth and 2 in bandwidth else None
    share = two["speedup"] / ratio if two and two.get("speedup") and ratio else None
    print(f"memory bandwidth: {', '.join(f'{t} thread(s) {bw:.1f} GB/s' for t, bw in sorted(bandwidth.items()))}"
          + (f"; ratio {ratio:.2f}" if ratio else ""))
    return report_targets([
        ("1B shape, 2 nodes on loopback: at most 3 ms of sync per token",
         two and two["sync_ms_per_token"], lambda v: v <= 3.0, "{:.2f} ms"),
        ("1B shape, 2 nodes on loopback: speed-up over 1 node at least 90 % of the bandwidth ratio",
         share, lambda v: v >= 0.9, "{:.0%}" + (f" ({two['speedup']:.2f}x of {ratio:.2f}x)" if share else "")),
    ])


def plot(rows: list[dict], path: Path) -> None:
    fig, panels = model_panels(rows, 6.0)
    for ax, model, mine in panels:
        x = [r["nodes"] for r in mine]
        tok = [r["decode_tok_s"] or 0 if not r["failed"] else 0 for r in mine]
        ax.bar(x, tok, 0.6, color="tab:blue", label="decode tok/s")
        for xi, r, v in zip(x, mine, tok):
            label = "failed" if r["failed"] else f"{v:.1f}\n({fmt(r['speedup'], '.2f')}x)"
            ax.annotate(label, (xi, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [str(n) for n in x])
        ax.set_xlabel("nodes (root + workers, 1 thread each, loopback)")
        ax.set_ylabel("decode tokens/s")
        ax.set_ylim(top=max(tok + [1]) * 1.25)
        ax.set_title(model)
        ax.grid(axis="y", alpha=0.3)
        sync = [(n, r["sync_ms_per_token"]) for n, r in zip(x, mine) if not r["failed"] and r["nodes"] > 1]
        if sync:
            ax2 = ax.twinx()
            ax2.plot([n for n, _ in sync], [s for _, s in sync], "o-", color="tab:red", label="sync ms/token")
            ax2.set_ylabel("sync ms/token", color="tab:red")
            ax2.set_ylim(0, max(s for _, s in sync) * 1.8)  # points below the legends
            ax2.legend(fontsize=8, loc="upper right")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("dllama on one machine, nodes over loopback; one run on a noisy machine: ratios", fontsize=10)
    save_figure(fig, path)


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: SmolLM2 only, 1 and 2 nodes, fewer steps")
    p.add_argument("--models", nargs="+", default=None, choices=["smollm2", "1b"],
                   help="smollm2, 1b (the synthetic Llama-1B-shaped Q40 model); default both")
    p.add_argument("--nodes", nargs="+", type=int, default=None, help="node counts (default 1 2 3 4)")
    p.add_argument("--buffer", choices=["q80", "f32"], default="q80", help="--buffer-float-type of every run")
    p.add_argument("--steps-smollm2", type=int, default=None,
                   help="dllama --steps (positions, prompt included) for SmolLM2 (default 64; --quick 24)")
    p.add_argument("--steps-1b", type=int, default=48, help="dllama --steps for the synthetic 1B (default 48)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--dim", type=int, default=2048, help="all-gather micro-benchmark: vector length")
    p.add_argument("--allgather-iters", type=int, default=None, help="timed all-gathers (default 3000; --quick 400)")
    p.add_argument("--no-allgather", action="store_true", help="skip the all-gather micro-benchmark")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="memory bandwidth measured on these threads")
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    p.add_argument("--bandwidth-repeats", type=int, default=5)
    p.add_argument("--worker-timeout", type=float, default=600.0, help="seconds for the bandwidth measurement")
    add_node_options(p, "cluster", "seconds one root run (or micro-benchmark) may take",
                     "where the synthetic model and slice caches go")
    p.add_argument("--child", choices=["allgather"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"models": ["smollm2"] if quick else ["smollm2", "1b"], "nodes": [1, 2] if quick else [1, 2, 3, 4],
                "steps_smollm2": 24 if quick else 64, "allgather_iters": 400 if quick else 3000,
                "output": str(RESULTS / ("cluster_quick.json" if quick else "cluster.json"))}
    fill_defaults(args, defaults)
    args.models = list(dict.fromkeys(args.models))
    args.nodes = sorted(set(args.nodes))
    if any(n < 1 for n in args.nodes):
        p.error("--nodes: counts must be at least 1")
    if args.dim % 32:
        p.error("--dim must be a multiple of 32 (Q80 blocks)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(allgather_child(json.loads(args.config))), flush=True)
        return
    say(NOTE)
    started = time.perf_counter()
    rows: list[dict] = []
    failures: list[str] = []
    allgather = None
    bandwidth = measure_bandwidth(args)  # the ceiling of 2 nodes sharing this machine's memory bus
    workdir = Path(tempfile.mkdtemp(prefix="dllama-cluster-bench-", dir=args.tmp_dir))
    try:
        for model in [cluster_model(key, workdir, args.prompt) for key in args.models]:
            rows += measure_model(model, args, workdir, failures)
            if model.path.is_relative_to(workdir):
                model.path.unlink()  # 1.75 GB: gone before the next model runs
        if not args.no_allgather:
            say(f"· all-gather micro-benchmark: 2 processes, [1, {args.dim}] float32, {args.allgather_iters} times")
            allgather = run_allgather(args)
            if allgather["failed"]:
                failures.append(f"all-gather micro-benchmark: {allgather['error']}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_report(rows, allgather, failures)
    targets = report_loopback_targets(rows, bandwidth)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "config", "output", "tmp_dir")}
    result = {"note": NOTE, "machine": machine_info(bandwidth), "settings": settings, "rows": rows,
              "allgather": allgather, "targets": targets, "failures": failures,
              "seconds": time.perf_counter() - started}
    write_results(Path(args.output), result, (lambda png: plot(rows, png)) if rows else None)


if __name__ == "__main__":
    main()
