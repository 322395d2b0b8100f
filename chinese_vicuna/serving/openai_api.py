"""The OpenAI-compatible HTTP API (FastAPI) in front of `BatchEngine`.

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
`POST /v1/completions` (stream or not; streams are server-sent events in OpenAI's chunk format
ending in `data: [DONE]`), `GET /health`, and vLLM's `POST /v1/load_lora_adapter` /
`POST /v1/unload_lora_adapter` (only with a LoRA root: `--enable_lora_loading`).

- `model` picks the base (its served name) or a LoRA; a chat request is rendered in that
  model's template: a chat template renders the whole conversation; an instruction template
  (alpaca) takes one user message (after an optional system message, which it has no place
  for) as the instruction, and anything else is a 400 that says so. `/v1/completions` takes
  the prompt as raw text (BOS + the text), as vLLM does.
- Every OpenAI parameter is implemented (logprobs, echo, logit_bias, penalties, seed, n), a
  no-op by OpenAI's spec, or a 400 naming it; types are strict (docs/serving.md has the table).
- Every failure is OpenAI-shaped JSON `{"error": {"message", "type", "param", "code"}}`:
  401 wrong/missing key, 400 malformed JSON or fields, limits (prompt length, max_tokens),
  404 unknown model, 413 body too large, 429 queue full; a 500 carries no internal text (the
  log has it).
- A client that disconnects has its requests cancelled at the engine's next step (`Run`), and
  prompts are tokenized on a worker thread, so the event loop always answers.
- The key is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.engine import Engine
from chinese_vicuna.prompts import PromptTemplate
from chinese_vicuna.serving.engine import (
    GENERATION_FAILED,
    BatchEngine,
    Event,
    GenerationRequest,
    QueueFull,
    SamplingParams,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 2  # after SIGTERM, open connections get this long before they are cut
M = TypeVar("M", bound="BaseModel")


@dataclass
class ServeLimits:
    """What one request may ask for; beyond them a 400 (or 429 for the queue, in the engine)."""

    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_model_len: int = 2048
    max_stop: int = 8
    max_n: int = 16
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_request_bytes: int = 16 * 2**20


# --------------------------------------------------------------------------------------------
# Schemas: strict types (a boolean is a boolean, an integer an integer), OpenAI's ranges, and
# every field either implemented, a no-op by OpenAI's spec (accepted and documented), or a 400
# naming it (`unsupported_fields`).
# --------------------------------------------------------------------------------------------
MIN_TEMPERATURE = 0.01  # below it (but above 0) scores / temperature overflow: a 400, 0 is greedy
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's int64
MAX_TOP_LOGPROBS = 20  # chat: OpenAI's limit
MAX_COMPLETION_LOGPROBS = 5  # completions: OpenAI's limit
MAX_LOGIT_BIAS = 300
MAX_JSON_DEPTH = 32  # OpenAI bodies nest a few levels; deeper is refused before validation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, value: str) -> str:
        return "system" if value == "developer" else value  # OpenAI's newer name for the system message

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"type {value!r} is not supported by this server (no constrained decoding): leave response_format out")
        return value


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return value


class _SamplingFields(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    # no-ops by OpenAI's spec: an end-user id for abuse monitoring
    user: str | None = None

    # fields OpenAI defines that are no-ops here only at these values (None = not given)
    NO_OP_VALUES: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        _finite(value, "temperature")
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    @field_validator("top_p", "frequency_penalty", "presence_penalty")
    @classmethod
    def _finite_value(cls, value: float, info: Any) -> float:
        return _finite(value, info.field_name)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit() or len(key) > 9:
                raise ValueError(f"logit_bias keys are token ids (strings of digits); got {key[:20]!r}")
            if not math.isfinite(bias) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are between -100 and 100; got {bias} for token {key}")
        return value


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    # no-ops by OpenAI's spec: stored/metadata for OpenAI's dashboard, the service tier, a cache key
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    NO_OP_VALUES: ClassVar[dict[str, tuple[Any, ...]]] = {
        "store": (False,),
        "tools": ([],),
        "tool_choice": ("none",),
        "parallel_tool_calls": (True, False),  # only matters with tools
        "modalities": (["text"],),
    }

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions; 0 with echo
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    NO_OP_VALUES: ClassVar[dict[str, tuple[Any, ...]]] = {"suffix": ("",), "best_of": (1,)}

    @model_validator(mode="after")
    def _zero_tokens_needs_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 returns nothing without echo: true")
        return self


class LoadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1)


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status)


def unsupported_fields(data: dict[str, Any], schema: type[BaseModel]) -> None:
    """A 400 naming the first field this server does not implement. A null is "not given"; fields
    OpenAI defines as no-ops at some values (`NO_OP_VALUES`) pass at those values."""
    no_op: dict[str, tuple[Any, ...]] = getattr(schema, "NO_OP_VALUES", {})
    for key, value in list(data.items()):
        if value is None:  # OpenAI's clients send null for "not given": the default applies
            del data[key]
            continue
        if key in schema.model_fields:
            continue
        if key in no_op and any(value == v and type(value) is type(v) for v in no_op[key]):
            del data[key]
            continue
        if key == "best_of" and type(value) is int and value == data.get("n", 1):
            del data[key]  # best_of = n returns the n it generates: n's behaviour
            continue
        shown = json.dumps(value)[:60]
        raise ApiError(
            400,
            f"{key}={shown}: not supported by this server (docs/serving.md lists the OpenAI parameters it implements)",
            param=key,
            code="unsupported_parameter",
        )


def json_depth_exceeds(data: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------
class OpenAIServer:
    """Requests → prompts → engine; engine events → OpenAI responses."""

    def __init__(
        self, engine: BatchEngine, base_name: str, limits: ServeLimits, api_key: str | None = None, lora_root: str | None = None
    ) -> None:
        self.engine = engine
        self.registry = engine.registry
        self.tokenizer = engine.tokenizer
        # prompt ids come from the one inference path; the batched engine decodes them
        self.prompts = Engine.for_model(None, engine.tokenizer, engine.registry.base_template)
        self.base_name = base_name
        self.limits = limits
        self._key = api_key.encode("utf-8") if api_key else None
        self.created = int(time.time())
        self.lora_root = Path(os.path.realpath(lora_root)) if lora_root else None  # None: no run-time loading
        self.tokenizing = 0  # prompts being tokenized now (/health)
        self.longest_token = max((len(piece) for piece in self.tokenizer.get_vocab()), default=1)

    # --- run-time adapters --------------------------------------------------------------------
    def check_lora_loading(self) -> None:
        if self.lora_root is None:
            raise ApiError(
                404, "run-time LoRA loading is off: start serve.py with --enable_lora_loading true --lora_root DIR", code="not_enabled"
            )

    def lora_path_under_root(self, given: str) -> str:
        """`given` (absolute, or relative to --lora_root) as a real path inside --lora_root. Every
        path that is not an adapter folder there gets the same answer, so that a caller learns
        nothing about what exists elsewhere on the server."""
        assert self.lora_root is not None
        refusal = ApiError(400, "lora_path must name an adapter folder under the server's --lora_root", param="lora_path")
        try:
            real = Path(os.path.realpath(self.lora_root / given))
        except (OSError, ValueError):
            raise refusal from None
        if real == self.lora_root or not real.is_relative_to(self.lora_root) or not real.is_dir():
            raise refusal
        return str(real)

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

    def prompt_too_long(self, chars: int) -> None:
        """A 400 for a text that cannot fit `max_prompt_tokens` whatever its tokens: each token
        covers at most `longest_token` characters, so it is refused without tokenizing it."""
        lim = self.limits
        if chars > lim.max_prompt_tokens * self.longest_token:
            raise ApiError(
                400,
                f"the prompt has {chars} characters, more than {lim.max_prompt_tokens} tokens can hold; "
                f"this server takes at most {lim.max_prompt_tokens} tokens (--max_prompt_tokens)",
                param="messages",
            )

    async def tokenized(self, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        """`fn(*args)` on a worker thread: a long prompt's tokenization never stalls the event
        loop (other requests, /health)."""
        self.tokenizing += 1
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            self.tokenizing -= 1

    def completion_prompt_ids(self, text: str) -> list[int]:
        return self.prompts.text_ids(text)

    def sampling(
        self, body: _SamplingFields, max_tokens: int | None, prompt_len: int, template_stops: list[str], strip: bool
    ) -> SamplingParams:
        lim = self.limits
        if body.n > lim.max_n:
            raise ApiError(400, f"n={body.n}: this server returns at most {lim.max_n} choices per request", param="n")
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
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        vocab = len(self.tokenizer)
        if any(k >= vocab for k in bias):
            raise ApiError(400, f"logit_bias: token ids are below the vocabulary size {vocab}", param="logit_bias")
        return SamplingParams(
            max_tokens,
            body.temperature,
            body.top_p,
            body.seed,
            [*template_stops, *stops],
            strip,
            logit_bias=bias,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
        )

    def check_token_ids(self, ids: list[int]) -> None:
        vocab = len(self.tokenizer)
        if not ids or any(i < 0 or i >= vocab for i in ids):
            raise ApiError(400, f"a prompt of token ids needs at least one id, each from 0 to {vocab - 1}", param="prompt")

    # --- running ------------------------------------------------------------------------------
    def start(self, request: Request, jobs: list[tuple[list[int], str | None, SamplingParams, list[int]]]) -> Run:
        """Submit every job (prompt ids, adapter, params, the choice indices it answers)."""
        run = Run(request, sum(len(j[3]) for j in jobs))
        try:
            for ids, adapter, params, indices in jobs:
                run.submit(self.engine, ids, adapter, params, indices)
        except QueueFull as exc:
            run.cancel()
            raise ApiError(429, str(exc), code="queue_full") from None
        except RuntimeError:  # the engine is closed
            run.cancel()
            raise ApiError(503, "the server is shutting down") from None
        return run

    def jobs(
        self, prompts: list[list[int]], adapter: str | None, params: SamplingParams, n: int
    ) -> list[tuple[list[int], str | None, SamplingParams, list[int]]]:
        """One engine request per prompt and choice; greedy choices are one request, copied
        (they are identical). With a seed, choice i samples from seed + i."""
        jobs = []
        for p, ids in enumerate(prompts):
            indices = list(range(p * n, (p + 1) * n))
            if params.temperature <= 0 or n == 1:
                jobs.append((ids, adapter, params, indices))
                continue
            for i, index in enumerate(indices):
                seed = None if params.seed is None else (params.seed + i) % 2**64
                jobs.append((ids, adapter, dataclasses.replace(params, seed=seed), [index]))
        return jobs

    def check_key(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), self._key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def models(self) -> dict[str, Any]:
        data = [model_card(self.base_name, self.created, None)]
        data += [model_card(name, self.created, self.base_name) for name in self.registry.names()]
        return {"object": "list", "data": data}


def model_card(name: str, created: int, parent: str | None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "chinese-vicuna", "root": name, "parent": parent}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def finish_reason(event: Event) -> str:
    return "length" if event.finish_reason == "length" else "stop"


class ClientGone(Exception):
    """The client disconnected: its requests were cancelled; nothing is answered."""


class Run:
    """The engine requests of one API request, their events tagged with choice indices in one
    queue. A task watches the connection: when the client goes, every request is cancelled at the
    engine's next step, whether it is queued or running, streamed or not."""

    def __init__(self, request: Request, choices: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.gens: list[GenerationRequest] = []
        self.prompt_tokens: dict[int, int] = {}  # per engine request
        self.choices = choices
        self.watcher = asyncio.create_task(self._watch(request))

    def submit(self, engine: BatchEngine, ids: list[int], adapter: str | None, params: SamplingParams, indices: list[int]) -> None:
        def sink(event: Event) -> None:
            self.loop.call_soon_threadsafe(self._put, indices, event)

        gen = GenerationRequest(ids, adapter, params, sink)
        engine.submit(gen)
        self.gens.append(gen)

    def _put(self, indices: list[int], event: Event) -> None:
        for index in indices:
            self.events.put_nowait((index, event))

    async def _watch(self, request: Request) -> None:
        # after the body, receive() returns only when the client disconnects (or the response ends)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()

    def cancel(self) -> None:
        for gen in self.gens:
            gen.cancel()

    def close(self) -> None:
        self.watcher.cancel()
        self.cancel()  # no-op for finished requests; frees the rest when the consumer left early

    async def first(self) -> list[tuple[int, Event]]:
        """Events until every choice has started (a failed start is still an HTTP error)."""
        started: set[int] = set()
        early: list[tuple[int, Event]] = []
        while len(started) < self.choices:
            index, event = await self.events.get()
            if event.finish_reason == "cancelled":
                raise ClientGone
            if event.finish_reason == "error":
                self.close()
                raise ApiError(400 if event.client_error else 500, event.error or GENERATION_FAILED)
            started.add(index)
            early.append((index, event))
        return early

    async def all_events(self, early: list[tuple[int, Event]]) -> AsyncIterator[tuple[int, Event]]:
        """`early`, then every event until each choice has finished; pieces already waiting for a
        choice join into one event (when the batch outpaces the HTTP side, a chunk carries several
        tokens: per-chunk work is most of a small model's cost per token)."""
        open_ = set(range(self.choices))
        pending = list(early)
        try:
            while open_:
                if not pending:
                    pending.append(await self.events.get())
                    while not self.events.empty():
                        pending.append(self.events.get_nowait())
                for index, event in join_pieces(pending):
                    if event.finish_reason == "cancelled":
                        raise ClientGone
                    if event.finish_reason:
                        open_.discard(index)
                    yield index, event
                pending = []
        finally:
            self.close()


def join_pieces(events: list[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """Consecutive unfinished events of one choice as one (text and log-probabilities joined)."""
    out: list[tuple[int, Event]] = []
    for index, event in events:
        if out and out[-1][0] == index and not out[-1][1].finish_reason and not event.prompt_logprobs:
            prev = out[-1][1]
            logprobs = None if prev.logprobs is None and event.logprobs is None else [*(prev.logprobs or []), *(event.logprobs or [])]
            out[-1] = (
                index,
                dataclasses.replace(event, text=prev.text + event.text, logprobs=logprobs, prompt_logprobs=prev.prompt_logprobs),
            )
        else:
            out.append((index, event))
    return out


@dataclass
class Choice:
    """One choice's answer as it accumulates."""

    text: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    last: Event | None = None


async def collect(run: Run, early: list[tuple[int, Event]]) -> list[Choice]:
    choices = [Choice() for _ in range(run.choices)]
    async for index, event in run.all_events(early):
        choice = choices[index]
        if event.finish_reason == "error":
            raise ApiError(500, event.error or GENERATION_FAILED)
        choice.text += event.text
        choice.logprobs.extend(event.logprobs or [])
        if event.prompt_logprobs is not None:
            choice.prompt_logprobs = event.prompt_logprobs
        if event.finish_reason:
            choice.last = event
    return choices


def usage_of(finished: list[Event | None], prompts: list[list[int]]) -> dict[str, int]:
    """OpenAI counts each prompt once, and every choice's tokens."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(e.completion_tokens for e in finished if e is not None)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """Token id → (the token as OpenAI shows it, its text within the decoded answer, its UTF-8
    bytes). A SentencePiece piece decodes with its leading space only after another token, so
    each token is decoded after an anchor (a newline) and the anchor's text removed."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        anchor = tokenizer.encode("\n", add_special_tokens=False)
        self.anchor = anchor[-1:] if anchor else []
        self.anchor_text = tokenizer.decode(self.anchor) if anchor else ""
        self._cache: dict[int, tuple[str, str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            byte = BYTE_TOKEN.fullmatch(piece or "")
            if token in self.special:
                hit = (piece, "", [])
            elif byte:
                value = int(byte.group(1), 16)
                hit = (f"bytes:\\x{value:02x}", "", [value])
            else:
                text = self.tokenizer.decode([*self.anchor, token], clean_up_tokenization_spaces=False)[len(self.anchor_text) :]
                hit = (text, text, list(text.encode("utf-8")))
            self._cache[token] = hit
        return hit

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            shown, _, raw = self(token)
            return {"token": shown, "logprob": logprob, "bytes": raw}

        content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}

    def completion_logprobs(self, entries: list[TokenLogprob], offset: int, top: int) -> dict[str, Any]:
        """OpenAI's legacy shape; `top` alternatives plus the token itself (up to top + 1)."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for e in entries:
            shown, text, _ = self(e.token)
            tokens.append(shown)
            token_logprobs.append(e.logprob)
            offsets.append(offset)
            offset += len(text)
            if e.logprob is None:
                top_logprobs.append(None)
                continue
            alternatives = {self(t)[0]: lp for t, lp in e.top[:top]}
            alternatives.setdefault(shown, e.logprob)
            top_logprobs.append(alternatives)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON (whatever the Content-Type, as curl users forget it): at most `limit`
    bytes, no NaN/Infinity, integers of at most 4300 digits (Python's limit), nesting at most
    MAX_JSON_DEPTH deep; anything else a 400 (or 413), never a 500."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes (--max_request_bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes (--max_request_bytes)", code="request_too_large")
        chunks.append(chunk)

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(b"".join(chunks), parse_constant=no_constant)
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", code="invalid_json"
        ) from None
    except (ValueError, UnicodeDecodeError):  # an integer of more than 4300 digits, NaN/Infinity, bad UTF-8
        raise ApiError(
            400, "the request body is not valid JSON (bad UTF-8, NaN/Infinity, or a number too long)", code="invalid_json"
        ) from None
    if json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    return data


async def parse_body(request: Request, schema: type[M], limit: int) -> M:
    """The JSON body as `schema`; 400 naming the field otherwise."""
    data = await read_json(request, limit)
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    unsupported_fields(data, schema)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ApiError(400, f"{where or 'body'}: {message}", param=where or None) from None


class KeyAndErrors:
    """ASGI middleware: the API key on every request, and any unexpected exception as an
    OpenAI-shaped 500 with no internal text (the log has it). Plain ASGI (not Starlette's
    BaseHTTPMiddleware), so that the endpoints see the client's own disconnect."""

    def __init__(self, app: Any, server: OpenAIServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self.server.check_key(Request(scope))
        except ApiError as exc:
            await error_response(exc)(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                await error_response(ApiError(500, "internal server error (the server log has the details)"))(scope, receive, send)
        except asyncio.CancelledError:  # uvicorn cuts requests still open when a stop's grace period ends
            logger.info("%s %s: cut short by the server stopping", scope.get("method"), scope.get("path"))
            if not started:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await error_response(ApiError(503, "the server is stopping"))(scope, receive, send)


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI application (uvicorn runs it; tests may too)."""
    app = FastAPI(title="Chinese-Vicuna OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(KeyAndErrors, server=server)
    limit = server.limits.max_request_bytes
    texts = TokenTexts(server.tokenizer)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> JSONResponse:
        return JSONResponse(error_body(499, "the client closed the request"), status_code=499)  # never read

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "tokenizing": server.tokenizing, **server.engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        for card in server.models()["data"]:
            if card["id"] == model_id:
                return card
        raise ApiError(404, f"the model {model_id!r} does not exist; GET /v1/models lists the served models", code="model_not_found")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        body = await parse_body(request, ChatCompletionRequest, limit)
        adapter = server.adapter_of(body.model)
        template = server.registry.template(adapter)
        check_stream_options(body)
        server.prompt_too_long(sum(len(m.text()) for m in body.messages))
        ids = await server.tokenized(server.chat_prompt, template, body.model, body.messages)
        params = server.sampling(body, body.max_completion_tokens or body.max_tokens, len(ids), template.stop_strings, template.is_chat)
        params.logprobs, params.top_logprobs = body.logprobs, body.top_logprobs or 0
        run = server.start(request, server.jobs([ids], adapter, params, body.n))
        early = await run.first()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": body.model}
        if not body.stream:
            choices = await collect(run, early)
            return {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text},
                        "finish_reason": finish_reason(c.last),
                        "logprobs": texts.chat_logprobs(c.logprobs) if body.logprobs else None,
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": usage_of([c.last for c in choices], [ids]),
            }
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, delta: dict[str, str], reason: str | None, event: Event | None = None) -> str:
            logprobs = texts.chat_logprobs(event.logprobs or []) if body.logprobs and event is not None else None
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice], "usage": None})

        async def stream() -> AsyncIterator[str]:
            finished: list[Event | None] = [None] * run.choices
            for index in range(run.choices):
                yield chunk(index, {"role": "assistant", "content": ""}, None)
            async for index, event in run.all_events(early):
                if event.finish_reason == "error":
                    yield sse(error_body(500, event.error or GENERATION_FAILED))
                    return
                if event.text or event.logprobs:
                    yield chunk(index, {"content": event.text}, None, event)
                if event.finish_reason:
                    finished[index] = event
                    yield chunk(index, {}, finish_reason(event))
            if include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(finished, [ids])})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await parse_body(request, CompletionRequest, limit)
        adapter = server.adapter_of(body.model)
        check_stream_options(body)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]  # one prompt (text or token ids)
        if not prompt or len(prompt) > server.limits.max_prompts:
            raise ApiError(400, f"send 1 to {server.limits.max_prompts} prompts per request", param="prompt")
        prompts: list[list[int]] = []
        for one in prompt:
            if isinstance(one, str):
                server.prompt_too_long(len(one))
                prompts.append(await server.tokenized(server.completion_prompt_ids, one))
            else:
                server.check_token_ids(one)
                prompts.append(list(one))
        k = body.logprobs
        base_params = server.sampling(body, body.max_tokens, max(len(p) for p in prompts), [], False)
        if k is not None:
            base_params.logprobs, base_params.top_logprobs = True, k
            if body.echo:
                base_params.prompt_logprobs = k
        jobs = []
        for p, ids in enumerate(prompts):
            for job in server.jobs([ids], adapter, base_params, body.n):
                jobs.append((job[0], job[1], job[2], [p * body.n + i for i in job[3]]))
        run = server.start(request, jobs)
        early = await run.first()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}

        def prompt_text(index: int) -> str:
            one = prompt[index // body.n]
            return one if isinstance(one, str) else server.tokenizer.decode(one, skip_special_tokens=True)

        if not body.stream:
            choices = await collect(run, early)
            out = []
            for i, c in enumerate(choices):
                echoed = prompt_text(i) if body.echo else ""
                logprobs = None
                if k is not None:
                    entries = [*(c.prompt_logprobs or []), *c.logprobs] if body.echo else c.logprobs
                    logprobs = texts.completion_logprobs(entries, 0, k)
                out.append({"index": i, "text": echoed + c.text, "finish_reason": finish_reason(c.last), "logprobs": logprobs})
            return {**head, "choices": out, "usage": usage_of([c.last for c in choices], prompts)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            finished: list[Event | None] = [None] * run.choices
            offsets = [0] * run.choices
            echoed: set[int] = set()
            async for index, event in run.all_events(early):
                if event.finish_reason == "error":
                    yield sse(error_body(500, event.error or GENERATION_FAILED))
                    return
                text = event.text
                entries = list(event.logprobs or [])
                if body.echo and event.prompt_logprobs is not None:
                    entries = [*event.prompt_logprobs, *entries]
                if body.echo and index not in echoed:  # the prompt goes before the choice's first text
                    echoed.add(index)
                    text = prompt_text(index) + text
                if text or event.finish_reason or entries:
                    logprobs = texts.completion_logprobs(entries, offsets[index], k) if k is not None else None
                    offsets[index] += len(text)
                    reason = finish_reason(event) if event.finish_reason else None
                    choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}
                    yield sse({**head, "choices": [choice], "usage": None})
                if event.finish_reason:
                    finished[index] = event
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage_of(finished, prompts)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request) -> dict[str, str]:
        body = await parse_body(request, LoadLoraRequest, limit)
        server.check_lora_loading()
        if body.lora_name == server.base_name:
            raise ApiError(400, f"{body.lora_name!r} is the base model's name", param="lora_name")
        path = server.lora_path_under_root(body.lora_path)
        try:
            await run_in_threadpool(server.registry.register, body.lora_name, path)
        except UserError as exc:
            raise ApiError(400, str(exc), param="lora_path") from None
        return {"status": "ok", "message": f"LoRA {body.lora_name!r} added; it loads on first use"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request) -> dict[str, str]:
        body = await parse_body(request, UnloadLoraRequest, limit)
        server.check_lora_loading()
        try:
            server.registry.unregister(body.lora_name)
        except KeyError:
            raise ApiError(404, f"the LoRA {body.lora_name!r} is not served", param="lora_name", code="model_not_found") from None
        return {"status": "ok", "message": f"LoRA {body.lora_name!r} removed"}

    return app


def check_stream_options(body: _SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options needs stream: true", param="stream_options")


def serve_app(app: FastAPI, host: str, port: int, on_stop: Callable[[], None] | None = None) -> None:
    """Run under uvicorn until SIGTERM or Ctrl-C. On a signal, `on_stop` runs at once (the engine
    ends waiting requests), then open connections get `SHUTDOWN_GRACE_SECONDS` before they are
    cut: a stop takes a few seconds whatever the server is doing."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if on_stop is not None and not self.should_exit:
                threading.Thread(target=on_stop, name="stop-engine", daemon=True).start()
            super().handle_exit(sig, frame)

    logger.info("serving the OpenAI API on http://%s:%d/v1", host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
    with contextlib.suppress(KeyboardInterrupt):
        Server(config).run()
