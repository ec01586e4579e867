"""``worker``: serve roots, one session after another, until interrupted."""
from __future__ import annotations

import argparse

from dllama.commands.common import info


def main(args: argparse.Namespace) -> int:
    from dllama.kernels import backend
    from dllama.model.node import NodeFactory
    from dllama.transport.slice_cache import SliceCache
    from dllama.transport.worker import WorkerServer

    try:
        backend.backend()
        backend.set_threads(args.nthreads)
    except ValueError as e:
        from dllama.errors import DllamaError
        raise DllamaError(str(e)) from None
    cache = SliceCache(args.cache_dir) if args.cache_dir else None
    server = WorkerServer(NodeFactory(), args.port, args.host, cache, log=info)
    info(f"💡 Kernels: {backend.describe()}")
    info(f"💡 Listening on {args.host}:{args.port}" + (f", slice cache {args.cache_dir}" if cache else ""))
    try:
        server.serve()
    finally:
        server.close()
    return 0
