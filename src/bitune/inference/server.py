"""An OpenAI-compatible HTTP server for a Bitune model (FastAPI + uvicorn; the `serve` extra).

    POST /v1/chat/completions   messages → the tokenizer's chat template ("chat") or the paper's "plain" template
    POST /v1/completions        raw prompts (a text, a list of texts, token ids)
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok"}

Requests take `max_tokens` (or `max_completion_tokens`), `temperature` (0: greedy; OpenAI's default 1),
`top_p`, `stop` (a text or up to 4), `seed`, `n` and `stream` (server-sent events, with
`stream_options.include_usage`); responses carry `usage` counts. Every request goes through one
`bitune.inference.batching.Batcher`, so requests arriving together are prefilled and decoded as one batch.

A bad request gets an OpenAI-style error, `{"error": {"message", "type", "param", "code"}}`, with a 4xx
status; the server goes on serving. A client that disconnects frees its place in the batch at the next step.
With an API key, every endpoint but /health needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitune.core.prompts import PLAIN_TEMPLATE, encode_prompts
from bitune.errors import BituneInputError
from bitune.inference.batching import Batcher, Event, PromptTooLong, SamplingParams

TEMPLATES = ("plain", "chat")
MAX_STOP_STRINGS = 4
MAX_N = 128


# ---------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _validation_error(error: ValidationError) -> APIError:
    first = error.errors(include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"])
    message = f"{location}: {first['msg']}" if location else first["msg"]
    param = str(first["loc"][0]) if first["loc"] else None
    return APIError(400, f"Invalid request: {message}", param=param, code="invalid_value")


# ---------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    # Unknown fields are ignored (clients send many); known fields are type-checked without coercion.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """The fields both endpoints share."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    top_logprobs: Any = None


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# ---------------------------------------------------------------------------------------------- the app


@dataclass
class ServerSettings:
    """What the server serves and how.

    Args:
        model_name: the name clients send as `model` (others get a 404).
        template: how chat messages become a prompt: "plain" (the paper's "Question: …\\n\\nAnswer:", for models
            tuned on it) or "chat" (the tokenizer's chat template).
        api_key: if set, requests need `Authorization: Bearer <api_key>` (not /health).
        default_max_tokens: the limit of new tokens when a request sets none (capped by the model's positions).
    """

    model_name: str
    template: str = "plain"
    api_key: str | None = None
    default_max_tokens: int = 256

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise BituneInputError(
                f"template {self.template!r} is unknown; use one of {', '.join(TEMPLATES)}"
            )
        if self.default_max_tokens < 1:
            raise BituneInputError(f"default_max_tokens must be at least 1, got {self.default_max_tokens}")


def create_app(batcher: Batcher, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `batcher`'s model as `settings` say (run it with uvicorn, or `serve`)."""
    app = FastAPI(title="bitune serve", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = batcher.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return APIError(error.status_code, str(error.detail), code=code).response()

    if settings.api_key is not None:
        app.add_middleware(_RequireAPIKey, api_key=settings.api_key)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "bitune"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        _check_model(name, settings)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatRequest)
        _check_model(body.model, settings)
        _check_supported(body, logprobs=body.logprobs, top_logprobs=body.top_logprobs)
        text = _render_chat(body.messages, settings.template, tokenizer)
        prompt_ids = encode_prompts(tokenizer, [text])[0]
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = _sampling(body, max_tokens, settings, batcher)
        return await _respond(request, batcher, body, [prompt_ids], params, settings, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        _check_model(body.model, settings)
        _check_supported(body, logprobs=body.logprobs, echo=body.echo or None, suffix=body.suffix)
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported", param="best_of", code="unsupported_parameter")
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        vocabulary = len(tokenizer)
        token_lists: list[list[int]] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                token_lists.append(encode_prompts(tokenizer, [prompt])[0])
            else:
                if any(not 0 <= token < vocabulary for token in prompt):
                    raise APIError(400, f"prompt token ids must be in [0, {vocabulary})", param="prompt")
                token_lists.append(list(prompt))
        params = _sampling(body, body.max_tokens, settings, batcher)
        return await _respond(request, batcher, body, token_lists, params, settings, chat=False)

    return app


class _RequireAPIKey:
    """ASGI middleware: every request but /health needs `Authorization: Bearer <api_key>`.

    (A plain ASGI wrapper, unlike `@app.middleware`, leaves the requests' disconnect notices to the handlers.)
    """

    def __init__(self, app, api_key: str) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                error = APIError(
                    401,
                    "Incorrect or missing API key; send Authorization: Bearer KEY",
                    code="invalid_api_key",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _parse(request: Request, schema: type[_Request]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(
            400, f"We could not parse the JSON body of your request: {error}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error) from None


def _check_model(name: str, settings: ServerSettings) -> None:
    if name != settings.model_name:
        raise APIError(
            404,
            f"The model {name!r} does not exist; this server serves {settings.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _check_supported(body: _Request, **fields: Any) -> None:
    for name, value in fields.items():
        if value not in (None, False, 0):
            raise APIError(
                400, f"{name} is not supported by this server", param=name, code="unsupported_parameter"
            )


def _sampling(
    body: SamplingFields, max_tokens: int | None, settings: ServerSettings, batcher: Batcher
) -> SamplingParams:
    if body.n > batcher.max_batch_size:
        raise APIError(
            400,
            f"n must be at most {batcher.max_batch_size} (the server's batch size)",
            param="n",
            code="invalid_value",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_tokens=max_tokens or settings.default_max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stop,
        seed=body.seed,
    )


def _render_chat(messages: list[Message], template: str, tokenizer) -> str:
    """The prompt text of a conversation: the tokenizer's chat template, or the plain template turn by turn."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(
                500,
                "the server's template is chat, but the tokenizer has no chat template",
                type="server_error",
            )
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # the template's own checks (jinja raise_exception), e.g. role order
            raise APIError(
                400, f"the chat template rejects these messages: {error}", param="messages"
            ) from None
    # plain: system text first, then "Question: …\n\nAnswer: …" per turn, ending with the open answer
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    parts, turn = [], ""
    for message in messages:
        if message.role in ("system", "developer"):
            parts.append(message.text())
        elif message.role == "user":
            turn = PLAIN_TEMPLATE.replace("{prompt}", message.text())
        elif message.role == "assistant" and turn:
            parts.append(f"{turn} {message.text()}")
            turn = ""
        else:
            raise APIError(
                400,
                f"a {message.role} message cannot be rendered with the plain template here",
                param="messages",
            )
    return "\n\n".join([*parts, turn])


# ---------------------------------------------------------------------------------------------- responses


class _Collector:
    """Events of one request's choices, handed from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def listener(self, prompt: int):
        def on_event(event: Event) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (prompt, event))

        return on_event


async def _respond(
    request: Request,
    batcher: Batcher,
    body: SamplingFields,
    prompts: list[list[int]],
    params: SamplingParams,
    settings: ServerSettings,
    chat: bool,
):
    collector = _Collector(asyncio.get_running_loop())
    tickets = []
    try:
        for index, prompt_ids in enumerate(prompts):
            tickets.append(batcher.submit(prompt_ids, params, body.n, collector.listener(index)))
    except BituneInputError as error:
        for ticket in tickets:
            ticket.cancel()
        code = "context_length_exceeded" if isinstance(error, PromptTooLong) else "invalid_value"
        raise APIError(400, str(error), param="messages" if chat else "prompt", code=code) from None
    identifier = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    meta = {"id": identifier, "created": int(time.time()), "model": settings.model_name}
    usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
    total = len(prompts) * body.n
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(collector, tickets, body.n, total)
        stream = _sse(events, meta, usage, chat, include_usage)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    texts, reasons = [""] * total, [None] * total
    watcher = asyncio.create_task(_watch_disconnect(request, tickets))
    try:
        async for choice, event in _events(collector, tickets, body.n, total):
            texts[choice] += event.text
            if event.finish_reason is not None:
                reasons[choice] = event.finish_reason
                usage["completion_tokens"] += event.tokens
    finally:
        watcher.cancel()
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
            for i, (text, reason) in enumerate(zip(texts, reasons))
        ]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage}
    choices = [
        {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
        for i, (text, reason) in enumerate(zip(texts, reasons))
    ]
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage}


async def _events(collector: _Collector, tickets, n: int, total: int) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) until every choice finished; cancels the requests if the consumer stops early."""
    open_choices = total
    try:
        while open_choices:
            prompt, event = await collector.queue.get()
            if event.finish_reason == "error":
                raise APIError(500, event.error or "generation failed", type="server_error")
            if event.finish_reason is not None:
                open_choices -= 1
            yield prompt * n + event.choice, event
    finally:
        if open_choices:  # the client went away (or an error): free the batch's rows
            for ticket in tickets:
                ticket.cancel()


async def _watch_disconnect(request: Request, tickets) -> None:
    while True:
        if await request.is_disconnected():
            for ticket in tickets:
                ticket.cancel()
            return
        await asyncio.sleep(0.1)


async def _sse(
    events: AsyncIterator[tuple[int, Event]], meta: dict, usage: dict, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra: Any) -> str:
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': choices, **extra})}\n\n"

    started: set[int] = set()
    try:
        async for choice, event in events:
            if chat:
                delta: dict[str, Any] = {"content": event.text} if event.text else {}
                if choice not in started:
                    started.add(choice)
                    delta = {"role": "assistant", "content": event.text}
                if delta or event.finish_reason:
                    entry = {
                        "index": choice,
                        "delta": delta,
                        "finish_reason": event.finish_reason,
                        "logprobs": None,
                    }
                    yield chunk([entry])
            elif event.text or event.finish_reason:
                entry = {
                    "index": choice,
                    "text": event.text,
                    "finish_reason": event.finish_reason,
                    "logprobs": None,
                }
                yield chunk([entry])
            if event.finish_reason is not None:
                usage["completion_tokens"] += event.tokens
    except APIError as error:  # the status line is sent already: the error goes into the stream
        yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type}})}\n\n"
        return
    if include_usage:
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        yield chunk([], usage=usage)
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------- running


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run `app` with uvicorn until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Run `app` on a free port of `host` in a background thread; yields its base URL ("http://host:port").

    For tests and benchmarks: the server stops when the block ends.

    Example:
        >>> import json, urllib.request
        >>> from bitune.inference.batching import Batcher
        >>> batcher = Batcher(model, tokenizer)
        >>> body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        >>> with running_server(create_app(batcher, ServerSettings("stories"))) as url:
        ...     print(url)
        ...     request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
        ...                                      {"Content-Type": "application/json"})
        ...     print(json.load(urllib.request.urlopen(request))["choices"])
        http://127.0.0.1:...
        [{'index': 0, 'text': ', there was a little girl', 'finish_reason': 'length', 'logprobs': None}]
        >>> batcher.close()
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


__all__ = [
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "ServerSettings",
    "TEMPLATES",
    "create_app",
    "running_server",
    "serve",
]
