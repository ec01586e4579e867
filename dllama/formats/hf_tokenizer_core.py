"""What a Hugging Face tokenizer file gives (``TokenizerCore``), before the config files complete it.

``hf_tokenizer_json`` (``tokenizer.json``) and ``sentencepiece_model`` (``tokenizer.model``) each
make one; ``hf_tokenizer`` adds what ``tokenizer_config.json`` says and writes ``TokenizerData``.
The few helpers all three use live here too, so that none of them imports another's internals.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dllama.errors import FormatError
from dllama.formats.tfile import MAX_VOCAB_SIZE

# distributed-llama merges only pairs scoring above -1e10.
UNMERGEABLE_SCORE = -1e10
SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte pieces, <0x00>..<0xFF>


@dataclass
class TokenizerCore:
    """What the tokenizer file gives; the config files complete it."""

    tokens: dict[int, bytes]
    scores: dict[int, float]
    kind: str
    by_text: dict[str, int]  # token text (as the config files spell it) -> id
    special: set[int] = field(default_factory=set)
    added: set[int] = field(default_factory=set)
    lstrip: set[int] = field(default_factory=set)
    rstrip: set[int] = field(default_factory=set)
    pre: str | None = None
    merges: list[tuple[int, int]] = field(default_factory=list)
    normalizer: str | None = None
    ignore_merges: bool | None = None
    add_space_prefix: bool = False
    prepend_scheme: str | None = None
    default_bos: int = -1
    default_eos: int = -1
    default_add_bos: bool = False
    template_first: str | None = None  # the special token the post-processor puts first
    from_model: bool = False  # read from a tokenizer.model


def load_json(path: Path):
    """The JSON document in ``path`` (FormatError naming the file when it is unreadable or not JSON)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise FormatError(f"{path}: not valid JSON: {one_line(str(e))}") from None


def one_line(text: str) -> str:
    """``text`` with its white space (line breaks too) collapsed: error messages stay one line."""
    return " ".join(text.split())


def is_id(x) -> bool:
    """Whether ``x`` can be a token id (an int, not a bool, below ``MAX_VOCAB_SIZE``)."""
    return type(x) is int and 0 <= x < MAX_VOCAB_SIZE
