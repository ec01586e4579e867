"""``inference`` and ``perplexity``: one prompt through the model (on one node or a cluster)."""
from __future__ import annotations

import argparse
import sys
import time

from dllama.commands.common import encode_text, info, load_session


def _sync_counters(session) -> tuple[float, int, int]:
    if session.cluster is None:
        return 0.0, 0, 0
    s = session.cluster.sync.stats()
    return s.seconds, s.bytes_sent, s.bytes_received


def inference(args: argparse.Namespace) -> int:
    from dllama.engine.generate import Stats, format_summary
    from dllama.engine.sampler import Sampler

    session = load_session(args)
    try:
        tokenizer = session.tokenizer
        prompt = encode_text(tokenizer, args.prompt)
        sampler = Sampler(args.temperature, args.topp, args.seed)
        stats = Stats()
        out = sys.stdout
        out.write(args.prompt)
        out.flush()
        stream = tokenizer.stream()
        start = _sync_counters(session)
        last, t_last = start, time.perf_counter()
        for token in session.generate(prompt, args.steps, sampler, stats):
            text = stream.push(token)
            if args.verbose:
                now, t_now = _sync_counters(session), time.perf_counter()
                sync_ms = (now[0] - last[0]) * 1000
                info(f"🔶 {(t_now - t_last) * 1000 - sync_ms:7.1f} ms compute {sync_ms:6.1f} ms sync | "
                     f"sent {(now[1] - last[1]) / 1e3:7.1f} kB | recv {(now[2] - last[2]) / 1e3:7.1f} kB | {text!r}")
                last, t_last = now, t_now
            if text:
                out.write(text)
                out.flush()
        out.write(stream.flush() + "\n\n")
        out.write(format_summary(stats) + "\n")
        if session.cluster is not None:
            end = _sync_counters(session)
            forwards = max(1, session.cluster.sync.fwd)
            out.write("Network\n"
                      f"      nodes: {1 + len(session.cluster.link.workers)}\n"
                      f"   sync ms/forward: {(end[0] - start[0]) * 1000 / forwards:.2f}\n"
                      f"    sent kB: {(end[1] - start[1]) / 1e3:.1f}\n"
                      f"    recv kB: {(end[2] - start[2]) / 1e3:.1f}\n")
        out.flush()
    finally:
        session.close()
    return 0


def perplexity(args: argparse.Namespace) -> int:
    session = load_session(args)
    try:
        tokens = encode_text(session.tokenizer, args.prompt)
        print(f"perplexity: {session.perplexity(tokens):.4f}")
    finally:
        session.close()
    return 0


def main(args: argparse.Namespace) -> int:
    return inference(args) if args.command == "inference" else perplexity(args)
