"""The OpenAI-compatible HTTP API as a Starlette app (served by uvicorn in ``commands.api``).

One generation runs at a time; requests wait their turn in arrival order (an asyncio lock
wakes waiters first come, first served). A request is checked completely (JSON, parameters,
template, context length) before it queues, so a bad request never touches the model. A
client that goes away stops its generation between two tokens and frees the model.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dllama.engine.chat_template import ChatTemplate, ChatTemplateError
from dllama.engine.completion import Completer, Request
from dllama.engine.session import ContextFull, Outcome
from dllama.engine.cluster import CLUSTER_FAILURES
from dllama.errors import DllamaError

MAX_BODY_BYTES = 4 << 20
MAX_STOPS = 4


class _ClosingStream(StreamingResponse):
    """A stream that holds the model's turn: it closes its generator however the response ends
    (a client that stops reading may cancel us inside ``send``, where the generator would
    otherwise wait for garbage collection to stop the generation), then gives the turn back."""

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
    """OpenAI's error object."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


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


def _sampling(body: dict) -> dict:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, "only n = 1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "stream must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "stream_options must be an object with a boolean include_usage", param="stream_options")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    return {
        "temperature": 0.0 if top_p == 0 else _number(body, "temperature", 1.0, 0.0, 2.0),  # top_p 0: the top token
        "top_p": top_p or 1.0,
        "seed": None if (seed := _integer(body, "seed", -(2**63), 2**64 - 1)) is None else seed % 2**64,
        "stop": _stop(body),
        "stream": bool(stream),
        "include_usage": bool(options and options.get("include_usage")),
    }


@dataclass
class Job:
    """A checked request, ready to queue."""

    request: Request
    stream: bool
    include_usage: bool
    chat: bool


# -- the app --------------------------------------------------------------------------------------
class Api:
    def __init__(self, completer: Completer, template: ChatTemplate | None, model_id: str, api_key: str | None,
                 cluster=None):
        self.completer = completer
        self.template = template
        self.model_id = model_id
        self.api_key = api_key
        self.cluster = cluster  # engine.cluster.Cluster, or None on one node
        self.cluster_alive: Callable[[], bool] | None = cluster.alive if cluster is not None else None
        self.down: str | None = None  # why the model can no longer run (a worker failed)
        self.turn = asyncio.Lock()
        self.waiting = 0
        self.generations: set[threading.Event] = set()  # the cancel events of running generations
        self.created = int(time.time())
        tokenizer = completer.tokenizer
        self.max_piece_bytes = max(1, max(len(tokenizer.piece(i)) for i in range(tokenizer.vocab_size)))
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})

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
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def shutdown(self) -> None:
        """The server is stopping: running generations end after their current token, so that
        their clients get a complete (shortened) reply instead of a cut connection."""
        self.down = "the server is shutting down"
        for cancel in list(self.generations):
            cancel.set()

    def _check_up(self) -> None:
        """503 once the model cannot run. The cluster's sockets are only probed while no
        generation uses them (the event loop runs this with the turn free, or held by us)."""
        if self.down is None and self.cluster_alive is not None and not self.cluster_alive():
            self.down = self.cluster.broken or "a worker of the cluster is gone"
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

    async def _take_turn(self, request: HttpRequest) -> None:
        """Wait for the model (``waiting`` counts who is queued, for /health). A client that
        left meanwhile, or a model that went down, gets its answer now, turn given back."""
        if self.down is not None:
            self._check_up()  # no point in queueing
        self.waiting += 1
        try:
            await self.turn.acquire()
        finally:
            self.waiting -= 1
        try:
            if await request.is_disconnected():
                raise ApiError(400, "the client left while waiting")
            self._check_up()
        except BaseException:
            self.turn.release()
            raise

    # -- routes --------------------------------------------------------------------------------
    async def health(self, request: HttpRequest) -> Response:
        try:
            if not self.turn.locked():
                self._check_up()
            ok = self.down is None
        except ApiError:
            ok = False
        cluster = self.cluster.health() if self.cluster is not None else None
        nodes = 1 if cluster is None else len(cluster["nodes"])
        up = 1 if cluster is None else cluster["nodes_up"]
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": self.model_id, "model_loaded": True,
                             "nodes": nodes, "nodes_connected": up if ok else None,
                             "cluster": cluster,
                             "generation": "one request at a time; others wait in arrival order",
                             "busy": self.turn.locked(), "waiting": self.waiting, "error": self.down},
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
        if len(text.encode("utf-8", "replace")) >= self.completer.seq_len * self.max_piece_bytes:
            raise ApiError(400, f"the prompt does not fit the context of {self.completer.seq_len} tokens "
                                f"(the server's --max-seq-len)", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        tokenizer = self.completer.tokenizer
        return tokenizer.encode(text, add_bos=False, allow_special=True) if chat else tokenizer.encode(text)

    def _job(self, prompt: list[int], body: dict, chat: bool, default_limit: int | None) -> Job:
        params = _sampling(body)
        limit = self._limit(body, default_limit)
        if not prompt:
            raise ApiError(400, "the prompt has no tokens", param="messages" if chat else "prompt")
        if len(prompt) >= self.completer.seq_len:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the context holds {self.completer.seq_len} "
                                f"(the server's --max-seq-len)", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        request = Request(prompt, limit, params["temperature"], params["top_p"], params["seed"], params["stop"])
        return Job(request, params["stream"], params["include_usage"], chat)

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
        return self._job(self._tokens(prompt, chat=False), body, chat=False, default_limit=16)

    def _usage(self, outcome: Outcome) -> dict:
        return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens}}

    def _fail(self, e: BaseException) -> ApiError:
        if isinstance(e, ContextFull):
            return ApiError(400, str(e), code="context_length_exceeded")
        # Called once the generation thread is done with the cluster's sockets.
        if self.cluster_alive is not None and (isinstance(e, CLUSTER_FAILURES) or not self.cluster_alive()):
            self.down = str(e)
            return ApiError(503, f"the model is unavailable: {e}", "server_error", code="unavailable")
        if isinstance(e, DllamaError):
            return ApiError(400, str(e))
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    async def _run(self, request: HttpRequest, job: Job) -> Response:
        rid = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        await self._take_turn(request)  # before any byte of the reply: a 503 is still a 503
        if job.stream:
            return _ClosingStream(self._stream(job, rid, created), self.turn.release,
                                  media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        outcome = Outcome()
        cancel = threading.Event()
        watcher = asyncio.create_task(self._watch(request, cancel))
        self.generations.add(cancel)
        try:
            text = await anyio.to_thread.run_sync(
                lambda: "".join(self.completer.complete(job.request, outcome, cancel)))
        except Exception as e:  # noqa: BLE001 - reported as an error object
            return self._fail(e).response()
        finally:
            watcher.cancel()
            self.generations.discard(cancel)
            self.turn.release()
        if job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": outcome.finish_reason, "logprobs": None}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": outcome.finish_reason, "logprobs": None}
            kind = "text_completion"
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": self.model_id,
                             "choices": [choice], "usage": self._usage(outcome)})

    async def _watch(self, request: HttpRequest, cancel: threading.Event) -> None:
        """Stop a non-streaming generation whose client has gone."""
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.25)

    def _chunk(self, job: Job, rid: str, created: int, delta: dict | str | None, finish: str | None,
               usage: Any = False) -> str:
        if job.chat:
            choice = {"index": 0, "delta": delta if isinstance(delta, dict) else
                      ({"content": delta} if delta is not None else {}), "finish_reason": finish, "logprobs": None}
            data: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": self.model_id, "choices": [choice]}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": "text_completion", "created": created, "model": self.model_id,
                    "choices": [choice]}
        if usage is not False:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def _stream(self, job: Job, rid: str, created: int) -> AsyncIterator[str]:
        """The reply's events; runs holding the model's turn (``_ClosingStream`` gives it back)."""
        usage_field = None if job.include_usage else False
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        outcome = Outcome()

        def produce() -> None:
            try:
                for text in self.completer.complete(job.request, outcome, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, ("text", text))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
            except BaseException as e:  # noqa: BLE001 - handed to the event loop
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

        thread = threading.Thread(target=produce, name="dllama-generation", daemon=True)
        self.generations.add(cancel)
        thread.start()
        try:
            if job.chat:
                yield self._chunk(job, rid, created, {"role": "assistant", "content": ""}, None, usage_field)
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield self._chunk(job, rid, created, value, None, usage_field)
                    continue
                if kind == "done":
                    yield self._chunk(job, rid, created, None, outcome.finish_reason, usage_field)
                    if job.include_usage:
                        data = {"id": rid, "object": "chat.completion.chunk" if job.chat else "text_completion",
                                "created": created, "model": self.model_id, "choices": [],
                                "usage": self._usage(outcome)}
                        yield f"data: {json.dumps(data)}\n\n"
                else:
                    error = json.loads(self._fail(value).response().body)
                    yield f"data: {json.dumps(error)}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            # A client that went away cancels us here: stop the generation and wait for it,
            # so the next request finds the model free.
            cancel.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)
            self.generations.discard(cancel)
