"""`--help` of every subcommand shows each option's default, or says in words what its absence means."""
import argparse
import re

import pytest

from dllama.commands import main
from dllama.commands.parser import build_parser


def _leaf_parsers(parser: argparse.ArgumentParser, argv: tuple = ()):
    """(argv of the subcommand, its parser) for every command that takes flags, nested ones too."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield argv, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, (*argv, name))


LEAVES = list(_leaf_parsers(build_parser()))


def _help_entries(text: str) -> dict[str, str]:
    """First option string -> its help entry (invocation and help, white space collapsed)."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"  (-[^\s,]+)", line)
        if m:
            current = entries.setdefault(m.group(1), [])
        elif not line.startswith("   "):  # a blank line or the epilog ends the entry
            current = None
        if current is not None:
            current.append(line)
    return {k: " ".join(" ".join(v).split()) for k, v in entries.items()}


def _shown(value) -> set[str]:
    if isinstance(value, float):
        return {str(value), f"{value:g}"}
    if isinstance(value, (list, tuple)):
        return {" ".join(map(str, value)) or "none"}
    return {str(value)}


def test_every_subcommand_is_checked():
    names = {" ".join(argv) for argv, _ in LEAVES}
    assert {"inference", "perplexity", "chat", "api", "worker", "tokenize", "launch", "convert gguf",
            "convert hf"} <= names


@pytest.mark.parametrize("argv,parser", LEAVES, ids=[" ".join(a) for a, _ in LEAVES])
def test_help_shows_every_default(argv, parser, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "default: None" not in text and "default: False" not in text
    entries = _help_entries(text)
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS or action.required:
            continue
        entry = entries[action.option_strings[0]]
        if action.default is None:
            if action.nargs != 0:  # a flag that takes a value: what leaving it out does is said in words
                assert "default" in entry, entry
        elif action.default is not False:
            assert any(f"(default: {v})" in entry for v in _shown(action.default)), entry
