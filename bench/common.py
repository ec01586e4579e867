"""What the benches (bench/decode.py, bench/cluster.py, bench/recovery.py) share: paths, the models
they measure (SmolLM2 and the synthetic Llama-1B-shaped model, with a tokenizer for the cluster
benches), child-process environments, the cluster benches' processes (workers on free loopback
ports, the root's command line and its --stats-json file), formatting, machine facts and writing
results. Each bench imports this module, never another bench.

Importing it puts the repository on ``sys.path`` (``python bench/x.py`` without an installed
dllama) and imports no module that imports numba: a bench's parent process never starts numba,
each child configures it (threads, cache folder) before its first import.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# After the path bootstrap above.
from dllama.formats.mfile import (
    ArchType,
    HiddenAct,
    ModelFile,
    ModelHeader,
    ModelWriter,
    RopeType,
    tensor_plan,
)
from dllama.kernels.quants import Q40_BLOCK, Q80_BLOCK, FloatType

# numba and the BLAS libraries size their thread pools from these when they start.
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

LLAMA_LABEL = "synthetic Llama-1B Q40"
SMOL_LABEL = "SmolLM2-135M Q40"


def say(message: str) -> None:
    """Progress, on stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def fmt(value: Any, spec: str, missing: str = "-") -> str:
    """``format(value, spec)``, or ``missing`` for None (a figure this run did not measure)."""
    return missing if value is None else format(value, spec)


def tail(text: str, n: int = 15) -> str:
    """The last ``n`` lines of a child's output, for a failure report."""
    return "\n".join(text.strip().splitlines()[-n:])


# -- models ------------------------------------------------------------------------------------

@dataclass
class BenchModel:
    key: str  # as given to --models
    label: str
    path: Path
    tokenizer: Path | None  # None: random prompt tokens (decode.py's synthetic model has none)


def smollm2(key: str = "smollm2") -> BenchModel:
    """The default model, SmolLM2-135M Q40 (downloaded and converted into DLLAMA_HOME once)."""
    from dllama.default_model import ensure_default_model
    path, tokenizer = ensure_default_model(FloatType.Q40)
    return BenchModel(key, SMOL_LABEL, path, tokenizer)


def llama_1b_header(n_layers: int = 16, seq_len: int = 2048, weight_type: FloatType = FloatType.Q40) -> ModelHeader:
    """Llama 3.2 1B's shape, with its rope (theta 500000, Llama 3.1 frequency scaling)."""
    return ModelHeader(arch=ArchType.LLAMA, dim=2048, hidden_dim=8192, n_layers=n_layers, n_heads=32,
                       n_kv_heads=8, vocab_size=128256, seq_len=seq_len, weight_type=weight_type,
                       hidden_act=HiddenAct.SILU, rope_theta=500000.0, rope_type=RopeType.LLAMA3_1,
                       rope_scaling_factor=32.0, rope_scaling_low_freq_factor=1.0,
                       rope_scaling_high_freq_factor=4.0, rope_scaling_orig_max_seq_len=8192,
                       head_dim=64, norm_epsilon=1e-5)


def llama_1b_label(n_layers: int = 16) -> str:
    return LLAMA_LABEL if n_layers == 16 else f"{LLAMA_LABEL}, {n_layers} layer(s)"


def random_q40(rng: np.random.Generator, stored_shape: tuple[int, ...], chunk_rows: int = 8192) -> np.ndarray:
    """Q40 blocks made directly (quantizing 1.2B floats would take minutes and gigabytes).

    Nibbles are uniform in 1..15, so values (nibble - 8) * d are symmetric around 0 with a
    standard deviation of about 4.3 d; d ~ 0.02 / 8 keeps a row's products with a unit-RMS input
    near 0.5 for dim 2048, so activations stay finite through 16 layers.
    """
    rows, nb = stored_shape
    out = np.empty((rows, nb), dtype=Q40_BLOCK)
    for start in range(0, rows, chunk_rows):  # bounded temporaries for the 128256-row head
        n = min(chunk_rows, rows - start)
        d = 0.02 / 8 * (1.0 + 0.1 * rng.standard_normal((n, nb), dtype=np.float32))
        lo = rng.integers(1, 16, (n, nb, 16), dtype=np.uint8)
        hi = rng.integers(1, 16, (n, nb, 16), dtype=np.uint8)
        out["d"][start:start + n] = d.astype(np.float16)
        out["qs"][start:start + n] = lo | (hi << 4)
    return out


def random_q80(rng: np.random.Generator, stored_shape: tuple[int, ...], chunk_rows: int = 8192) -> np.ndarray:
    """Q80 blocks made directly, with values of the same spread as ``random_q40``'s (uniform
    int8 values have a standard deviation of about 73 d)."""
    rows, nb = stored_shape
    out = np.empty((rows, nb), dtype=Q80_BLOCK)
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        d = 0.02 * 4.3 / 8 / 73 * (1.0 + 0.1 * rng.standard_normal((n, nb), dtype=np.float32))
        out["d"][start:start + n] = d.astype(np.float16)
        out["qs"][start:start + n] = rng.integers(-127, 128, (n, nb, 32), dtype=np.int8)
    return out


def random_floats(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, chunk_rows: int = 8192) -> np.ndarray:
    """F16 or F32 weights with the spread of ``random_q40``'s values, made in bounded chunks."""
    out = np.empty(shape, dtype=dtype)
    for start in range(0, shape[0], chunk_rows):
        n = min(chunk_rows, shape[0] - start)
        out[start:start + n] = 0.02 * 4.3 / 8 * rng.standard_normal((n,) + shape[1:], dtype=np.float32)
    return out


def write_synthetic_model(path: Path, header: ModelHeader, seed: int = 0) -> None:
    """Random weights, written tensor by tensor: at most one tensor (the 1 GB embedding) in memory."""
    rng = np.random.default_rng(seed)
    with ModelWriter(path, header) as writer:
        for spec in tensor_plan(header):
            if spec.float_type == FloatType.Q40:
                values = random_q40(rng, spec.stored_shape)
            elif spec.float_type == FloatType.Q80:
                values = random_q80(rng, spec.stored_shape)
            elif spec.float_type == header.weight_type and spec.name != "embedding" and not spec.name.endswith("norm"):
                values = random_floats(rng, spec.shape, "<f2" if spec.float_type == FloatType.F16 else "<f4")
            elif spec.name.endswith("norm"):
                values = (1.0 + 0.05 * rng.standard_normal(spec.shape, dtype=np.float32)).astype(np.float32)
            else:  # the embedding
                values = 0.02 * rng.standard_normal(spec.shape, dtype=np.float32)
            writer.write(spec.name, values)
            del values


def write_llama_1b(path: Path, n_layers: int = 16, weight_type: FloatType = FloatType.Q40) -> ModelHeader:
    """The synthetic Llama-1B-shaped model at ``path`` (about 1.75 GB in Q40 with 16 layers), with
    progress on stderr; its header."""
    header = llama_1b_header(n_layers=n_layers, weight_type=weight_type)
    say(f"· writing the synthetic Llama-1B-shaped {weight_type.name} model ({n_layers} layers) to {path}")
    t = time.perf_counter()
    write_synthetic_model(path, header)
    say(f"  {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
    return header


def write_synthetic_tokenizer(path: Path, vocab_size: int, prompt: str) -> None:
    """A legacy tokenizer of ``vocab_size`` tokens for the synthetic model: ASCII bytes, every prefix
    of the prompt's words (so the prompt is a few tokens, as with a real tokenizer), then filler
    tokens " w<id>". No EOS: generation always runs the full steps."""
    from dllama.formats.tfile import TokenizerData, write_tokenizer

    vocab = [bytes([i]) for i in range(128)]
    scores = [0.0] * 128
    known = set(vocab)
    for word in re.findall(r" ?\w+|[^\w ]", prompt):
        raw = word.encode()
        for end in range(2, len(raw) + 1):
            if raw[:end] not in known:
                known.add(raw[:end])
                vocab.append(raw[:end])
                scores.append(float(end))  # longer merges first
    for i in range(len(vocab), vocab_size):
        vocab.append(f" w{i}".encode())
        scores.append(-1e11)  # at or below distributed-llama's floor: never a merge result
    write_tokenizer(path, TokenizerData(vocab=vocab, scores=scores))


def cluster_model(key: str, workdir: Path, prompt: str) -> BenchModel:
    """A cluster bench's model: "smollm2" (the default model), or "1b": the synthetic
    Llama-1B-shaped Q40 model written into ``workdir`` (about 1.75 GB), with a tokenizer that
    makes ``prompt`` a few tokens."""
    if key == "smollm2":
        return smollm2(key)
    path = workdir / "synthetic-llama-1b-q40.m"
    header = write_llama_1b(path)
    tokenizer = workdir / "synthetic-llama-1b.t"
    write_synthetic_tokenizer(tokenizer, header.vocab_size, prompt)
    return BenchModel("1b", LLAMA_LABEL, path, tokenizer)


# -- child processes -------------------------------------------------------------------------------

def child_env(threads: int, **extra: str) -> dict[str, str]:
    """A child's environment: ours, the repository on PYTHONPATH, ``threads`` threads for numba
    and BLAS (fixed when they start), and ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    env.update(extra)
    return env


# -- the cluster benches' nodes ------------------------------------------------------------------------

def node_env() -> dict[str, str]:
    """The environment of every node (root or worker): ours (DLLAMA_HOME included, pinned so all
    agree), the repository on the path, UTF-8 output, and one thread for the numeric libraries."""
    from dllama.default_model import dllama_home

    return child_env(1, DLLAMA_HOME=str(dllama_home()), PYTHONIOENCODING="utf-8:backslashreplace")


def spawn(cmd: list[str], **kwargs) -> subprocess.Popen:
    """A node's process: in the repository, with ``node_env()``, no stdin."""
    return subprocess.Popen(cmd, cwd=ROOT, env=node_env(), stdin=subprocess.DEVNULL, **kwargs)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End a child we started: SIGINT (a worker's clean exit), then SIGKILL; always reaped."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        say(f"! process {proc.pid} did not exit after SIGKILL")


class WorkerProcess:
    """`python -m dllama worker --nthreads 1` with ``options`` (where its weights come from, its
    timeouts) on a free loopback port, started by ``start`` (``spawn``'s signature), its log in a
    file."""

    def __init__(self, log_path: Path, options: list[str], start: Callable[..., subprocess.Popen] = spawn) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", str(self.port),
               "--nthreads", "1", *options]
        with open(log_path, "w", encoding="utf-8") as log:  # the child keeps its own descriptor
            self.proc = start(cmd, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def wait_listening(self, deadline: float) -> None:
        while "Listening on" not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.address} exited with {self.proc.returncode}:\n{tail(self.output())}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.address} not listening in time:\n{tail(self.output())}")
            time.sleep(0.05)

    def close(self) -> None:
        stop_process(self.proc)


def add_node_options(p: argparse.ArgumentParser, name: str, timeout_help: str, tmp_dir_help: str) -> None:
    """The cluster benches' options for their nodes (how long they may take, where their files
    go) and for their results (bench/results/``name``.json, ``name``_quick.json with --quick)."""
    p.add_argument("--timeout", type=float, default=1200.0, help=timeout_help)
    p.add_argument("--worker-start-timeout", type=float, default=300.0, help="seconds for workers to listen")
    p.add_argument("--net-timeout", type=float, default=60.0, help="the root's --net-timeout (busy shared cores)")
    p.add_argument("--tmp-dir", default=None, help=tmp_dir_help)
    p.add_argument("--output", default=None, help=f"JSON path (default bench/results/{name}.json, "
                                                  f"--quick {name}_quick.json); the PNG goes next to it")


def root_command(model: BenchModel, steps: int, buffer: str, stats_path: Path, addresses: list[str], args,
                 *extra: str) -> list[str]:
    """The root's `python -m dllama inference` as the cluster benches run it: ``args.prompt``,
    greedy, one thread, ``steps`` positions (the prompt's included) and no more, ``buffer``
    buffers, ``args.net_timeout``, ``--stats-json stats_path``, ``extra``, and the workers at
    ``addresses`` (none: one node)."""
    cmd = [sys.executable, "-m", "dllama", "inference", "--model", str(model.path), "--tokenizer",
           str(model.tokenizer), "--prompt", args.prompt, "--steps", str(steps), "--max-seq-len", str(steps),
           "--temperature", "0", "--nthreads", "1", "--buffer-float-type", buffer,
           "--net-timeout", str(args.net_timeout), "--stats-json", str(stats_path), *extra]
    return cmd + ["--workers", *addresses] if addresses else cmd


def stats_file(folder: str | None) -> Path:
    """A fresh, empty file for a root's --stats-json, in ``folder`` (None: the system's)."""
    fd, name = tempfile.mkstemp(prefix="dllama-stats-", suffix=".json", dir=folder)
    os.close(fd)
    return Path(name)


def read_stats(path: Path) -> dict:
    """A root's --stats-json output; RuntimeError when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"no readable --stats-json output: {e}") from None


def root_failure(rc: int | None, timeout: float) -> str:
    """Why a root run failed: its exit status ``rc``, None when it ran over ``timeout`` seconds."""
    why = f"ran over {timeout:g} s" if rc is None else f"exited with {rc}"
    return f"root {why}"


# -- reports ---------------------------------------------------------------------------------------

def report_targets(targets: list[tuple[str, Any, Callable[[Any], bool], str]]) -> list[dict]:
    """Print each (name, measured value or None, test, format) as met, MISSED or not measured;
    the JSON rows of the results."""
    out = []
    for name, value, ok, spec in targets:
        met = None if value is None else bool(ok(value))
        out.append({"target": name, "value": value, "met": met})
        status = "not measured" if met is None else ("met" if met else "MISSED")
        print(f"[{status:^12}] {name}" + ("" if value is None else f": {spec.format(value)}"))
    return out


def print_table_head(head: str) -> None:
    """A Markdown table's header line ``head`` and the rule under it."""
    print(head)
    print("|" + "---|" * (head.count(" | ") + 1))


def print_table(head: str, rows: list[dict], lead: Callable[[dict], str], cells: Callable[[dict], str]) -> None:
    """A Markdown table of runs: ``head``, its rule, then a line a run: its first cells
    ``lead(run)`` (what it ran), then ``cells(run)`` (what it measured), or for a failed run FAILED
    and its ``error``, empty cells after."""
    print_table_head(head)
    for run in rows:
        first = lead(run)
        if run["failed"]:
            rest = f"FAILED: {run['error']} |" + " |" * (head.count(" | ") - first.count(" | ") - 1)
        else:
            rest = cells(run)
        print(f"{first} {rest}")


def print_tails(run: dict) -> None:
    """What a failed run left to read: its ``detail``, the root's ``stderr_tail`` and each
    worker's log tail (``worker_tails``, by node)."""
    for text in (run.get("detail"), run.get("stderr_tail")):
        if text:
            print(text)
    for node, text in (run.get("worker_tails") or {}).items():
        print(f"-- {node}:\n{text}")


# -- machine and results -----------------------------------------------------------------------------

def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache Linux reports (None elsewhere)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def machine_info(bandwidth: dict[int, float] | None = None) -> dict:
    """The machine, the versions that matter and the date; the measured bandwidths when given."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("numba", "llvmlite", "pyzmq", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
            "last_level_cache_bytes": last_level_cache_bytes(),
            "python": platform.python_version(), "numpy": np.__version__, **versions,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if bandwidth is not None:
        info["bandwidth_gb_s"] = {str(k): v for k, v in bandwidth.items()}
    return info


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (ImportError without matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def model_panels(rows: list[dict], width: float) -> tuple[Any, list[tuple[Any, str, list[dict]]]]:
    """A figure with a chart a model of ``rows`` (their "model"), side by side, ``width`` inches
    each: the figure, and each chart's axes, model and rows."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(width * len(models), 4.5), squeeze=False)
    return fig, [(ax, model, [r for r in rows if r["model"] == model]) for ax, model in zip(axes[0], models)]


def save_figure(fig, path: Path) -> None:
    """A chart, laid out, written as a PNG (120 dpi) at ``path``, then closed."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def fill_defaults(args, defaults: dict[str, Any]) -> None:
    """Each option in ``defaults`` left unset (None) takes its value there (defaults that depend
    on --quick)."""
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def write_results(out: Path, result: dict, draw: Callable[[Path], None] | None) -> None:
    """``result`` as JSON at ``out``, then ``draw(png)`` next to it (skipped with a note when
    matplotlib is missing; ``draw`` None: nothing to chart)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    wrote = f"wrote {out}"
    if draw is not None:
        png = out.with_suffix(".png")
        try:
            draw(png)
            wrote += f" and {png}"
        except ImportError:
            wrote += " (no matplotlib: no chart; pip install '.[bench]')"
    print(wrote)


# -- decode.py's measuring workers, run in fresh interpreters (decode.py and weights.py) ----------

NOTE = ("One run on a shared, noisy machine: read the numbers as ratios from one run, "
        "not as absolutes.")


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights one decode step must read: every layer matrix and the output head
    (stored sizes), plus one embedding row. Norms are a few KB and left out."""
    model = ModelFile(path)
    total = model.header.dim * 4
    for spec in model.plan:
        layer_weight = spec.name.startswith("layers.") and len(spec.shape) == 2
        if layer_weight or spec.name == "output":
            total += spec.nbytes
    return total


def worker_env(threads: int, backend: str, cache_dir: Path | None) -> dict[str, str]:
    extra = {"DLLAMA_BACKEND": backend}
    if cache_dir is not None:
        extra["NUMBA_CACHE_DIR"] = str(cache_dir)
    return child_env(threads, **extra)


class WorkerFailed(Exception):
    pass


def run_worker(kind: str, cfg: dict, env: dict[str, str], timeout: float) -> tuple[dict, float]:
    """Run decode.py's worker `kind` (measure, ttft, bandwidth) in a fresh interpreter; its JSON
    result and the wall clock when it was started."""
    cmd = [sys.executable, str(BENCH / "decode.py"), "--worker", kind, "--config", json.dumps(cfg)]
    started = time.time()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"{kind} worker ran over {timeout:g} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no error output"])[-1]
        raise WorkerFailed(f"{kind} worker exited with {done.returncode}: {last}\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]), started


def measure_bandwidth(args) -> dict[int, float]:
    say(f"· memory bandwidth ({args.bandwidth_gib:g} GiB int64 sum, threads {args.threads})")
    cfg = {"threads": args.threads, "gib": args.bandwidth_gib, "repeats": args.bandwidth_repeats}
    out, _ = run_worker("bandwidth", cfg, worker_env(max(args.threads), "numba", None), args.worker_timeout)
    return {int(k): v for k, v in out["gb_s"].items()}
