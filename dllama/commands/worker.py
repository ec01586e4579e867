"""``worker``: serve roots, one session after another, until interrupted."""
from __future__ import annotations

import argparse
from pathlib import Path

from dllama.commands.common import info
from dllama.errors import DllamaError


def local_models(name: str) -> dict[str, Path]:
    """``--model``: the .m file, or every .m file of a folder, by SHA-256 (remembered, so that a
    large file is read once, not at every start)."""
    from dllama.engine.cluster import model_digest
    from dllama.formats.mfile import ModelFile

    path = Path(name)
    files = sorted(path.glob("*.m")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise DllamaError(f"--model {name}: no .m model file there")
    out = {}
    for f in files:
        try:
            ModelFile(f)  # its header and size check out
            out[model_digest(f)] = f
        except (OSError, DllamaError) as e:
            if not path.is_dir():
                raise DllamaError(f"--model {name}: {e}") from None
            info(f"⚠️  {f}: skipped ({e})")
    return out


def worker_security(args: argparse.Namespace):
    """CURVE with this worker's pair when --authorized-keys names who may connect; else
    plaintext (with a warning when other machines can reach it)."""
    from dllama.transport.keys import authorized_keys, default_key_dir, load_pair
    from dllama.transport.links import PLAINTEXT, CurveSecurity

    if args.authorized_keys is None:
        if args.key is not None:
            raise DllamaError("--key needs --authorized-keys: the public keys of the roots this worker serves")
        if args.host not in ("127.0.0.1", "::1", "localhost"):
            info(f"⚠️  listening on {args.host} without keys: anyone who reaches port {args.port} can use this "
                 f"worker and read what it computes (see `dllama keygen` and --authorized-keys)")
        return PLAINTEXT, frozenset()
    authorized = authorized_keys(Path(args.authorized_keys).expanduser())
    public, secret = load_pair(Path(args.key).expanduser() if args.key else default_key_dir())
    info(f"🔒 encrypted links; this worker's key {public.decode()}, {len(authorized)} authorized root key(s)")
    return CurveSecurity(public, secret), authorized


def main(args: argparse.Namespace) -> int:
    from dllama.kernels import backend
    from dllama.model.node import NodeFactory
    from dllama.model.node_speed import measure
    from dllama.transport.slice_cache import SliceCache
    from dllama.transport.worker import WorkerServer

    try:
        backend.backend()
        backend.set_threads(args.nthreads)
    except ValueError as e:
        raise DllamaError(str(e)) from None
    cache = SliceCache(args.cache_dir) if args.cache_dir else None
    models = local_models(args.model) if args.model else {}
    info(f"💡 Kernels: {backend.describe()}")
    speed = measure()  # before serving, on a quiet machine: for roots that split by speed
    info(f"💡 Speed: {speed.describe()}")
    security, authorized = worker_security(args)
    server = WorkerServer(NodeFactory(models), args.port, args.host, cache, log=info, heartbeat=args.heartbeat_timeout,
                          speed=speed.to_json(), security=security, authorized=authorized)
    for path in models.values():
        info(f"💡 Local model: {path} (slices are cut from it)")
    info(f"💡 Listening on {args.host}:{args.port}" + (f", slice cache {args.cache_dir}" if cache else ""))
    try:
        server.serve()
    finally:
        server.close()
    return 0
