"""``inference`` and ``perplexity``: one prompt through the model."""
from __future__ import annotations

import argparse
import sys

from dllama.commands.common import encode_text, load_session


def inference(args: argparse.Namespace) -> int:
    from dllama.engine.generate import Stats, format_summary
    from dllama.engine.sampler import Sampler

    session = load_session(args)
    tokenizer = session.tokenizer
    prompt = encode_text(tokenizer, args.prompt)
    sampler = Sampler(args.temperature, args.topp, args.seed)
    stats = Stats()
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    stream = tokenizer.stream()
    for token in session.generate(prompt, args.steps, sampler, stats):
        text = stream.push(token)
        if text:
            out.write(text)
            out.flush()
    out.write(stream.flush() + "\n\n")
    out.write(format_summary(stats) + "\n")
    out.flush()
    return 0


def perplexity(args: argparse.Namespace) -> int:
    session = load_session(args)
    tokens = encode_text(session.tokenizer, args.prompt)
    print(f"perplexity: {session.perplexity(tokens):.4f}")
    return 0


def main(args: argparse.Namespace) -> int:
    return inference(args) if args.command == "inference" else perplexity(args)
