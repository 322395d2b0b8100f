"""The OpenAI-compatible HTTP API (FastAPI) in front of `BatchEngine`.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (stream or
not; streams are server-sent events in OpenAI's chunk format ending in `data: [DONE]`),
`GET /health`, and vLLM's `POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter`.

- `model` picks the base (its served name) or a LoRA; a chat request is rendered in that
  model's template: a chat template renders the whole conversation; an instruction template
  (alpaca) takes one user message (after an optional system message, which it has no place
  for) as the instruction, and anything else is a 400 that says so. `/v1/completions` takes
  the prompt as raw text (BOS + the text), as vLLM does.
- Every failure is OpenAI-shaped JSON `{"error": {"message", "type", "param", "code"}}`:
  401 wrong/missing key, 400 malformed JSON or fields, limits (prompt length, max_tokens),
  404 unknown model, 429 queue full.
- The key is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.engine import Engine
from chinese_vicuna.prompts import PromptTemplate
from chinese_vicuna.serving.engine import BatchEngine, Event, GenerationRequest, QueueFull, SamplingParams

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.5
M = TypeVar("M", bound="BaseModel")


@dataclass
class ServeLimits:
    """What one request may ask for; beyond them a 400 (or 429 for the queue, in the engine)."""

    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_model_len: int = 2048
    max_stop: int = 8


# --------------------------------------------------------------------------------------------
# Schemas (unknown fields are accepted and ignored, as OpenAI's own clients send extras)
# --------------------------------------------------------------------------------------------
class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Loose):
    type: str = "text"
    text: str = ""


class ChatMessage(_Loose):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(p.type != "text" for p in self.content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(p.text for p in self.content)


class StreamOptions(_Loose):
    include_usage: bool = False


class _SamplingFields(_Loose):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions


class LoadLoraRequest(_Loose):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Loose):
    lora_name: str = Field(min_length=1)


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status)


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------
class OpenAIServer:
    """Requests → prompts → engine; engine events → OpenAI responses."""

    def __init__(self, engine: BatchEngine, base_name: str, limits: ServeLimits, api_key: str | None = None) -> None:
        self.engine = engine
        self.registry = engine.registry
        self.tokenizer = engine.tokenizer
        # prompt ids come from the one inference path; the batched engine decodes them
        self.prompts = Engine.for_model(None, engine.tokenizer, engine.registry.base_template)
        self.base_name = base_name
        self.limits = limits
        self._key = api_key.encode("utf-8") if api_key else None
        self.created = int(time.time())

    # --- requests → prompts -------------------------------------------------------------------
    def adapter_of(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.registry.names():
            return model
        raise ApiError(
            404, f"the model {model!r} does not exist; GET /v1/models lists the served models", param="model", code="model_not_found"
        )

    def chat_prompt(self, template: PromptTemplate, model: str, messages: list[ChatMessage]) -> list[int]:
        msgs = [{"role": m.role, "content": m.text()} for m in messages]
        if template.is_chat:
            try:
                ids = self.prompts.conversation_ids(msgs, template)
            except UserError as exc:
                raise ApiError(400, str(exc), param="messages") from None
            return ids
        rest = msgs[1:] if msgs[0]["role"] == "system" else msgs
        if len(rest) != 1 or rest[0]["role"] != "user":
            raise ApiError(
                400,
                f"the model {model!r} uses the instruction template {template.name!r}: send one user message (after an optional "
                "system message) as the instruction; conversations need a model trained with a chat template",
                param="messages",
            )
        return self.prompts.instruction_ids(rest[0]["content"], template=template)

    def sampling(
        self, body: _SamplingFields, max_tokens: int | None, prompt_len: int, template_stops: list[str], strip: bool
    ) -> SamplingParams:
        lim = self.limits
        if body.n != 1:
            raise ApiError(400, f"n={body.n}: this server returns one choice per request (n=1)", param="n")
        if prompt_len > lim.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {prompt_len} tokens; this server takes at most {lim.max_prompt_tokens} (--max_prompt_tokens)",
                param="messages",
            )
        max_tokens = max_tokens if max_tokens is not None else min(lim.default_max_tokens, lim.max_tokens_limit)
        if max_tokens > lim.max_tokens_limit:
            raise ApiError(
                400, f"max_tokens={max_tokens}; this server allows at most {lim.max_tokens_limit} (--max_tokens_limit)", param="max_tokens"
            )
        if prompt_len + max_tokens > lim.max_model_len:
            raise ApiError(
                400,
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {lim.max_model_len} tokens",
                param="max_tokens",
            )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > lim.max_stop:
            raise ApiError(400, f"at most {lim.max_stop} stop strings", param="stop")
        return SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, [*template_stops, *stops], strip)

    # --- running ------------------------------------------------------------------------------
    async def run(
        self, request: Request, ids: list[int], adapter: str | None, params: SamplingParams
    ) -> tuple[GenerationRequest, asyncio.Queue, Event]:
        """Submit and wait for the first event (so a failed start is still an HTTP error)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        gen = GenerationRequest(ids, adapter, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            self.engine.submit(gen)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full") from None
        first = await self.next_event(request, gen, events)
        if first.finish_reason == "error":
            raise ApiError(400 if first.client_error else 500, first.error or "generation failed")
        return gen, events, first

    @staticmethod
    async def next_event(request: Request, gen: GenerationRequest, events: asyncio.Queue) -> Event:
        """The next event; a client that went away cancels the request (its slot frees)."""
        while True:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    gen.cancel()
                    raise asyncio.CancelledError from None
        # Pieces already waiting join this one: when the batch outpaces the HTTP side, a chunk
        # carries several tokens instead of one each (per-chunk work, here and in the client,
        # is most of the cost of a small model's token). Joined text is unchanged.
        parts = [event.text]
        while not event.finish_reason and not events.empty():
            event = events.get_nowait()
            parts.append(event.text)
        return event if len(parts) == 1 else dataclasses.replace(event, text="".join(parts))

    def check_key(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), self._key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def models(self) -> dict[str, Any]:
        data = [
            {
                "id": self.base_name,
                "object": "model",
                "created": self.created,
                "owned_by": "chinese-vicuna",
                "root": self.base_name,
                "parent": None,
            }
        ]
        for name in self.registry.names():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "chinese-vicuna",
                    "root": name,
                    "parent": self.base_name,
                }
            )
        return {"object": "list", "data": data}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage(event: Event) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def finish_reason(event: Event) -> str:
    return "length" if event.finish_reason == "length" else "stop"


async def parse_body(request: Request, schema: type[M]) -> M:
    """The JSON body as `schema` (whatever the Content-Type, as curl users forget it); 400 otherwise."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None) from None


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI application (uvicorn runs it; tests may too)."""
    app = FastAPI(title="Chinese-Vicuna OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        try:
            server.check_key(request)
        except ApiError as exc:
            return error_response(exc)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **server.engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        body = await parse_body(request, ChatCompletionRequest)
        adapter = server.adapter_of(body.model)
        template = server.registry.template(adapter)
        ids = server.chat_prompt(template, body.model, body.messages)
        params = server.sampling(body, body.max_completion_tokens or body.max_tokens, len(ids), template.stop_strings, template.is_chat)
        gen, events, first = await server.run(request, ids, adapter, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": body.model}
        if not body.stream:
            text, last = await collect(request, gen, events, first)
            return {
                **head,
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(last), "logprobs": None}
                ],
                "usage": usage(last),
            }
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, str], reason: str | None) -> str:
            return sse(
                {
                    **head,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
                }
            )

        async def stream() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for event in events_from(request, gen, events, first):
                if event.text:
                    yield chunk({"content": event.text}, None)
                if event.finish_reason:
                    yield chunk({}, finish_reason(event))
                    if include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(event)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await parse_body(request, CompletionRequest)
        adapter = server.adapter_of(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request (a list of several prompts is not supported)", param="prompt")
        ids = server.prompts.text_ids(prompts[0])
        params = server.sampling(body, body.max_tokens, len(ids), [], False)
        gen, events, first = await server.run(request, ids, adapter, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        if not body.stream:
            text, last = await collect(request, gen, events, first)
            return {
                **head,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason(last), "logprobs": None}],
                "usage": usage(last),
            }
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            async for event in events_from(request, gen, events, first):
                if event.text or event.finish_reason:
                    reason = finish_reason(event) if event.finish_reason else None
                    yield sse({**head, "choices": [{"index": 0, "text": event.text, "finish_reason": reason, "logprobs": None}]})
                if event.finish_reason and include_usage:
                    yield sse({**head, "choices": [], "usage": usage(event)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request) -> dict[str, str]:
        body = await parse_body(request, LoadLoraRequest)
        if body.lora_name == server.base_name:
            raise ApiError(400, f"{body.lora_name!r} is the base model's name", param="lora_name")
        if not Path(body.lora_path).is_dir():
            raise ApiError(400, f"{body.lora_path}: no such adapter folder on the server", param="lora_path")
        try:
            server.registry.register(body.lora_name, body.lora_path)
        except UserError as exc:
            raise ApiError(400, str(exc), param="lora_path") from None
        return {"status": "ok", "message": f"LoRA {body.lora_name!r} added; it loads on first use"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request) -> dict[str, str]:
        body = await parse_body(request, UnloadLoraRequest)
        try:
            server.registry.unregister(body.lora_name)
        except KeyError:
            raise ApiError(404, f"the LoRA {body.lora_name!r} is not served", param="lora_name", code="model_not_found") from None
        return {"status": "ok", "message": f"LoRA {body.lora_name!r} removed"}

    async def events_from(request: Request, gen: GenerationRequest, events: asyncio.Queue, first: Event) -> AsyncIterator[Event]:
        """Every event until the last; leaving early (client gone) cancels the request."""
        event = first
        try:
            while True:
                yield event
                if event.finish_reason:
                    return
                event = await server.next_event(request, gen, events)
        finally:
            if not event.finish_reason:
                gen.cancel()

    async def collect(request: Request, gen: GenerationRequest, events: asyncio.Queue, first: Event) -> tuple[str, Event]:
        parts: list[str] = []
        async for event in events_from(request, gen, events, first):
            parts.append(event.text)
            if event.finish_reason:
                if event.finish_reason == "error":
                    raise ApiError(500, event.error or "generation failed")
                return "".join(parts), event
        raise ApiError(500, "generation ended without a result")

    return app


def serve_app(app: FastAPI, host: str, port: int) -> None:
    """Run under uvicorn until interrupted (Ctrl-C)."""
    import uvicorn

    logger.info("serving the OpenAI API on http://%s:%d/v1", host, port)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=host, port=port, log_level="info")
