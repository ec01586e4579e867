"""Recovery from a lost worker: the time from a fault to the next generated token, on loopback.

Three nodes to two: the root and 2 workers (one thread each, greedy, a fixed prompt), then one
worker is killed (SIGKILL) or frozen (SIGSTOP; SIGCONT once the root is done) while the root
generates. The root notices, plans the slices again over the 2 nodes left, loads them (the
survivor cuts its new slice from its model file, or assembles it from its slice cache and
receives only what is missing), replays the KV cache and goes on. For each model (SmolLM2-135M
Q40, and a random-weight model with Llama 3.2 1B's shape, Q40) and each worker set-up:

- ``local``: workers started with ``--model FILE`` (a local copy of the model file);
- ``cache``: workers with ``--cache-dir DIR`` only, the caches filled by one fault-free run
  before (so the first plan comes from the cache), a fresh copy of them for every fault;

and each fault (``kill``, ``freeze``), the root runs `python -m dllama inference --verbose
--stats-json FILE`; the fault is sent once ``--fault-after`` tokens are out (counted from the
``--verbose`` lines on the root's stderr), its wall clock taken as the signal goes. From the
stats JSON (its ``network.changes`` records, see ``Recovery`` in dllama/engine/cluster.py):
detection (the fault to the root's notice, plus telling who is lost), re-planning, loading,
replay, and the total: the fault to the first token after the recovery. Also tokens/s before
and after, what was sent to the surviving worker, and whether the text equals a fault-free
3-node run's (one per model, also what fills the slice caches).

    python bench/recovery.py            # both models, both set-ups, both faults (slow; quiet machine)
    python bench/recovery.py --quick    # SmolLM2, local model files, kill: a smoke test
    python bench/recovery.py --models 1b --setups cache --faults freeze

Every node shares the machine's cores: one run on a shared machine, read the numbers as ratios
and orders of magnitude. Prints a table, writes bench/results/recovery.json and .png.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# bench/common.py: puts the repository on sys.path first.
from common import (RESULTS, BenchModel, WorkerProcess, add_node_options, cluster_model, fill_defaults, fmt,
                    machine_info, model_panels, print_table, print_tails, read_stats, root_command, root_failure,
                    save_figure, say, stats_file, stop_process, tail, write_results)
from common import spawn as spawn_node

PROMPT = "Tell me about the sea."
NOTE = ("Every node runs on this one machine, sharing its cores and talking over loopback; one run on a "
        "shared, noisy machine: read the numbers as ratios and orders of magnitude, not as absolutes.")
# The issue's targets, with local model files on the workers: a killed worker costs at most this
# much (fault to next token), a frozen one at most FREEZE_EXTRA_S more (it is found by heartbeats).
KILL_TARGET_S = {"smollm2": 2.0, "1b": 5.0}
FREEZE_EXTRA_S = 3.0
SETUPS = ("local", "cache")
FAULTS = ("kill", "freeze")
TOKEN_LINE = "🔶"  # how the root's --verbose line of each token starts (dllama/commands/run.py)
WEIGHTS_LINE = re.compile(r"💡 weights: ([\d.]+) MB \(([^,)]+)(?:, ([\d.]+) MB received)?\)")


def target_s(model_key: str, fault: str) -> float:
    return KILL_TARGET_S[model_key] + (FREEZE_EXTRA_S if fault == "freeze" else 0.0)


# -- processes --------------------------------------------------------------------------------

# Every child this bench started and has not reaped, and those it froze (SIGCONT before the end).
_CHILDREN: list[subprocess.Popen] = []
_FROZEN: set[int] = set()


def spawn(cmd: list[str], **kwargs) -> subprocess.Popen:
    """spawn_node, the child remembered (stop_all ends it if the bench does not)."""
    proc = spawn_node(cmd, **kwargs)
    _CHILDREN.append(proc)
    return proc


def thaw(proc: subprocess.Popen) -> None:
    """SIGCONT a child we froze (a stopped process acts on no signal but SIGKILL)."""
    if proc.pid in _FROZEN:
        _FROZEN.discard(proc.pid)
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """stop_process (SIGINT, then SIGKILL; always reaped) of a child we started, thawed first if
    frozen, then forgotten."""
    thaw(proc)
    stop_process(proc, grace)
    if proc.returncode is not None and proc in _CHILDREN:
        _CHILDREN.remove(proc)


def stop_all() -> None:
    """Whatever is still running (an error or Ctrl-C on the way): frozen ones thawed first."""
    for proc in _CHILDREN:
        thaw(proc)
    for proc in _CHILDREN[:]:  # stop() takes each off the list
        stop(proc, grace=5.0)


class Worker(WorkerProcess):
    """A worker on a local model file or a slice cache, which can be killed or frozen."""

    def __init__(self, log_path: Path, model: Path | None, cache_dir: Path | None, args) -> None:
        options = []
        if model is not None:
            options += ["--model", str(model)]
        if cache_dir is not None:
            options += ["--cache-dir", str(cache_dir)]
        if args.heartbeat_timeout is not None:
            options += ["--heartbeat-timeout", str(args.heartbeat_timeout)]
        super().__init__(log_path, options, spawn)

    def weight_lines(self) -> list[dict]:
        """Each session's "💡 weights: ..." line: MB, source, MB received."""
        return [{"mb": float(m[1]), "source": m[2], "received_mb": float(m[3]) if m[3] else 0.0}
                for m in WEIGHTS_LINE.finditer(self.output())]

    def fault(self, kind: str) -> float:
        """SIGKILL or SIGSTOP it; the wall clock as the signal goes."""
        sig = signal.SIGKILL if kind == "kill" else signal.SIGSTOP
        if kind == "freeze":
            _FROZEN.add(self.proc.pid)
        at = time.time()
        os.kill(self.proc.pid, sig)
        return at

    def close(self) -> None:
        stop(self.proc)


class Root:
    """`python -m dllama inference --verbose --stats-json FILE`, its stdout (the text) and stderr
    (one line per token) read on threads."""

    def __init__(self, model: BenchModel, steps: int, addresses: list[str], stats_path: Path, args) -> None:
        extra = ["--verbose"]
        if args.heartbeat_timeout is not None:
            extra += ["--heartbeat-timeout", str(args.heartbeat_timeout)]
        cmd = root_command(model, steps, args.buffer, stats_path, addresses, args, *extra)
        self.prompt = args.prompt
        self.stdout = bytearray()
        self.stderr: list[str] = []
        self.tokens = 0
        self.enough = threading.Event()  # set at ``want`` tokens, or when the root's stderr ends
        self.want = 0
        self.spawned_unix = time.time()
        self.proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self.stdout += chunk

    def _read_err(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stderr.append(line)
            if line.startswith(TOKEN_LINE):
                self.tokens += 1
                if self.want and self.tokens >= self.want:
                    self.enough.set()
        self.enough.set()

    def wait_tokens(self, n: int, timeout: float) -> bool:
        """Whether ``n`` tokens are out (False: the root ended first, or ``timeout`` passed)."""
        self.want = n
        if self.tokens >= n:
            return True
        self.enough.wait(timeout)
        return self.tokens >= n

    def generated_chars(self) -> int:
        """Characters of generated text on stdout so far (after the echoed prompt)."""
        return max(0, len(bytes(self.stdout).decode("utf-8", "replace")) - len(self.prompt))

    def finish(self, timeout: float) -> int | None:
        """Its exit status (None: it ran past ``timeout`` and was stopped), its streams read to the end."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        if rc is None:
            stop(self.proc, grace=5.0)
        for t in self._threads:
            t.join(5.0)
        if self.proc.returncode is not None and self.proc in _CHILDREN:
            _CHILDREN.remove(self.proc)
        return rc

    def err_text(self) -> str:
        return "\n".join(line for line in self.stderr if not line.startswith(TOKEN_LINE))


# -- one run -------------------------------------------------------------------------------------

def rate(times: list[float]) -> float | None:
    """Tokens/s over consecutive ready times: intervals over their span."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None


def first_difference(a: str, b: str) -> int | None:
    """The first index where the texts differ (None: equal)."""
    if a == b:
        return None
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def run_case(model: BenchModel, steps: int, setup: str, fault: str | None, cache_dirs: list[Path] | None,
             logs: Path, args) -> dict:
    """One root run with 2 fresh workers, ``fault`` (None: none) sent to one of them mid-generation.
    ``setup`` "local": workers on the model file; "cache": on ``cache_dirs``."""
    stats_path = stats_file(args.tmp_dir)
    tag = f"{model.key}-{setup}-{fault or 'none'}-{time.monotonic_ns()}"
    workers: list[Worker] = []
    root: Root | None = None
    row: dict[str, Any] = {"failed": False}
    try:
        for i in (1, 2):
            workers.append(Worker(logs / f"{tag}-node{i}.log", model.path if setup == "local" else None,
                                  cache_dirs[i - 1] if setup == "cache" else None, args))
        deadline = time.monotonic() + args.worker_start_timeout
        for w in workers:
            w.wait_listening(deadline)
        root = Root(model, steps, [w.address for w in workers], stats_path, args)
        started = time.monotonic()
        fault_unix = fault_chars = None
        if fault is not None:
            if not root.wait_tokens(args.fault_after, args.timeout):
                raise RuntimeError(f"the root gave {root.tokens} token(s), not the {args.fault_after} "
                                   f"the fault waits for (ended or ran over --timeout)")
            victim = workers[args.victim - 1]
            fault_unix = victim.fault(fault)
            fault_chars = root.generated_chars()
        rc = root.finish(max(1.0, args.timeout - (time.monotonic() - started)))
        ended_unix = time.time()
        if rc != 0:
            raise RuntimeError(root_failure(rc, args.timeout))
        stats = read_stats(stats_path)
        try:
            row.update(figures(stats, root, fault_unix, fault_chars, ended_unix))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise RuntimeError(f"unexpected --stats-json content: {type(e).__name__}: {e}") from None
        row["worker_sessions"] = {f"node {i}": w.weight_lines() for i, w in enumerate(workers, 1)}
        if row.get("failed"):
            raise RuntimeError(row["error"])
    except RuntimeError as e:
        row.update(failed=True, error=str(e).splitlines()[0], detail=tail(str(e)))
    finally:
        if root is not None and root.proc.returncode is None:
            stop(root.proc, grace=5.0)
        for w in workers:
            w.close()
        stats_path.unlink(missing_ok=True)
    if row["failed"]:
        if root is not None:
            row["stderr_tail"] = tail(root.err_text())
        row["worker_tails"] = {f"node {i}": tail(w.output(), 8) for i, w in enumerate(workers, 1) if w.output()}
    return row


def figures(stats: dict, root: Root, fault_unix: float | None, fault_chars: int | None, ended_unix: float) -> dict:
    """The figures of one run from the root's ``--stats-json`` (see dllama/commands/run.py)."""
    if stats["prompt"] is None:
        return {"failed": True, "error": "no token generated"}
    ready = [stats["prompt"]["unix"]] + [t["unix"] for t in stats["tokens"]]  # each token's wall clock
    network = stats["network"]
    out: dict[str, Any] = {
        "text": stats["text"], "finish_reason": stats["finish_reason"],
        "prompt_tokens": stats["prompt_tokens"], "generated_tokens": stats["generated_tokens"],
        "first_token_s": ready[0] - root.spawned_unix,
        "decode_tok_s": rate(ready),
        "exit_after_last_token_s": ended_unix - ready[-1],
        "changes": network["changes"] if network else [],
        "weights": network["weights"] if network else [],
        "nodes_at_end": network["nodes"] if network else None,
        "lost_line": next((line for line in root.stderr if "lost worker" in line), None),
    }
    if fault_unix is None:
        return out
    out["fault_unix"] = fault_unix
    out["fault_at_char"] = fault_chars
    lost = [c for c in out["changes"] if c["kind"] == "lost"]
    if not lost:
        return {**out, "failed": True, "error": "no lost worker recorded in network.changes: the fault went unnoticed"}
    change = lost[0]
    noticed = change["noticed_unix"]
    before = [u for u in ready if u < fault_unix]
    after = [u for u in ready if u > noticed]  # a token in flight as the signal went may land in between
    if not after:
        return {**out, "failed": True, "error": "no token after the recovery"}
    detect = noticed - fault_unix + change["settle_seconds"]
    parts = detect + change["plan_seconds"] + change["load_seconds"] + change["replay_seconds"]
    total = after[0] - fault_unix
    survivor = [{"address": w["address"], "node": w["node"], "source": w.get("source"),
                 "mb_sent": w["bytes_sent"] / 1e6, "s": w["seconds"]} for w in out["weights"]]
    out.update({
        "tokens_before_fault": len(before),
        "tokens_between_fault_and_notice": len(ready) - len(before) - len(after),
        "detect_s": detect,
        "noticed_after_fault_s": noticed - fault_unix,
        "settle_s": change["settle_seconds"],
        "plan_s": change["plan_seconds"],
        "load_s": change["load_seconds"],
        "replay_s": change["replay_seconds"],
        "replayed_tokens": change["replayed_tokens"],
        "other_s": total - parts,  # the failed forward done again, sampling, the token's way out
        "total_s": total,
        "reason": change["reason"],
        "nodes_after": change["nodes"],
        "tok_s_before": rate(before),
        "tok_s_after": rate(after),
        "survivor": survivor,
        "mb_to_survivor": sum(s["mb_sent"] for s in survivor),
        "changes_count": len(out["changes"]),
    })
    return out


# -- per model ---------------------------------------------------------------------------------------

def measure_model(model: BenchModel, args, workdir: Path, failures: list[str]) -> tuple[dict, list[dict]]:
    """The fault-free baseline (on fresh slice caches, which it fills, when the cache set-up is
    measured; else on the model file), then every (set-up, fault)."""
    steps = args.steps_1b if model.key == "1b" else args.steps_smollm2
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    cache_root = workdir / f"cache-{model.key}"
    pristine = [cache_root / "filled" / f"node{i}" for i in (1, 2)]
    base_setup = "cache" if "cache" in args.setups else "local"
    if base_setup == "cache":
        for d in pristine:
            d.mkdir(parents=True, exist_ok=True)
    what = f"{model.label}, 3 nodes, no fault"
    say(f"· {what}: {steps} steps, workers on " + ("empty slice caches (filling them)" if base_setup == "cache"
                                                   else "the model file"))
    base = run_case(model, steps, base_setup, None, pristine, logs, args)
    base.update(model=model.label, key=model.key, setup=base_setup, steps=steps)
    if base["failed"]:
        failures.append(f"{what}: {base['error']}")
        say(f"! {what}: {base['error']}\n{base.get('detail', '')}\n{base.get('stderr_tail', '')}")
    else:
        say(f"  {fmt(base['decode_tok_s'], '.1f')} tok/s, {base['generated_tokens']} tokens ({base['finish_reason']})")
    rows = []
    for setup in args.setups:
        if setup == "cache" and base["failed"]:
            failures.append(f"{model.label}, cache: skipped (the run that fills the caches failed)")
            continue
        for fault in args.faults:
            what = f"{model.label}, {setup}, {fault} worker {args.victim}"
            say(f"· {what} after {args.fault_after} tokens")
            dirs = None
            if setup == "cache":  # a fresh copy (hard links: entries are only ever replaced whole)
                run_dir = cache_root / f"run-{fault}"
                shutil.rmtree(run_dir, ignore_errors=True)
                dirs = [run_dir / d.name for d in pristine]
                for src, dst in zip(pristine, dirs):
                    shutil.copytree(src, dst, copy_function=os.link)
            try:
                row = run_case(model, steps, setup, fault, dirs, logs, args)
            finally:
                if dirs:
                    shutil.rmtree(dirs[0].parent, ignore_errors=True)
            row.update(model=model.label, key=model.key, setup=setup, fault=fault, victim=args.victim, steps=steps,
                       fault_after=args.fault_after, target_s=target_s(model.key, fault) if setup == "local" else None)
            if row["failed"]:
                failures.append(f"{what}: {row['error']}")
                say(f"! {what}: {row['error']}\n{row.get('detail', '')}\n{row.get('stderr_tail', '')}")
            else:
                check(row, base, setup, failures, what)
                say(f"  {row['total_s']:.2f} s to the next token (detect {row['detect_s']:.2f}, plan "
                    f"{row['plan_s']:.2f}, load {row['load_s']:.2f}, replay {row['replay_s']:.2f})")
            rows.append(row)
    shutil.rmtree(cache_root, ignore_errors=True)
    return base, rows


def check(row: dict, base: dict, setup: str, failures: list[str], what: str) -> None:
    """Text against the fault-free run's; the workers' sources; 2 nodes at the end."""
    notes = []
    if not base["failed"]:
        row["diff_at_char"] = first_difference(base["text"], row["text"])
        row["same_text"] = row["diff_at_char"] is None
    first = [s[0]["source"] for s in row["worker_sessions"].values() if s]
    want = "local" if setup == "local" else "cache"
    if first != [want, want]:
        notes.append(f"first session's sources {first}, expected {want} for both")
    expect = ("local",) if setup == "local" else ("cache+root", "cache")
    if [s["source"] for s in row["survivor"]] and any(s["source"] not in expect for s in row["survivor"]):
        notes.append(f"survivor's source {[s['source'] for s in row['survivor']]}, expected one of {expect}")
    if row["nodes_after"] != 2 or row["nodes_at_end"] != 2:
        notes.append(f"{row['nodes_after']} nodes after the change, {row['nodes_at_end']} at the end (expected 2)")
    if row["changes_count"] != 1:
        notes.append(f"{row['changes_count']} changes recorded (expected 1)")
    row["notes"] = notes
    for n in notes:
        failures.append(f"{what}: {n}")


# -- report -------------------------------------------------------------------------------------

def _same(r: dict) -> str:
    if "same_text" not in r:
        return "-"
    if r["same_text"]:
        return "yes"
    return f"no: from char {r['diff_at_char']} (fault at ~{fmt(r['fault_at_char'], 'd')})"


def _verdict(r: dict) -> str:
    if r["target_s"] is None:
        return "-"
    return f"{r['target_s']:.0f} ({'met' if r['total_s'] <= r['target_s'] else 'MISSED'})"


def _fault_cells(r: dict) -> str:
    """The fault table's cells of a run that did not fail."""
    sources = ",".join(str(s["source"]) for s in r["survivor"]) or "-"
    return (f"{r['detect_s']:.2f} | {r['plan_s']:.3f} | {r['load_s']:.2f} | {r['replay_s']:.2f} "
            f"({r['replayed_tokens']}) | {r['other_s']:.2f} | **{r['total_s']:.2f}** | {_verdict(r)} | "
            f"{fmt(r['tok_s_before'], '.1f')} / {fmt(r['tok_s_after'], '.1f')} | {r['mb_to_survivor']:.1f} "
            f"({sources}) | {_same(r)} |")


def print_report(bases: list[dict], rows: list[dict], failures: list[str]) -> None:
    print()
    print(NOTE)
    print()
    print("Fault-free baselines (3 nodes):")
    print()
    print_table("| model | workers | decode tok/s | tokens | first token s | text chars |", bases,
                lambda b: f"| {b['model']} | {b['setup']} |",
                lambda b: f"{fmt(b['decode_tok_s'], '.1f')} | {b['generated_tokens']} ({b['finish_reason']}) | "
                          f"{b['first_token_s']:.2f} | {len(b['text'])} |")
    print()
    print_table("| model | workers | fault | detect s | re-plan s | load s | replay s (tokens) | other s | total s "
                "| target s | tok/s before / after | MB to survivor (source) | same text |",
                rows, lambda r: f"| {r['model']} | {r['setup']} | {r['fault']} |", _fault_cells)
    print()
    print(f"Targets (the issue's, with local model files): a killed worker at most "
          f"{KILL_TARGET_S['smollm2']:g} s on SmolLM2 and {KILL_TARGET_S['1b']:g} s on the 1B shape, a frozen one at "
          f"most {FREEZE_EXTRA_S:g} s more. Times from the fault (the wall clock as the signal went) and the root's "
          f"--stats-json: detect = network.changes' noticed_unix - fault + settle_seconds; re-plan = plan_seconds; "
          f"load = load_seconds; replay = replay_seconds; total = the first token after the notice - fault; "
          f"other = total - the rest (the failed forward done again). tok/s before: tokens before the fault; "
          f"after: from the first token after the recovery. MB to survivor: network.weights of the new session.")
    for r in bases + rows:
        if r["failed"]:
            print(f"\nFAILED {r['model']}, {r['setup']}, {r.get('fault', 'no fault')}: {r['error']}")
            print_tails(r)
    for f in failures:
        print(f"FAILED {f}")
    print()


def _once(name: str, labelled: set[str]) -> str | None:
    """A legend label the first time only."""
    if name in labelled:
        return None
    labelled.add(name)
    return name


PARTS = (("detect_s", "detect", "tab:red"), ("plan_s", "re-plan", "tab:purple"), ("load_s", "load", "tab:blue"),
         ("replay_s", "replay", "tab:green"), ("other_s", "other", "tab:gray"))


def plot(rows: list[dict], path: Path) -> None:
    fig, panels = model_panels(rows, 5.5)
    for ax, model, mine in panels:
        labelled: set[str] = set()
        for x, r in enumerate(mine):
            if r["failed"]:
                ax.annotate("failed", (x, 0), ha="center", va="bottom", fontsize=8)
                continue
            bottom = 0.0
            for key, name, color in PARTS:
                value = max(0.0, r[key])
                ax.bar(x, value, 0.6, bottom=bottom, color=color, label=_once(name, labelled))
                bottom += value
            ax.annotate(f"{r['total_s']:.2f}", (x, bottom), ha="center", va="bottom", fontsize=8)
            if r["target_s"] is not None:
                ax.hlines(r["target_s"], x - 0.35, x + 0.35, colors="black", linestyles="dashed",
                          label=_once("target", labelled))
        ax.set_xticks(range(len(mine)), [f"{r['setup']}\n{r['fault']}" for r in mine])
        ax.set_ylabel("seconds from the fault to the next token")
        ax.set_title(model)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("dllama: a worker lost, 3 nodes to 2 over loopback; one run on a noisy machine", fontsize=10)
    save_figure(fig, path)


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: SmolLM2, local model files, kill, fewer steps (flags below still choose)")
    p.add_argument("--models", nargs="+", default=None, choices=["smollm2", "1b"],
                   help="smollm2, 1b (the synthetic Llama-1B-shaped Q40 model); default both")
    p.add_argument("--setups", nargs="+", default=None, choices=SETUPS,
                   help="local: workers with --model FILE; cache: workers with a filled --cache-dir (default both)")
    p.add_argument("--faults", nargs="+", default=None, choices=FAULTS,
                   help="kill: SIGKILL a worker; freeze: SIGSTOP it (SIGCONT at the end) (default both)")
    p.add_argument("--victim", type=int, choices=[1, 2], default=2, help="the worker faulted: 1 or 2 (default 2)")
    p.add_argument("--fault-after", type=int, default=None,
                   help="generated tokens before the fault (default 16; --quick 12)")
    p.add_argument("--steps-smollm2", type=int, default=None,
                   help="dllama --steps (positions, prompt included) for SmolLM2 (default 96; --quick 48)")
    p.add_argument("--steps-1b", type=int, default=48, help="dllama --steps for the synthetic 1B (default 48)")
    p.add_argument("--buffer", choices=["f32", "q80"], default="f32",
                   help="--buffer-float-type of every run (default f32: the text check compares 3-node and "
                        "2-node arithmetic, which q80 activations make drift)")
    p.add_argument("--heartbeat-timeout", type=float, default=None,
                   help="--heartbeat-timeout of the root and workers (default: dllama's, 2.5 s)")
    p.add_argument("--prompt", default=PROMPT)
    add_node_options(p, "recovery", "seconds one root run may take",
                     "where the synthetic model, slice caches and logs go")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"models": ["smollm2"] if quick else ["smollm2", "1b"],
                "setups": ["local"] if quick else list(SETUPS), "faults": ["kill"] if quick else list(FAULTS),
                "fault_after": 12 if quick else 16, "steps_smollm2": 48 if quick else 96,
                "output": str(RESULTS / ("recovery_quick.json" if quick else "recovery.json"))}
    fill_defaults(args, defaults)
    for name in ("models", "setups", "faults"):
        setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    if args.fault_after < 2:
        p.error("--fault-after must be at least 2 (tokens/s before the fault needs 2)")
    return args


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # the finally blocks stop every child


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)
    say(NOTE)
    started = time.perf_counter()
    bases: list[dict] = []
    rows: list[dict] = []
    failures: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="dllama-recovery-bench-", dir=args.tmp_dir))
    try:
        for key in args.models:
            model = cluster_model(key, workdir, args.prompt)
            try:
                base, mine = measure_model(model, args, workdir, failures)
            finally:
                if model.path.is_relative_to(workdir):
                    model.path.unlink(missing_ok=True)  # 1.75 GB: gone before the next model
            bases.append(base)
            rows += mine
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print_report(bases, rows, failures)
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "tmp_dir")}
    result = {"note": NOTE, "machine": machine_info(), "settings": settings,
              "targets": {"kill_s": KILL_TARGET_S, "freeze_extra_s": FREEZE_EXTRA_S, "with": "local model files"},
              "baselines": bases, "rows": rows, "failures": failures, "seconds": time.perf_counter() - started}
    write_results(Path(args.output), result, (lambda png: plot(rows, png)) if rows else None)


if __name__ == "__main__":
    main()
