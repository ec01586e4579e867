"""``python -m dllama``: the command line. Each subcommand lives in a module of its own, the flags
in ``parser``; ``main`` dispatches to the subcommand and turns its errors into one line.

Nothing heavy is imported before the arguments are parsed: ``--nthreads`` must reach the
environment before NumPy starts its thread pools.
"""
from __future__ import annotations

import os
import sys

from dllama.commands.parser import build_parser, check_ranges
from dllama.errors import DllamaError


def _set_threads(n: int | None) -> None:
    if n is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(n)


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "launch":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.passthrough = extra  # launch hands the flags it does not know to the command it runs
    if args.command is None:
        parser.print_help()
        return 2
    check_ranges(parser, args)
    _set_threads(getattr(args, "nthreads", None))
    if args.command == "worker" or getattr(args, "workers", None):
        # Nodes may share a machine's cores: kernel threads that wait must sleep, not spin.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        if args.command in ("inference", "perplexity"):
            from dllama.commands import run

            return run.main(args)
        if args.command == "chat":
            from dllama.commands import chat

            return chat.main(args)
        if args.command == "api":
            from dllama.commands import api

            return api.main(args)
        if args.command == "worker":
            from dllama.commands import worker

            return worker.main(args)
        if args.command == "keygen":
            from dllama.commands import keygen

            return keygen.main(args)
        if args.command == "tokenize":
            from dllama.commands import tokenize

            return tokenize.main(args)
        if args.command == "launch":
            from dllama.commands import launch

            return launch.main(args)
        from dllama.commands import convert

        return convert.main(args)
    except DllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory (lower --max-seq-len, or use a smaller model)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); silence the interpreter's flush at exit too.
        sys.stdout = open(os.devnull, "w")
        return 0
