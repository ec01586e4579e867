"""What ``api`` serves besides the OpenAI routes: the chat page at ``/``, CORS for browser
clients on other origins (``--cors-origin``), and one access log line per request."""
from __future__ import annotations

import logging
import time
from functools import lru_cache
from importlib.resources import files
from typing import Callable, Sequence

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from dllama.commands.common import info

# The page is inline HTML, CSS and JavaScript: it may load nothing from anywhere (so it works
# offline, and a mistake cannot leak a conversation) and talk to this server only.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@lru_cache(maxsize=1)
def _page() -> bytes:
    return files("dllama.commands").joinpath("chat_page.html").read_bytes()


async def chat_page(request: Request) -> Response:
    """``GET /``: needs no key (it holds no data); the page asks for one when the API does."""
    return Response(_page(), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                             "Cache-Control": "no-cache"})


def middleware(cors_origins: Sequence[str] = ()) -> list[Middleware]:
    """The app's middleware, outermost first: the access log sees every request, preflights too."""
    stack = [Middleware(AccessLog)]
    if cors_origins:
        stack.append(Middleware(
            CORSMiddleware,
            allow_origins=["*"] if "*" in cors_origins else list(cors_origins),  # checked by parser.py
            allow_methods=["GET", "POST"],
            # Bearer keys, not cookies: no credentials. Any request header: the OpenAI JavaScript
            # client adds its own x-stainless-* headers to Authorization and Content-Type.
            allow_headers=["*"],
            max_age=600,
        ))
    return stack


def _figure(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def _printable(text: str, limit: int = 200) -> str:
    """A path as one log line shows it: a decoded %0A in it must not start a forged line."""
    text = text[:limit]
    return "".join(c if c.isprintable() and c != " " else f"\\x{ord(c):02x}" for c in text)


class AccessLog:
    """Pure ASGI, so that a streamed reply is logged when its last byte has gone (a
    ``BaseHTTPMiddleware`` would log when the stream starts). The generation handlers write
    their figures into ``request.state.usage_log`` (prompt_tokens, completion_tokens,
    queue_seconds) while they run; figures they did not write show as ``-``."""

    def __init__(self, app, say: Callable[[str], None] = info):
        self.app, self.say = app, say

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        usage: dict = {}
        # A dict of this request's own: Starlette's request.state reads scope["state"], which a
        # server may have filled from a dict shared by every request.
        scope["state"] = {**(scope.get("state") or {}), "usage_log": usage}
        seen = {"status": None, "finished": False, "left": False}

        async def send_and_watch(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seen["finished"] = True
            await send(message)

        async def receive_and_watch():
            message = await receive()
            if message["type"] == "http.disconnect":
                seen["left"] = True
            return message

        try:
            await self.app(scope, receive_and_watch, send_and_watch)
        except BaseException:
            seen["status"] = seen["status"] or 500  # Starlette's error middleware answers 500
            raise
        finally:
            self.say(self._line(scope, seen, usage, time.monotonic() - start))

    @staticmethod
    def _line(scope, seen: dict, usage: dict, seconds: float) -> str:
        """Its time is when the reply ended, as the line is written (lines stay in time order)."""
        line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} {scope['method']} {_printable(scope['path'])} "
                f"{_figure(seen['status'])} in={_figure(usage.get('prompt_tokens'))} "
                f"out={_figure(usage.get('completion_tokens'))} {seconds:.2f}s "
                f"wait={_figure(usage.get('queue_seconds'), '{:.2f}s')}")
        if seen["status"] is not None and not seen["finished"]:  # a stream cut short
            line += " (client left)" if seen["left"] else " (unfinished)"
        return line


class OncePerMinute(logging.Filter):
    """Lets each distinct message through once a minute, and says how many it held back: uvicorn
    warns once per malformed request ("Invalid HTTP request received."), so a stranger sending
    garbage would otherwise write the log as fast as it sends."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.clock = clock
        self.last: dict[str, tuple[float, int]] = {}  # message -> (when let through, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        message, now = record.getMessage(), self.clock()
        when, held = self.last.get(message, (None, 0))
        if when is not None and now - when < 60:
            self.last[message] = (when, held + 1)
            return False
        if len(self.last) > 1000:  # distinct messages from strangers: keep the table bounded
            self.last.clear()
        self.last[message] = (now, 0)
        if held:
            record.msg, record.args = f"{message} ({held} more like it in the last minute)", None
        return True
