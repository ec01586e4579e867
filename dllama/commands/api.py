"""``api``: the OpenAI-compatible HTTP server (Starlette on uvicorn) around one loaded model."""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
from pathlib import Path

from dllama.commands.common import info, load_session
from dllama.errors import DllamaError


def _listen(host: str, port: int) -> socket.socket:
    """Our own listening socket, so that a busy port is a one-line error before the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise DllamaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """Every key of --api-key and --api-key-file (none: the API is open)."""
    keys = list(args.api_key or [])
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DllamaError(f"--api-key-file {args.api_key_file}: {getattr(e, 'strerror', None) or e}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if len(keys) == len(args.api_key or []):
            raise DllamaError(f"--api-key-file {args.api_key_file}: no key in it")
    for key in keys:
        if not key or any(c.isspace() for c in key) or not key.isprintable():
            raise DllamaError("an API key must be printable text without spaces")
    return tuple(dict.fromkeys(keys))


def check_tls(args: argparse.Namespace) -> None:
    """Certificate and key both or neither, readable and matching: one line now, not a traceback later."""
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise DllamaError("--ssl-certfile and --ssl-keyfile go together")
    if args.ssl_certfile is None:
        return
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    except (OSError, ssl.SSLError) as e:
        raise DllamaError(f"--ssl-certfile/--ssl-keyfile: {getattr(e, 'strerror', None) or e}") from None


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from dllama.commands.http_extras import OncePerMinute
    from dllama.commands.openai_app import Api
    from dllama.engine.chat_template import (
        ChatTemplateError,
        end_of_turn_ids,
        template_for,
    )
    from dllama.engine.batching import BatchEngine

    keys = api_keys(args)
    check_tls(args)
    sock = _listen(args.host, args.port)
    session = load_session(args)
    try:
        try:
            template = template_for(session.tokenizer, args.chat_template)
        except ChatTemplateError as e:
            if args.chat_template:
                raise
            template = None  # /v1/completions still works; chat requests get a clear 400
            info(f"⚠️  {e}")
        engine = BatchEngine(session, end_of_turn_ids(session.tokenizer), args.parallel, log=info)
        cors = tuple(args.cors_origin or ())
        api = Api(engine, template, args.model_id or _model_id(args, session), keys,
                  cluster=session.cluster, cors_origins=cors)
        scheme = "https" if args.ssl_certfile else "http"
        info(f"🌐 OpenAI-compatible API on {scheme}://{args.host}:{args.port}/v1 (model {api.model_id!r})"
             + (f"; {len(keys)} API key(s)" if keys else ""))
        info(f"💬 chat page on {scheme}://{args.host}:{args.port}/"
             + (f"; browsers may call the API from {', '.join(cors)}" if cors else ""))
        config = uvicorn.Config(api.app, log_level="warning", timeout_graceful_shutdown=30, lifespan="off",
                                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
        logging.getLogger("uvicorn.error").addFilter(OncePerMinute())  # set up by uvicorn.Config
        server = uvicorn.Server(config)

        def stop(sig, frame) -> None:  # Ctrl-C, SIGTERM: generations end after their current step
            server.force_exit = server.should_exit and sig == signal.SIGINT  # a second Ctrl-C: now
            server.should_exit = True
            api.shutdown()
            engine.close()

        # The model runs on this, the main, thread (numba's parallel loops start 10x faster
        # there: see engine.batching), HTTP on another. uvicorn leaves signals to us there.
        http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dllama-http", daemon=True)
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            http.start()
            engine.serve(stop=lambda: not http.is_alive())
            http.join()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        info("👋 API server stopped")
    finally:
        session.close()
        sock.close()
    return 0


def _model_id(args: argparse.Namespace, session) -> str:
    from pathlib import Path

    from dllama.commands.common import resolve_paths

    model_path, _ = resolve_paths(args)
    return Path(model_path).stem
