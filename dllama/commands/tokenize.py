"""``tokenize``: the token ids of a text, as the model sees plain text."""
from __future__ import annotations

import argparse
import json
import sys

from dllama.commands.common import encode_text, load_tokenizer, resolve_paths
from dllama.errors import DllamaError


def main(args: argparse.Namespace) -> int:
    if args.text == "-":
        if sys.stdin is None:
            raise DllamaError("standard input is closed")
        # Bytes that are not UTF-8 still reach the tokenizer as the bytes they are.
        text = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    else:
        text = args.text
    _, tokenizer_path = resolve_paths(args, need_model=False)
    tokenizer = load_tokenizer(tokenizer_path)
    ids = encode_text(tokenizer, text)
    if args.json:
        # A byte-level piece may hold part of a character: show its bytes rather than U+FFFD.
        pieces = [tokenizer.piece(i).decode("utf-8", errors="backslashreplace") for i in ids]
        print(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))
    return 0
