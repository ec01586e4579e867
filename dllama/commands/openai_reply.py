"""What a request's events add up to in the OpenAI API's shapes: the choices of a whole reply or
of each streamed chunk, with log-probabilities as chat (``content`` entries) or completions
(parallel lists) report them."""
from __future__ import annotations

from dataclasses import dataclass

from dllama.engine.completion import Done, Ended, Event, Piece, PromptLogprobs, Request
from dllama.engine.logprobs import TokenLogprob


@dataclass
class Job:
    """A checked request, ready to queue."""

    request: Request
    stream: bool
    include_usage: bool
    chat: bool
    echo_text: str = ""  # completions with echo: the prompt, which the text starts with



class Reply:
    """What a request's events add up to, as OpenAI's choices (whole, or chunk by chunk)."""

    def __init__(self, job: Job, tokenizer, usage_log: dict | None):
        self.job = job
        self.tokenizer = tokenizer
        self.usage_log = usage_log
        n = job.request.n
        self.texts = [job.echo_text] * n
        self.finish: list[str | None] = [None] * n
        self.logprobs: list[list[TokenLogprob | None]] = [[] for _ in range(n)]
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self.tokens = [0] * n  # generated so far, per choice

    def log_usage(self) -> None:
        """The access log's figures of a stream cut short (an ended one logs its usage)."""
        if self.usage_log is not None and "completion_tokens" not in self.usage_log:
            self.usage_log.update(prompt_tokens=len(self.job.request.prompt), completion_tokens=sum(self.tokens))

    def opening(self) -> list[dict]:
        """The chunks a stream starts with: the role (chat), the echoed prompt (completions)."""
        job = self.job
        if job.chat:
            return [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                     "logprobs": None} for i in range(job.request.n)]
        if job.echo_text and not job.request.logprobs:  # with logprobs, the prompt's come with them
            return [{"index": i, "text": job.echo_text, "finish_reason": None, "logprobs": None}
                    for i in range(job.request.n)]
        return []

    def add(self, event: Event) -> list[dict]:
        """Take an event in; the stream chunks it makes."""
        job = self.job
        if isinstance(event, PromptLogprobs):
            self.prompt_logprobs = event.entries
            return [] if job.chat else self._echo_chunks()
        if isinstance(event, Ended):
            if self.usage_log is not None:
                self.usage_log.update(prompt_tokens=event.outcomes[0].prompt_tokens,
                                      completion_tokens=sum(o.completion_tokens for o in event.outcomes),
                                      queue_seconds=event.outcomes[0].queue_seconds)
            return []
        if isinstance(event, Done):
            self.finish[event.choice] = event.finish_reason
            if job.chat:
                return [{"index": event.choice, "delta": {}, "finish_reason": event.finish_reason, "logprobs": None}]
            return [{"index": event.choice, "text": "", "finish_reason": event.finish_reason, "logprobs": None}]
        assert isinstance(event, Piece)
        i = event.choice
        self.tokens[i] = event.tokens
        offset = len(self.texts[i])
        self.texts[i] += event.text
        self.logprobs[i] += event.logprobs
        logprobs = None
        if job.request.logprobs is not None:
            logprobs = (self._chat_logprobs(event.logprobs) if job.chat else
                        self._legacy_logprobs(event.logprobs, offset))
        if job.chat:
            return [{"index": i, "delta": {"content": event.text}, "finish_reason": None, "logprobs": logprobs}]
        return [{"index": i, "text": event.text, "finish_reason": None, "logprobs": logprobs}]

    def _echo_chunks(self) -> list[dict]:
        """Completions with echo and logprobs: every choice's prompt text with its tokens'
        log-probabilities."""
        logprobs = self._legacy_logprobs(self.prompt_logprobs, 0)
        return [{"index": i, "text": self.job.echo_text, "finish_reason": None, "logprobs": logprobs}
                for i in range(self.job.request.n)]

    def choices(self) -> list[dict]:
        job, out = self.job, []
        for i in range(job.request.n):
            logprobs = None
            if job.request.logprobs is not None:
                if job.chat:
                    logprobs = self._chat_logprobs(self.logprobs[i])
                else:
                    entries = (self.prompt_logprobs if job.echo_text else []) + self.logprobs[i]
                    logprobs = self._legacy_logprobs(entries, 0)
            if job.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": self.texts[i]},
                            "finish_reason": self.finish[i], "logprobs": logprobs})
            else:
                out.append({"index": i, "text": self.texts[i], "finish_reason": self.finish[i], "logprobs": logprobs})
        return out

    def _piece(self, token: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.piece(token)
        return raw.decode("utf-8", "replace"), list(raw)

    def _chat_logprobs(self, entries: list) -> dict:
        def one(token: int, logprob: float) -> dict:
            text, raw = self._piece(token)
            return {"token": text, "logprob": logprob, "bytes": raw}

        return {"content": [dict(one(e.token, e.logprob), top_logprobs=[one(t, lp) for t, lp in e.top])
                            for e in entries], "refusal": None}

    def _legacy_logprobs(self, entries: list, offset: int) -> dict:
        """Completions' shape: parallel lists; the prompt's first token has no log-probability."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        prompt = self.job.request.prompt
        for k, e in enumerate(entries):
            token = e.token if e is not None else prompt[0]
            text = self._piece(token)[0]
            tokens.append(text)
            token_logprobs.append(None if e is None else e.logprob)
            top.append(None if e is None else {self._piece(t)[0]: lp for t, lp in e.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
