"""The OpenAI-compatible HTTP API as a Starlette app (served by uvicorn in ``commands.api``).

Requests run together on the batching engine (``engine.batching``: up to ``--parallel`` at once,
the rest wait in arrival order). A request is checked completely (JSON, parameters, template,
context length) before it queues, so a bad request never touches the model. A client that goes
away ends its generation at the engine's next step and frees its slot.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dllama.commands.http_extras import chat_page, middleware
from dllama.engine.chat_template import ChatTemplate, ChatTemplateError
from dllama.engine.batching import BatchEngine, Unavailable
from dllama.engine.cluster import CLUSTER_FAILURES
from dllama.commands.openai_reply import Job, Reply
from dllama.engine.completion import Ended, Event, Failed, Request
from dllama.engine.logprobs import MAX_TOP_CHAT, MAX_TOP_COMPLETIONS
from dllama.engine.session import ContextFull, Outcome
from dllama.errors import DllamaError

MAX_BODY_BYTES = 4 << 20
MAX_STOPS = 4


class _ClosingStream(StreamingResponse):
    """A stream that ends its generation however the response ends: it closes its generator (a
    client that stops reading may cancel us inside ``send``, where the generator would
    otherwise wait for garbage collection), then calls ``release``."""

    def __init__(self, content, release: Callable[[], None], **kw):
        super().__init__(content, **kw)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.release()


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error object. A request refused before its body is read (no key, too large) also
    closes the connection: the server does not take in the rest of a stranger's upload."""
    headers = {"Connection": "close"} if status in (401, 413) else None
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


# -- parameters ------------------------------------------------------------------------------------
def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:  # nan fails too
        raise ApiError(400, f"{name} must be a number in [{lo}, {hi}]", param=name)
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be an integer in [{lo}, {hi}]", param=name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) for s in stop):
        return stop
    raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings", param="stop")


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{name} must be a boolean", param=name)
    return bool(value)


def _sampling(body: dict, chat: bool, parallel: int) -> dict:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= parallel):
        raise ApiError(400, f"n must be an integer in [1, {parallel}] (the server's --parallel)", param="n")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "stream_options must be an object with a boolean include_usage", param="stream_options")
    if chat:  # logprobs: true, top_logprobs: 0..20
        top = _integer(body, "top_logprobs", 0, MAX_TOP_CHAT)
        wanted = _boolean(body, "logprobs")
        if top is not None and not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs, echo = (top or 0) if wanted else None, False
    else:  # logprobs: 0..5 alternatives; echo: the prompt too
        logprobs, echo = _integer(body, "logprobs", 0, MAX_TOP_COMPLETIONS), _boolean(body, "echo")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    return {
        "temperature": 0.0 if top_p == 0 else _number(body, "temperature", 1.0, 0.0, 2.0),  # top_p 0: the top token
        "top_p": top_p or 1.0,
        "seed": None if (seed := _integer(body, "seed", -(2**63), 2**64 - 1)) is None else seed % 2**64,
        "stop": _stop(body),
        "stream": stream,
        "include_usage": bool(options and options.get("include_usage")),
        "n": n or 1,
        "logprobs": logprobs,
        "echo": echo,
    }


# -- the app --------------------------------------------------------------------------------------
class Api:
    def __init__(self, engine: BatchEngine, template: ChatTemplate | None, model_id: str, api_keys: tuple[str, ...],
                 cluster=None, cors_origins: tuple[str, ...] = ()):
        self.engine = engine
        self.tokenizer = engine.session.tokenizer
        self.seq_len = engine.session.seq_len
        self.template = template
        self.model_id = model_id
        self.api_keys = tuple(k.encode() for k in api_keys)  # none: no key needed
        self.cluster = cluster  # engine.cluster.Cluster, or None on one node
        self.down: str | None = None  # why the model can no longer run (a worker failed, shutting down)
        self.generations: set[threading.Event] = set()  # the cancel events of running generations
        self.created = int(time.time())
        tokenizer = self.tokenizer
        self.max_piece_bytes = max(1, max(len(tokenizer.piece(i)) for i in range(tokenizer.vocab_size)))
        self.app = Starlette(routes=[
            Route("/", chat_page, methods=["GET"]),  # the chat page (http_extras), served without a key
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ], middleware=middleware(cors_origins),  # access log, CORS (http_extras)
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})

    # -- plumbing ------------------------------------------------------------------------------
    async def _http_error(self, request: HttpRequest, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")
        if exc.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}",
                                  code="method_not_allowed")
        return error_response(exc.status_code, str(exc.detail))

    async def _internal_error(self, request: HttpRequest, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def _check_key(self, request: HttpRequest) -> None:
        if not self._key_ok(request):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def _key_ok(self, request: HttpRequest) -> bool:
        if not self.api_keys:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        ok = False
        for key in self.api_keys:  # every key compared, in constant time: no timing says which or how close
            ok |= hmac.compare_digest(given, key)
        return ok and scheme.lower() == "bearer"

    def shutdown(self) -> None:
        """The server is stopping: running generations end after their current token, so that
        their clients get a complete (shortened) reply instead of a cut connection."""
        self.down = "the server is shutting down"
        for cancel in list(self.generations):
            cancel.set()

    def _check_up(self) -> None:
        """503 once the model cannot run (the engine's thread watches the cluster)."""
        if self.down is None and self.engine.broken is not None:
            self.down = self.engine.broken
        if self.down is not None:
            raise ApiError(503, f"the model is unavailable: {self.down}", "server_error", code="unavailable")

    async def _body(self, request: HttpRequest) -> dict:
        length = request.headers.get("content-length", "")
        if length.isdecimal() and int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    # -- routes --------------------------------------------------------------------------------
    async def health(self, request: HttpRequest) -> Response:
        """Anyone gets the status (for load balancers and the chat page); the details (nodes,
        addresses, load) only with a valid key, where keys are required."""
        try:
            self._check_up()
            ok = True
        except ApiError:
            ok = False
        if not self._key_ok(request):
            return JSONResponse({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)
        cluster = self.cluster.health() if self.cluster is not None else None
        nodes = 1 if cluster is None else len(cluster["nodes"])
        up = 1 if cluster is None else cluster["nodes_up"]
        engine = self.engine
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": self.model_id, "model_loaded": True,
                             "nodes": nodes, "nodes_connected": up if ok else None,
                             "cluster": cluster,
                             "generation": f"up to {engine.parallel} requests at once in one batch; "
                                           f"others wait in arrival order",
                             "parallel": engine.parallel, "running": engine.active,
                             "busy": engine.active > 0, "waiting": engine.waiting, "error": self.down},
                            200 if ok else 503)

    def _model_object(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dllama"}

    async def models(self, request: HttpRequest) -> Response:
        try:
            self._check_key(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [self._model_object()]})

    async def model(self, request: HttpRequest) -> Response:
        try:
            self._check_key(request)
        except ApiError as e:
            return e.response()
        if request.path_params["model"] != self.model_id:
            return error_response(404, f"no model {request.path_params['model']!r}; this server has "
                                       f"{self.model_id!r}", param="model", code="model_not_found")
        return JSONResponse(self._model_object())

    async def chat_completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, self._chat_job)

    async def completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, self._completion_job)

    async def _generate(self, request: HttpRequest, make_job: Callable[[dict], Job]) -> Response:
        try:
            self._check_key(request)
            body = await self._body(request)
            # Templates and tokenization of a large body take a while: not on the event loop,
            # which keeps streaming the answer being generated meanwhile.
            job = await anyio.to_thread.run_sync(make_job, body)
            return await self._run(request, job)
        except ApiError as e:
            return e.response()
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening any more
        except Exception as e:  # noqa: BLE001 - an error object, not a traceback in the log
            return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    # -- requests ------------------------------------------------------------------------------
    def _limit(self, body: dict, default: int | None) -> int | None:
        limit = _integer(body, "max_completion_tokens", 1, 1 << 30)
        legacy = _integer(body, "max_tokens", 1, 1 << 30)
        return limit if limit is not None else legacy if legacy is not None else default

    def _tokens(self, text: str, chat: bool) -> list[int]:
        """The prompt's tokens; a text too long for the context is refused before the (slow)
        tokenization: no token spans more than the longest piece's bytes."""
        if len(text.encode("utf-8", "replace")) >= self.seq_len * self.max_piece_bytes:
            raise ApiError(400, f"the prompt does not fit the context of {self.seq_len} tokens "
                                f"(the server's --max-seq-len)", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        tokenizer = self.tokenizer
        return tokenizer.encode(text, add_bos=False, allow_special=True) if chat else tokenizer.encode(text)

    def _job(self, prompt: list[int], body: dict, chat: bool, default_limit: int | None, echo_text: str = "") -> Job:
        params = _sampling(body, chat, self.engine.parallel)
        limit = self._limit(body, default_limit)
        if not prompt:
            raise ApiError(400, "the prompt has no tokens", param="messages" if chat else "prompt")
        if len(prompt) >= self.seq_len:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the context holds {self.seq_len} "
                                f"(the server's --max-seq-len)", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        request = Request(prompt, limit, params["temperature"], params["top_p"], params["seed"], params["stop"],
                          n=params["n"], logprobs=params["logprobs"], echo=params["echo"])
        return Job(request, params["stream"], params["include_usage"], chat, echo_text if params["echo"] else "")

    def _chat_job(self, body: dict) -> Job:
        if self.template is None:
            raise ApiError(400, "this model has no chat template (start the server with --chat-template FILE)")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        return self._job(self._tokens(text, chat=True), body, chat=True, default_limit=None)

    def _completion_job(self, body: dict) -> Job:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        return self._job(self._tokens(prompt, chat=False), body, chat=False, default_limit=16, echo_text=prompt)

    def _usage(self, outcomes: list[Outcome]) -> dict:
        prompt = outcomes[0].prompt_tokens  # evaluated once for every choice
        completion = sum(o.completion_tokens for o in outcomes)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": outcomes[0].cached_tokens}}

    def _fail(self, e: BaseException) -> ApiError:
        if isinstance(e, ContextFull):
            return ApiError(400, str(e), code="context_length_exceeded")
        if isinstance(e, (Unavailable, *CLUSTER_FAILURES)) or self.engine.broken is not None:
            self.down = self.down or self.engine.broken or str(e)
            return ApiError(503, f"the model is unavailable: {self.down}", "server_error", code="unavailable")
        if isinstance(e, DllamaError):
            return ApiError(400, str(e))
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    async def _run(self, request: HttpRequest, job: Job) -> Response:
        """Queue the job on the engine; answer once its first event is in (so that a failure
        before any text is still an HTTP error), streaming or whole."""
        rid = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        self._check_up()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        def emit(event: Event) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (the server stopped): nobody listens
                cancel.set()

        try:
            self.engine.submit(job.request, emit, cancel)
        except Exception as e:  # noqa: BLE001 - reported as an error object
            return self._fail(e).response()
        self.generations.add(cancel)
        usage_log = getattr(request.state, "usage_log", None)
        reply = Reply(job, self.tokenizer, usage_log)
        watcher = asyncio.create_task(self._watch(request, cancel))
        try:
            first = await events.get()
        except BaseException:
            watcher.cancel()
            cancel.set()
            self.generations.discard(cancel)
            raise
        if isinstance(first, Failed):
            watcher.cancel()
            self.generations.discard(cancel)
            return self._fail(first.error).response()

        def end() -> None:
            reply.log_usage()
            watcher.cancel()
            cancel.set()  # a client that left: the engine frees its slots at its next step
            self.generations.discard(cancel)

        if job.stream:
            return _ClosingStream(self._stream(reply, first, events, rid, created), end,
                                  media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            event = first
            while not isinstance(event, (Ended, Failed)):
                reply.add(event)
                event = await events.get()
        finally:
            end()
        if isinstance(event, Failed):
            return self._fail(event.error).response()
        reply.add(event)
        kind = "chat.completion" if job.chat else "text_completion"
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": self.model_id,
                             "choices": reply.choices(), "usage": self._usage(event.outcomes)})

    async def _watch(self, request: HttpRequest, cancel: threading.Event) -> None:
        """Stop a generation whose client has gone (a stream notices on its own when it writes)."""
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.25)

    def _event_line(self, job: Job, rid: str, created: int, choices: list[dict], usage: Any = False) -> str:
        data: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if job.chat else "text_completion",
                                "created": created, "model": self.model_id, "choices": choices}
        if usage is not False:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def _stream(self, reply: Reply, first: Event, events: asyncio.Queue, rid: str,
                      created: int) -> AsyncIterator[str]:
        """The reply's events (``_ClosingStream`` ends the generation however the stream ends)."""
        job = reply.job
        usage_field = None if job.include_usage else False
        for chunk in reply.opening():
            yield self._event_line(job, rid, created, [chunk], usage_field)
        event = first
        while True:
            if isinstance(event, Ended):
                reply.add(event)
                if job.include_usage:
                    yield self._event_line(job, rid, created, [], self._usage(event.outcomes))
                break
            if isinstance(event, Failed):
                error = json.loads(self._fail(event.error).response().body)
                yield f"data: {json.dumps(error)}\n\n"
                break
            for chunk in reply.add(event):
                yield self._event_line(job, rid, created, [chunk], usage_field)
            event = await events.get()
        yield "data: [DONE]\n\n"
