"""The HTTP server: FastAPI routes for OpenAI-compatible completions over the batching engine.

:func:`create_app` serves ``POST /v1/completions`` and ``POST /v1/chat/completions`` (whole
or streamed as server-sent events; their bodies' schemas are in ``/openapi.json``), ``GET
/v1/models``, ``GET /v1/models/{id}`` and ``GET /health``. Chat needs a tokenizer with Gemma's
turn markers (:mod:`sparse_jax.serve.chat`); for any other model it is a 400 saying so. The
``/v1`` routes need ``Authorization: Bearer KEY`` when the settings hold
an API key; ``/health`` then tells a caller without the key only whether the server is up.
Every invalid request gets a 4xx with OpenAI's JSON error body (a failure on the server's side
a 5xx of the same shape), and the server goes on serving. A prompt is tokenized on a worker
thread, so that a long one does not hold up the streams of others, and only once a cheap
bound says it may fit the context. Each completion is a
:class:`~sparse_jax.serve.tickets.Request` for the engine; its tokens come back through an
asyncio queue and become text through :class:`~sparse_jax.serve.textgen.TextStream`, which also
finds stop strings (the request is then cancelled, so its slot frees at once). A client that
disconnects cancels its request too: a stream notices when a chunk cannot be sent, and every
request polls for it twice a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.model.config import check_context
from sparse_jax.serve import chat, protocol
from sparse_jax.serve.engine import Engine
from sparse_jax.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from sparse_jax.serve.row_sampling import TOP_P_OFF, RowSettings
from sparse_jax.serve.textgen import TextStream, encode_prompt
from sparse_jax.serve.tickets import EngineBusy, Event, Ticket
from sparse_jax.serve.tickets import Request as EngineRequest

# While a request waits for its next token, check this often whether its client has gone.
DISCONNECT_POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What the server exposes and accepts.

    Attributes:
      model_name: the model id of ``/v1/models``; requests must name it.
      api_key: if set, the ``/v1`` routes need ``Authorization: Bearer <api_key>``.
      max_tokens_limit: the largest ``max_tokens`` a request may ask for, >= 1.
      max_request_bytes: the largest request body, >= 1.
    """

    model_name: str
    api_key: str | None = None
    max_tokens_limit: int = 256
    max_request_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("ServerSettings.model_name must be a non-empty string")
        if self.api_key is not None:
            check_api_key(self.api_key, "ServerSettings.api_key")
        for name in ("max_tokens_limit", "max_request_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerSettings.{name}={value!r} must be an integer >= 1")


def check_api_key(key: str, name: str) -> None:
    """Raises ValueError unless ``key`` can be an API key; ``name`` says where it came from.

    An empty key (often an unset shell variable) would otherwise mean no authentication, and
    a key with surrounding whitespace could never match a header (headers are stripped).
    """
    if not isinstance(key, str) or not key.strip():
        raise ValueError(
            f"{name} is empty: give a non-empty API key, or none at all to serve without "
            "authentication"
        )
    if key != key.strip():
        raise ValueError(f"{name} starts or ends with whitespace, which no request can send")


def longest_piece(tokenizer: Tokenizer) -> int:
    """An upper bound on the characters of text one token of ``tokenizer`` stands for.

    A piece decoded alone loses at most its leading space mark; byte pieces stand for at most
    one character. So a text of C characters is at least C / (this) tokens, whatever it is.
    """
    return 1 + max(len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size))


class _ClientGone(Exception):
    pass


class _EventStream(StreamingResponse):
    """A server-sent-event response that cancels its request however the response ends."""

    def __init__(self, content: AsyncIterator[str], ticket: Ticket):
        super().__init__(content, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self._ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._ticket.cancel()
            await self.body_iterator.aclose()


def create_app(engine: Engine, tokenizer: Tokenizer, settings: ServerSettings) -> FastAPI:
    """The FastAPI application; it starts ``engine`` at startup and closes it at shutdown."""
    cfg = engine.cfg
    created = int(time.time())
    chars_per_token = longest_piece(tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="sparse_jax", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        error = ApiError(err.status_code, str(err.detail), code=f"http_{err.status_code}")
        return JSONResponse(error.body(), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        error = ApiError(500, f"internal error: {type(err).__name__}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    def authorized(request: Request) -> bool:
        if settings.api_key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            key.strip().encode(), settings.api_key.encode()
        )

    def authorize(request: Request) -> None:
        if not authorized(request):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                kind="authentication_error",
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        status = engine.status()
        ok = status["running"]
        body = {"status": "ok" if ok else "unavailable"}
        # Up or not is for anyone (load balancers send no key); what runs, and how busy it is,
        # only for those who may use it.
        if authorized(request):
            body.update(model=settings.model_name, **status)
        return JSONResponse(body, status_code=200 if ok else 503)

    model_card = {
        "id": settings.model_name,
        "object": "model",
        "created": created,
        "owned_by": "sparse_jax",
        "max_model_len": cfg.max_seq_len,
    }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card]}

    # ":path": model ids such as "org/name" hold a slash.
    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict:
        authorize(request)
        if model_id != settings.model_name:
            raise _no_such_model(model_id, settings.model_name)
        return model_card

    def schema(request_type: type) -> dict:
        content = {"application/json": {"schema": protocol.request_schema(request_type)}}
        return {"requestBody": {"required": True, "content": content}}

    async def respond(
        req: protocol._Sampled,
        prompt_ids: list[int],
        engine_request: EngineRequest,
        request: Request,
        is_chat: bool,
        echo: str = "",
    ):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            ticket = engine.submit(
                engine_request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e)
            )
        except EngineBusy as err:
            raise ApiError(503, f"server busy: {err}", kind="server_error", code="busy") from None
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        text = TextStream(tokenizer, req.stop or (), context=prompt_ids)
        pieces = _pieces(ticket, events, text, request)
        request_id = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        name = settings.model_name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = _sse(
                pieces, request_id, name, include_usage, len(prompt_ids), text, echo, is_chat
            )
            return _EventStream(stream, ticket)
        try:
            parts, reason = [echo], None
            async for piece, finish in pieces:
                parts.append(piece)
                reason = finish
        except _ClientGone:
            return JSONResponse({}, status_code=499)
        finally:
            ticket.cancel()
        counts = protocol.usage(len(prompt_ids), len(text.tokens))
        body = protocol.chat_completion_body if is_chat else protocol.completion_body
        return body(request_id, name, "".join(parts), reason, counts)

    # The bodies are read and validated by hand (size limit, OpenAI's error messages), so
    # FastAPI is told their schemas rather than left to infer none.
    @app.post("/v1/completions", openapi_extra=schema(CompletionRequest))
    async def completions(request: Request):
        authorize(request)
        body = await _read_body(request, settings.max_request_bytes)
        req = protocol.parse_completion_request(body)
        max_tokens = _max_tokens(req, settings)
        prompt_ids = await _prompt_ids(
            req.prompt, tokenizer, cfg.max_seq_len, max_tokens, chars_per_token
        )
        engine_request = _engine_request(req, prompt_ids, max_tokens, (tokenizer.eos_id,))
        echo = ""
        if req.echo:
            echo = req.prompt if isinstance(req.prompt, str) else tokenizer.decode(prompt_ids)
        return await respond(req, prompt_ids, engine_request, request, False, echo)

    @app.post("/v1/chat/completions", openapi_extra=schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        authorize(request)
        body = await _read_body(request, settings.max_request_bytes)
        req = protocol.parse_chat_request(body)
        if not chat.supports_chat(tokenizer):
            raise ApiError(400, chat.no_chat_format(tokenizer), code="chat_not_supported")
        max_tokens = _max_tokens(req, settings)
        messages = [(m.role, m.text) for m in req.messages]
        try:  # the body's size limit bounds the encoding work
            prompt_ids = await run_in_threadpool(chat.conversation_ids, tokenizer, messages)
        except ValueError as err:
            raise ApiError(400, str(err), param="messages") from None
        try:
            check_context(cfg.max_seq_len, len(prompt_ids), max_tokens, "max_tokens")
        except ValueError as err:
            raise ApiError(
                400,
                f"the conversation is {len(prompt_ids)} tokens: {err}",
                param="messages",
                code="context_length_exceeded",
            ) from None
        engine_request = _engine_request(req, prompt_ids, max_tokens, chat.stop_ids(tokenizer))
        return await respond(req, prompt_ids, engine_request, request, True)

    return app


def _no_such_model(asked: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"model {asked!r} does not exist; this server serves {served!r}",
        param="model",
        code="model_not_found",
    )


async def _prompt_ids(
    prompt: str | list[int], tokenizer: Tokenizer, context: int, max_tokens: int, chars: int
) -> list[int]:
    """The prompt's token ids; a string is checked against the context before it is encoded."""
    if not isinstance(prompt, str):
        return list(prompt)  # the engine checks the ids and the length
    fewest = 1 + -(-len(prompt) // chars)  # BOS, then at most ``chars`` characters per token
    try:
        check_context(context, fewest, max_tokens, "max_tokens")
    except ValueError:
        raise ApiError(
            400,
            f"the prompt's {len(prompt)} characters are at least {fewest} tokens (no token "
            f"stands for more than {chars} characters): with max_tokens={max_tokens} they "
            f"exceed the model's context of {context} tokens (max_seq_len)",
            param="prompt",
            code="context_length_exceeded",
        ) from None
    try:
        return await run_in_threadpool(encode_prompt, tokenizer, context, prompt, max_tokens)
    except ValueError as err:
        raise ApiError(400, str(err), param="prompt", code="context_length_exceeded") from None


def _max_tokens(req: protocol._Sampled, settings: ServerSettings) -> int:
    """The request's token limit, checked against the server's; also checks the model id."""
    if req.model != settings.model_name:
        raise _no_such_model(req.model, settings.model_name)
    max_tokens = req.token_limit
    if max_tokens is None:
        max_tokens = settings.max_tokens_limit
        if isinstance(req, CompletionRequest):
            max_tokens = min(protocol.DEFAULT_MAX_TOKENS, max_tokens)
    if max_tokens > settings.max_tokens_limit:
        name = "max_completion_tokens" if req.token_limit != req.max_tokens else "max_tokens"
        raise ApiError(
            400,
            f"{name}={max_tokens} is over this server's limit of {settings.max_tokens_limit}",
            param=name,
        )
    return max_tokens


def _engine_request(
    req: protocol._Sampled, ids: list[int], max_tokens: int, stop_tokens: tuple[int, ...]
) -> EngineRequest:
    row = RowSettings(
        temperature=req.temperature,
        top_k=req.top_k or 0,
        # top_p=1 is "off", exactly as Sampler(top_p=None): no token is cut by rounding.
        top_p=req.top_p if req.top_p < 1.0 else TOP_P_OFF,
        seed=(req.seed if req.seed is not None else uuid.uuid4().int) % (1 << 31),
    )
    return EngineRequest(tuple(ids), max_tokens, row, stop_tokens)


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


class _Watch:
    """Tells, at most every :data:`DISCONNECT_POLL_S`, whether the client has gone."""

    def __init__(self, request: Request):
        self.request = request
        self.checked = time.monotonic()

    async def gone(self) -> bool:
        if time.monotonic() - self.checked < DISCONNECT_POLL_S:
            return False
        self.checked = time.monotonic()
        return await self.request.is_disconnected()


async def _next_event(events: asyncio.Queue[Event], watch: _Watch) -> Event:
    while True:
        if await watch.gone():
            raise _ClientGone
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)


async def _pieces(
    ticket: Ticket, events: asyncio.Queue[Event], text: TextStream, request: Request
) -> AsyncIterator[tuple[str, str | None]]:
    """(text piece, finish reason or None) as tokens arrive; the last has the reason."""
    watch = _Watch(request)
    while True:
        event = await _next_event(events, watch)
        piece = "" if event.token is None else text.push(event.token)
        if text.stopped:
            ticket.cancel()
            yield piece, "stop"
            return
        if event.finish_reason is None:
            if piece:
                yield piece, None
            continue
        if event.finish_reason == "error":
            raise ApiError(500, f"generation failed: {event.message}", kind="server_error")
        if event.finish_reason == "cancelled":
            raise ApiError(503, "the server is shutting down", kind="server_error")
        yield piece + text.finish(), event.finish_reason
        return


async def _sse(
    pieces: AsyncIterator[tuple[str, str | None]],
    request_id: str,
    model: str,
    include_usage: bool,
    prompt_tokens: int,
    text: TextStream,
    echo: str,
    is_chat: bool = False,
) -> AsyncIterator[str]:
    def chunk(piece: str, reason: str | None, first: bool = False) -> str:
        if not is_chat:
            return protocol.chunk_body(request_id, model, piece, reason, include_usage)
        delta = {"role": "assistant", "content": piece} if first else {"content": piece}
        if reason is not None and not piece:
            delta = {}
        return protocol.chat_chunk_body(request_id, model, delta, reason, include_usage)

    try:
        if echo:
            yield chunk(echo, None)
        if is_chat:  # OpenAI's chat streams open with the role
            yield chunk("", None, first=True)
        async for piece, reason in pieces:
            yield chunk(piece, reason)
    except ApiError as err:
        yield protocol.sse(err.body())
        return
    except _ClientGone:
        return
    if include_usage:
        body = protocol.completion_body(request_id, model, "", None, None)
        if is_chat:
            body["object"] = "chat.completion.chunk"
        body["choices"] = []
        body["usage"] = protocol.usage(prompt_tokens, len(text.tokens))
        yield protocol.sse(body)
    yield protocol.sse("[DONE]")
