"""What the commands share: resolving model/tokenizer paths and loading them."""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from dllama.errors import DllamaError

if TYPE_CHECKING:
    from dllama.engine.session import Session
    from dllama.engine.tokenizer import Tokenizer

DEFAULT_MAX_SEQ_LEN = 4096


_info_lock = threading.Lock()


def info(message: str) -> None:
    """One line on stderr, whole: the API's access log and the batching engine write from
    different threads, and ``print`` writes a line's text and its end separately."""
    with _info_lock:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def resolve_paths(args: argparse.Namespace, need_model: bool = True) -> tuple[Path | None, Path]:
    """The model and tokenizer files the user named, or the default model's."""
    model = getattr(args, "model", None)
    tokenizer = args.tokenizer
    if (model is None) != (tokenizer is None) and need_model:
        raise DllamaError("pass both --model and --tokenizer, or neither to use the default model")
    if tokenizer is not None:
        return (Path(model) if model else None), Path(tokenizer)
    from dllama.default_model import ensure_default_model, ensure_default_tokenizer

    if not need_model:
        return None, ensure_default_tokenizer()
    return ensure_default_model()


def load_tokenizer(path: Path) -> "Tokenizer":
    from dllama.engine.tokenizer import Tokenizer

    if not path.exists():
        raise DllamaError(f"{path}: no such tokenizer file")
    return Tokenizer.load(path)


def encode_text(tokenizer: "Tokenizer", text: str) -> list[int]:
    """Token ids of user text; says so when characters had no token and were left out (the
    text of the ids the tokenizer added itself, a BOS, is not the user's)."""
    ids = tokenizer.encode(text)
    added = 1 if ids and tokenizer.add_bos and tokenizer.bos_id >= 0 and ids[0] == tokenizer.bos_id else 0
    if tokenizer.decode(ids[added:]) != text:
        info("⚠️  some characters of the input have no token in this vocabulary and were left out")
    return ids


def load_session(args: argparse.Namespace) -> "Session":
    """A ready Session for --model/--tokenizer (or the default model) with the user's settings."""
    from dllama.engine.session import Session, check_pair
    from dllama.formats.mfile import ModelFile
    from dllama.kernels import backend
    from dllama.kernels.quants import FloatType
    from dllama.machine import physical_memory
    from dllama.model.forward import Transformer

    workers = getattr(args, "workers", None) or []
    for spec in workers:  # before anything slow: a typo is a one-line error at once
        from dllama.transport.keys import worker_spec
        from dllama.transport.links import parse_address
        address, _ = worker_spec(spec)
        try:
            parse_address(address)
        except ValueError as e:
            raise DllamaError(str(e)) from None
    model_path, tokenizer_path = resolve_paths(args)
    if not model_path.exists():
        raise DllamaError(f"{model_path}: no such model file")
    tokenizer = load_tokenizer(tokenizer_path)
    model = ModelFile(model_path)
    h = model.header
    check_pair(tokenizer, h.vocab_size)  # before any weights travel to workers
    seq_len = min(args.max_seq_len or DEFAULT_MAX_SEQ_LEN, h.seq_len)
    n_slots = getattr(args, "parallel", 1)  # the API's sequences at once: a KV cache slot each
    kv_bytes = 2 * h.n_layers * n_slots * seq_len * h.kv_dim * 4
    if kv_bytes > physical_memory() * (1 + len(workers)):
        slots = f"{n_slots} slots of " if n_slots > 1 else ""
        raise DllamaError(f"a KV cache of {slots}{seq_len} positions needs {kv_bytes / 2**30:.1f} GiB, more than "
                          f"this machine's memory: lower --max-seq-len" + (" or --parallel" if n_slots > 1 else ""))
    buffer_type = FloatType.parse(args.buffer_float_type)
    try:
        backend.backend()
        backend.set_threads(args.nthreads)
        compiling = _compiling_notice()
        if workers:
            transformer, cluster = _start_cluster(args, model, seq_len, workers, n_slots)
        else:
            transformer, cluster = Transformer(model, seq_len=seq_len, buffer_type=buffer_type, n_slots=n_slots), None
    except ValueError as e:  # DLLAMA_BACKEND / DLLAMA_CPU_PATH
        raise DllamaError(str(e)) from None
    try:
        transformer.prepare()
        _warm_kernels(transformer, compiling)
        info(f"💡 Model: {model_path.name} ({h.arch.name.lower()}, {h.n_layers} layers, dim {h.dim}, "
             f"{h.n_heads} heads, {h.n_kv_heads} KV heads, {h.weight_type.name} weights, "
             f"{model.weight_bytes / 1e6:.0f} MB)")
        kv = (f"KV cache {transformer.kv_cache.nbytes / 1e6:.0f} MB" if n_slots == 1 else
              f"KV cache {n_slots} slots x {transformer.kv_cache.nbytes / n_slots / 1e6:.0f} MB = at most "
              f"{transformer.kv_cache.nbytes / 1e6:.0f} MB (committed as positions fill)")
        info(f"💡 SeqLen: {seq_len} (model: {h.seq_len}; --max-seq-len changes it), {kv}, "
             f"buffers {args.buffer_float_type}")
        info(f"💡 Kernels: {backend.describe()}")
        return Session(transformer, tokenizer, cluster=cluster)
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise


def _compiling_notice() -> float | None:
    """When the numba kernels were never compiled on this machine (checked before any runs),
    say so now, and return the clock to time it: a first run would otherwise sit silent for half
    a minute."""
    import time

    from dllama.kernels import backend

    if backend.backend() != backend.NUMBA or backend.kernels_cached():
        return None
    info("⏳ compiling the kernels for this machine (the first run only; about half a minute)")
    return time.perf_counter()


def _warm_kernels(transformer, compiling: float | None) -> None:
    """Load (or compile) every kernel before the first token, so that the API reports healthy
    only when it can answer at full speed."""
    import time

    import numpy as np

    from dllama.engine.sampler import Sampler
    from dllama.model.node import warm_up

    warm_up(transformer, batches=True)
    transformer.blocks.start(np.zeros(1, dtype=np.int64))  # the embedding lookup: only the root has it
    logits = np.zeros(transformer.header.vocab_size, dtype=np.float32)
    Sampler(0.0).sample(logits)
    Sampler(0.8, 0.9, seed=0).sample(logits)
    if compiling is not None:
        info(f"💡 kernels compiled in {time.perf_counter() - compiling:.0f} s (cached for the next runs)")


def root_security(args: argparse.Namespace, workers: list[str]):
    """CURVE with this root's pair when workers are given with keys (or --key is); else plaintext."""
    from dllama.transport.keys import default_key_dir, load_pair
    from dllama.transport.links import PLAINTEXT, CurveSecurity

    key = getattr(args, "key", None)
    if key is None and not any("@" in w for w in workers):
        return PLAINTEXT
    public, secret = load_pair(Path(key).expanduser() if key else default_key_dir())
    info(f"🔒 encrypted links; this root's key {public.decode()}")
    return CurveSecurity(public, secret)


def _start_cluster(args: argparse.Namespace, model, seq_len: int, workers: list[str], n_slots: int = 1):
    """The root's node of a cluster with ``workers``: plan, hand out slices, connect."""
    from dllama.engine.cluster import Cluster
    from dllama.kernels.quants import FloatType
    from dllama.model.forward import Transformer

    if args.buffer_float_type == "q80" and model.header.dim % 32:
        raise DllamaError("--buffer-float-type q80 on a cluster needs a model dimension that is a multiple of 32")
    buffer_type = FloatType.parse(args.buffer_float_type)
    security = root_security(args, workers)
    cluster = Cluster(model, workers, seq_len, args.buffer_float_type, args.net_timeout,
                      lambda share, sync: Transformer(share, seq_len=seq_len, buffer_type=buffer_type, sync=sync,
                                                      n_slots=n_slots),
                      info, split=args.split, heartbeat=args.heartbeat_timeout, on_worker_loss=args.on_worker_loss,
                      n_slots=n_slots, security=security)
    transformer = cluster.start()
    for t in cluster.transfers:
        how = {"local": "cut from its own model file", "cache": "from its slice cache"}.get(
            t.source, f"sent {t.bytes_sent / 1e6:.1f} MB in {t.seconds:.1f} s")
        info(f"💡 worker {t.address}: node {t.node}, weights {how}")
    info(cluster.describe_nodes())
    return transformer, cluster
