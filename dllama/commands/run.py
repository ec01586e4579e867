"""``inference`` and ``perplexity``: one prompt through the model (on one node or a cluster).

The generated text goes to stdout, everything else (start-up lines, ``--verbose`` per-token
lines, warnings) to stderr, so the text can be piped. ``--stats-json FILE`` writes the
per-token numbers and the totals as JSON (what ``bench/`` reads).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dllama.commands.common import encode_text, info, load_session
from dllama.errors import DllamaError


@dataclass
class TokenStats:
    """One generated token: the time since the previous one (the first: since the prompt's
    evaluation began), split into the cluster's sync and the rest, and the bytes that moved."""

    compute_ms: float
    sync_ms: float
    sent_bytes: int
    recv_bytes: int
    unix: float  # when it was ready (wall clock: to line up with events outside, such as a fault)


class TokenMeter:
    """Differences of the clock and the cluster's counters between consecutive ticks (one per
    generated token, and one for the forward that gave the end token), from the generation's start."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.tokens: list[TokenStats] = []
        self._start = self._last = self._now()

    def _now(self):
        return time.perf_counter(), self.cluster.stats() if self.cluster is not None else None

    def tick(self) -> TokenStats:
        now = self._now()
        (t0, before), (t1, after) = self._last, now
        if after is None:
            stats = TokenStats((t1 - t0) * 1000, 0.0, 0, 0, time.time())
        else:
            d = after.since(before)
            stats = TokenStats((t1 - t0 - d.sync_seconds) * 1000, d.sync_seconds * 1000, d.bytes_sent,
                               d.bytes_received, time.time())
        self.tokens.append(stats)
        self._last = now
        return stats

    def network(self):
        """The cluster's counters since the generation began (the session's start sent the weights),
        or None on one node."""
        return self.cluster.stats().since(self._start[1]) if self.cluster is not None else None


def _stats_json(session, outcome, meter: TokenMeter, first_token_unix: float | None, text: str) -> dict:
    network = meter.network()
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "generated_tokens": outcome.completion_tokens,
        "finish_reason": outcome.finish_reason,
        # The prompt's evaluation (up to the first token), then one entry per decode forward.
        "prompt": asdict(meter.tokens[0]) if meter.tokens else None,
        "tokens": [asdict(t) for t in meter.tokens[1:]],
        "totals": {"eval_tokens": outcome.eval_tokens, "eval_seconds": outcome.eval_seconds,
                   "eval_tok_s": outcome.eval_tok_s, "pred_tokens": outcome.pred_tokens,
                   "pred_seconds": outcome.pred_seconds, "pred_tok_s": outcome.pred_tok_s,
                   "seconds_to_first_token": outcome.seconds_to_first_token,
                   "first_token_unix": first_token_unix},
        "network": None if network is None else {
            "nodes": network.nodes, "forwards": network.forwards, "sync_seconds": network.sync_seconds,
            "sent_bytes": network.bytes_sent, "recv_bytes": network.bytes_received,
            "weights": [asdict(t) for t in session.cluster.transfers],
            # Workers lost and taken back: what each change cost (seconds), and when it was noticed.
            "changes": [asdict(r) for r in session.cluster.recoveries]},
        "text": text,
    }


def _stats_path(name: str | None) -> Path | None:
    """``--stats-json``'s file, checked before the model loads: a folder that cannot take it is a
    one-line error at once. The file itself is written whole at the end (an existing one is
    replaced only then)."""
    if name is None:
        return None
    path = Path(name)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DllamaError(f"cannot write --stats-json {name}: it is a folder")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise DllamaError(f"cannot write --stats-json {name}: {folder} is not a writable folder")
    return path


def inference(args: argparse.Namespace) -> int:
    from dllama.engine.sampler import Sampler
    from dllama.engine.session import Outcome, format_summary, tokens_for_steps
    from dllama.formats.atomic import write_bytes_atomic

    stats_path = _stats_path(args.stats_json)
    session = load_session(args)
    try:
        tokenizer = session.tokenizer
        prompt = encode_text(tokenizer, args.prompt)
        max_tokens = tokens_for_steps(len(prompt), args.steps, session.seq_len)  # before the prompt is echoed
        if args.steps > session.seq_len:
            info(f"💡 --steps {args.steps} capped at the context of {session.seq_len} positions "
                 f"(--max-seq-len raises it, up to the model's length)")
        sampler = Sampler(args.temperature, args.topp, args.seed)
        outcome = Outcome()
        out = sys.stdout
        out.write(args.prompt)
        out.flush()
        stream = tokenizer.stream()
        meter = TokenMeter(session.cluster)
        first_token_unix = None
        generated = []
        for token in session.generate(prompt, sampler, outcome, max_tokens=max_tokens):
            first_token_unix = first_token_unix or time.time()
            text = stream.push(token)
            stats = meter.tick()
            if args.verbose:
                info(f"🔶 {stats.compute_ms:7.1f} ms compute {stats.sync_ms:6.1f} ms sync | "
                     f"sent {stats.sent_bytes / 1e3:7.1f} kB | recv {stats.recv_bytes / 1e3:7.1f} kB | {text!r}")
            if text:
                generated.append(text)
                out.write(text)
                out.flush()
        if outcome.finish_reason == "stop" and not outcome.cancelled:
            meter.tick()  # the forward whose logits gave the end token
        tail = stream.flush()
        generated.append(tail)
        out.write(tail + "\n\n")
        out.write(format_summary(outcome) + "\n")
        network = meter.network()
        if network is not None:
            out.write("Network\n"
                      f"      nodes: {network.nodes}\n"
                      f"   sync ms/forward: {network.sync_seconds * 1000 / max(1, network.forwards):.2f}\n"
                      f"    sent kB: {network.bytes_sent / 1e3:.1f}\n"
                      f"    recv kB: {network.bytes_received / 1e3:.1f}\n")
        out.flush()
        if stats_path is not None:
            data = _stats_json(session, outcome, meter, first_token_unix, "".join(generated))
            try:
                write_bytes_atomic(stats_path, json.dumps(data, indent=1).encode())
            except OSError as e:
                raise DllamaError(f"cannot write --stats-json {stats_path}: {e.strerror or e}") from None
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
