"""``chat``: a conversation in the terminal (or through a pipe), kept in the KV cache so each
turn evaluates only its new tokens."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from dllama.commands.common import info, load_session


def _read(prompt: str) -> str | None:
    """A line of input; None at end of input (Ctrl-D, or the pipe is done)."""
    if sys.stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


class _ctrl_c_stops:
    """While an answer streams, Ctrl-C asks the generation to stop after the current token,
    instead of interrupting a forward pass (on a cluster that would leave the workers
    mid-step)."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel

    def __enter__(self) -> None:
        self.previous = signal.signal(signal.SIGINT, lambda *_: self.cancel.set())

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def _start_over(out, tokens: int, seq_len: int) -> bool:
    """Whether to drop the conversation: asked on a terminal; with piped input (where the next
    line is a message, not an answer) always."""
    out.write(f"\n⚠️  The conversation ({tokens} tokens) no longer fits the context of {seq_len} tokens. ")
    if not sys.stdin.isatty():
        out.write("Starting over.\n")
        return True
    out.write("Start over? [Y/n] ")
    out.flush()
    try:
        answer = _read("")
    except KeyboardInterrupt:
        return False
    return answer is not None and answer.strip().lower() in ("", "y", "yes")


def main(args: argparse.Namespace) -> int:
    from dllama.engine.chat_template import ChatTemplateError, end_of_turn_ids, template_for
    from dllama.engine.batching import Completer
    from dllama.engine.completion import Request
    from dllama.engine.session import Outcome

    session = load_session(args)
    try:
        template = template_for(session.tokenizer, args.chat_template)
        completer = Completer(session, end_of_turn_ids(session.tokenizer))
        system = [{"role": "system", "content": args.system}] if args.system else []
        template.render(system + [{"role": "user", "content": "hi"}])  # a template that refuses --system says so now
        messages = list(system)
        out = sys.stdout

        def tokens_of(conversation: list[dict]) -> list[int]:
            return session.tokenizer.encode(template.render(conversation), add_bos=False, allow_special=True)

        info("💬 Type a message and press Enter; Ctrl-C stops an answer, Ctrl-D (end of input) quits.")
        while True:
            try:
                line = _read("\n👱 You: ")
            except KeyboardInterrupt:
                out.write("\n")
                continue
            if line is None:
                out.write("\n")
                return 0
            if not line.strip():
                continue
            try:
                prompt = tokens_of(messages + [{"role": "user", "content": line}])
                if len(prompt) >= completer.seq_len:
                    if not _start_over(out, len(prompt), completer.seq_len):
                        continue
                    messages = list(system)
                    prompt = tokens_of(messages + [{"role": "user", "content": line}])
                    if len(prompt) >= completer.seq_len:
                        out.write(f"⚠️  This message alone ({len(prompt)} tokens) does not fit the context: "
                                  f"write a shorter one, or raise --max-seq-len.\n")
                        continue
                    out.write("🔄 Started a new conversation.\n")
            except ChatTemplateError as e:
                out.write(f"⚠️  {e}\n")
                continue
            except KeyboardInterrupt:
                out.write("\n")
                continue
            messages.append({"role": "user", "content": line})
            request = Request(prompt, args.max_tokens, args.temperature, args.topp, args.seed)
            outcome = Outcome()
            out.write("\n🤖 Assistant: ")
            out.flush()
            answer = []
            with _ctrl_c_stops(cancel := threading.Event()):
                for text in completer.complete(request, outcome, cancel):
                    answer.append(text)
                    out.write(text)
                    out.flush()
            if outcome.cancelled:
                out.write(" [stopped]")
            elif outcome.finish_reason == "length" and args.max_tokens is None:
                out.write(" [the context is full]")
            out.write("\n")
            out.flush()
            messages.append({"role": "assistant", "content": "".join(answer)})
    finally:
        if "completer" in locals():
            completer.close()
        session.close()
