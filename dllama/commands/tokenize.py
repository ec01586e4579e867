"""``tokenize``: the token ids of a text, as the model sees plain text."""
from __future__ import annotations

import argparse
import json
import sys

from dllama.commands.common import load_tokenizer, resolve_paths


def main(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    _, tokenizer_path = resolve_paths(args, need_model=False)
    tokenizer = load_tokenizer(tokenizer_path)
    ids = tokenizer.encode(text)
    if args.json:
        pieces = [tokenizer.piece(i).decode("utf-8", errors="replace") for i in ids]
        print(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))
    return 0
