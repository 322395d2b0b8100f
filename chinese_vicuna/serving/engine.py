"""Step-level batched decoding over one base model and many LoRAs (the API server's engine).

One scheduler thread owns the model. Each turn of its loop it
1. drops requests whose client went away (their slot is free at once),
2. admits waiting requests up to `max_batch_size`: loads each request's LoRA if needed
   (`AdapterRegistry`, LRU), runs the new prompts together (prefill, left-padded, with a mask)
   and adds their KV caches to the batch, left-padded to the batch's length,
3. runs ONE decoding step for every active request together: the last token of each row,
   a 2-D attention mask that hides the padding, per-row positions, and PEFT's
   `adapter_names=` so that rows of different LoRAs (and of the bare base) share the step.
   The step's cache keeps spare columns (`GrowingLayer`), so a step writes one column
   instead of copying the whole cache.

Finished rows leave the batch at once and padding columns no row needs any more are cut, so
a request never waits for a longer neighbour. Padding is masked everywhere, so a greedy answer
is the one the request gets decoded by itself (tests compare them token for token).

Text goes out through the same `AnswerText` (infer/generation.py) as the web pages:
no broken UTF-8, no stop string shown, and the streamed pieces joined equal the whole answer.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.generation import AnswerText, model_device
from chinese_vicuna.serving.adapters import AdapterRegistry

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests wait than `max_queue` allows (the API answers 429)."""


@dataclass
class SamplingParams:
    """How one request decodes. `temperature` 0 is greedy; `seed` makes sampling repeatable
    whatever else is in the batch (each request samples from its own generator).

    `logit_bias` ({token id: bias}) and the OpenAI penalties (`frequency_penalty` × times a token
    was generated + `presence_penalty` if it was) change the scores before greedy or sampling;
    `logprobs` reports each generated token's log-probability (of the model's own distribution,
    before bias, penalties and temperature) with the `top_logprobs` best; `prompt_logprobs`
    (a count of alternatives, None = off) does the same for every prompt token. `max_tokens` 0
    runs the prompt only (`echo` of prompt log-probabilities)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    strip: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None

    @property
    def plain(self) -> bool:
        """Greedy on the raw scores: the batch's argmax gives the token."""
        return self.temperature <= 0 and not self.logit_bias and not self.frequency_penalty and not self.presence_penalty


@dataclass
class TokenLogprob:
    """One token's log-probability and the `top` best alternatives as (id, log-probability)."""

    token: int
    logprob: float | None  # None: the first prompt token (nothing before it)
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """What a request's consumer receives: text pieces, then one event with `finish_reason`."""

    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    client_error: bool = False  # the request was at fault (e.g. its LoRA cannot load): a 400
    logprobs: list[TokenLogprob] | None = None  # the generated tokens whose text this event shows
    prompt_logprobs: list[TokenLogprob] | None = None  # on a request's first event, when asked


_ids = itertools.count(1)


class GenerationRequest:
    """One prompt for one model (`adapter` None = the base). `sink` gets every `Event`,
    called on the scheduler thread; it must not block."""

    def __init__(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, sink: Callable[[Event], None]) -> None:
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.adapter = adapter
        self.params = params
        self.sink = sink
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """The client is gone: the engine frees the slot before its next step."""
        self.cancelled.set()


class _Slot:
    """An active request: its decoding state between steps."""

    def __init__(self, request: GenerationRequest, tokenizer: Any) -> None:
        self.request = request
        self.params = request.params
        self.text = AnswerText(tokenizer, request.params.stop, request.params.strip)
        self.length = len(request.prompt_ids)  # real tokens in the KV cache
        self.next_token = -1  # sampled, not yet fed to the model
        self.generated = 0  # tokens produced (EOS included)
        self.done = False
        self.counts: collections.Counter[int] = collections.Counter()  # generated tokens, for the penalties
        self.pending_logprobs: list[TokenLogprob] = []  # tokens whose text is not shown yet
        self.prompt_logprobs: list[TokenLogprob] | None = None  # sent with the first event
        self.generator: torch.Generator | None = None
        if request.params.temperature > 0:
            self.generator = torch.Generator()
            if request.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(int(request.params.seed))


def top_of(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = logprobs.topk(k)
    return list(zip(ids.tolist(), values.tolist()))


def pick_token(logits: torch.Tensor, slot: _Slot) -> tuple[int, TokenLogprob | None]:
    """One row's token (greedy or temperature + top-p sampling, after bias and penalties) and,
    when asked, its log-probability."""
    p = slot.params
    scores = logits.float()
    logprobs = torch.log_softmax(scores, dim=-1) if p.logprobs else None
    if p.logit_bias or p.frequency_penalty or p.presence_penalty:
        scores = scores.clone()
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=scores.device)
        scores[ids] += torch.tensor(list(p.logit_bias.values()), dtype=scores.dtype, device=scores.device)
    if slot.counts and (p.frequency_penalty or p.presence_penalty):
        ids = torch.tensor(list(slot.counts), dtype=torch.long, device=scores.device)
        counts = torch.tensor(list(slot.counts.values()), dtype=scores.dtype, device=scores.device)
        scores[ids] -= counts * p.frequency_penalty + p.presence_penalty
    if p.temperature <= 0:
        token = int(scores.argmax())
    else:
        probs = torch.softmax(scores / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(-1)
            drop = cumulative - sorted_probs >= p.top_p  # keep the smallest set reaching top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        token = int(torch.multinomial(probs, 1, generator=slot.generator).item())
    if logprobs is None:
        return token, None
    return token, TokenLogprob(token, float(logprobs[token]), top_of(logprobs, p.top_logprobs))


def pick_tokens(logits: torch.Tensor, slots: list[_Slot]) -> list[tuple[int, TokenLogprob | None] | None]:
    """One token per row: the batch's argmax for plain greedy rows, `pick_token` for the others.
    A row that fails (its own numbers) is None and is logged: the other rows are unaffected."""
    greedy = logits.argmax(dim=-1).tolist()
    picked: list[tuple[int, TokenLogprob | None] | None] = []
    for row, slot in enumerate(slots):
        if slot.params.plain and not slot.params.logprobs:
            picked.append((int(greedy[row]), None))
            continue
        try:
            picked.append(pick_token(logits[row], slot))
        except Exception:
            logger.exception("request %d: picking a token failed", slot.request.id)
            picked.append(None)
    return picked


def prompt_token_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it (`logits`: the prompt's
    rows, one per token); the first has none."""
    entries = [TokenLogprob(ids[0], None, [])]
    if len(ids) > 1:
        logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
        targets = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        tops = logprobs.topk(k, dim=-1) if k > 0 else None
        for i, token in enumerate(ids[1:]):
            top = list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if tops is not None else []
            entries.append(TokenLogprob(token, chosen[i], top))
    return entries


GENERATION_FAILED = "generation failed for this request (the server log has the details)"


# Padded prompt tokens per prefill pass: enough for the matmuls to run near their best, few
# enough that the first requests of a burst get their first token without waiting for all.
PREFILL_TOKENS = 256


def prefill_groups(requests: list[GenerationRequest], budget: int) -> list[list[GenerationRequest]]:
    """`requests` in order, cut into groups whose padded size (rows × longest prompt) stays within
    `budget` tokens; a longer prompt goes alone."""
    groups: list[list[GenerationRequest]] = []
    width = 0
    for request in requests:
        new_width = max(width, len(request.prompt_ids))
        if groups and new_width * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(request)
            width = new_width
        else:
            groups.append([request])
            width = len(request.prompt_ids)
    return groups


class BatchEngine:
    """Requests in (`submit`), events out; decoding runs on one background thread."""

    def __init__(self, registry: AdapterRegistry, tokenizer: Any, max_batch_size: int = 16, max_queue: int = 64) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise UserError(f"--max_batch_size must be >= 1 and --max_queue >= 0 (got {max_batch_size}, {max_queue})")
        self.registry = registry
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.device = model_device(registry.model)
        self._cond = threading.Condition()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._slots: list[_Slot] = []
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, [batch, heads, T, dim]
        self._mask: torch.Tensor | None = None  # [batch, T]: 1 = a real token
        self._step_cache: DynamicCache | None = None  # the decoding steps' cache; rebuilt when rows change
        self._closed = False
        self._inflight = 0  # taken from the queue and not finished (in prefill or active)
        self.steps = 0
        self.finished = 0
        self.cancelled = 0  # requests whose client left, queued or running
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    # --- public ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; raises QueueFull beyond `max_queue` waiting requests."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) + self._inflight >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max_queue {self.max_queue}); retry later")
            self._waiting.append(request)
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        """Counts for /health and the load test: a leaked slot shows as `active` > 0 when idle."""
        with self._cond:
            return {
                "active": len(self._slots),
                "inflight": self._inflight,
                "waiting": len(self._waiting),
                "steps": self.steps,
                "finished": self.finished,
                "cancelled": self.cancelled,
                "cache_tokens": 0 if self._mask is None else int(self._mask.shape[1]),
                "loaded_loras": self.registry.loaded(),
            }

    def close(self, timeout: float = 30) -> None:
        """Stop: waiting requests end with an error at once; the step in progress finishes
        (within `timeout`; the thread is a daemon)."""
        with self._cond:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify()
        for request in waiting:
            request.sink(Event(finish_reason="error", error="the server is shutting down"))
        self._thread.join(timeout=timeout)

    # --- the scheduler thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._slots:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    self._admit()
                    if self._slots:
                        self._step()
            except Exception:  # a failed step fails its requests, never the server
                logger.exception("decoding step failed")
                with self._cond:
                    slots, self._slots = self._slots, []
                    self._cache, self._mask, self._step_cache = [], None, None
                for slot in slots:
                    if not slot.done:
                        self._finish(slot, "error", error=GENERATION_FAILED)
        with self._cond:
            leftover = list(self._waiting) + [s.request for s in self._slots]
            self._waiting.clear()
        for request in leftover:
            request.sink(Event(finish_reason="error", error="the server is shutting down"))

    def _in_use(self) -> set[str]:
        return {s.request.adapter for s in self._slots if s.request.adapter is not None}

    def _drop_cancelled(self) -> None:
        with self._cond:
            for request in [r for r in self._waiting if r.cancelled.is_set()]:
                self._waiting.remove(request)
                self.cancelled += 1
                request.sink(Event(finish_reason="cancelled"))
        gone = [i for i, s in enumerate(self._slots) if s.request.cancelled.is_set()]
        for i in gone:
            self._slots[i].done = True
            self.cancelled += 1
            self._finish(self._slots[i], "cancelled")
        if gone:
            self._keep_rows([i for i, s in enumerate(self._slots) if not s.done])

    def _admit(self) -> None:
        deferred: list[GenerationRequest] = []
        admitted: list[GenerationRequest] = []
        while len(self._slots) + len(admitted) < self.max_batch_size:
            with self._cond:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
                self._inflight += 1
            if request.cancelled.is_set():
                self.cancelled += 1
                self._end_early(request, Event(finish_reason="cancelled"))
                continue
            if request.adapter is not None:
                in_use = self._in_use() | {r.adapter for r in admitted if r.adapter is not None}
                try:
                    if not self.registry.ensure_loaded(request.adapter, in_use):
                        deferred.append(request)  # every loaded LoRA is busy: wait for one to finish
                        continue
                except UserError as exc:
                    self._end_early(request, Event(finish_reason="error", error=str(exc), client_error=True))
                    continue
                except Exception:  # this request fails, never the queue behind it
                    logger.exception("request %d: loading LoRA %r failed", request.id, request.adapter)
                    self._end_early(request, Event(finish_reason="error", error=GENERATION_FAILED))
                    continue
            admitted.append(request)
        for group in prefill_groups(admitted, PREFILL_TOKENS):
            slots = []
            for request in group:  # a request whose settings fail fails alone
                try:
                    slots.append(_Slot(request, self.tokenizer))
                except Exception:
                    logger.exception("request %d: its sampling settings failed", request.id)
                    self._end_early(request, Event(finish_reason="error", error=GENERATION_FAILED))
            if not slots:
                continue
            try:
                self._prefill(slots)
            except Exception:  # these requests fail; the batch carries on
                logger.exception("prefill failed")
                for slot in slots:
                    if not slot.done:
                        self._end_early(slot.request, Event(finish_reason="error", error=GENERATION_FAILED))
        if deferred:
            with self._cond:
                self._waiting.extendleft(reversed(deferred))
                self._inflight -= len(deferred)

    def _end_early(self, request: GenerationRequest, event: Event) -> None:
        """A request taken from the queue that ends before it has a slot."""
        with self._cond:
            self._inflight -= 1
        request.sink(event)

    def _forward(self, input_ids: torch.Tensor, adapters: list[str | None], **kwargs: Any) -> Any:
        names = self.registry.adapter_names(adapters)
        if names is not None:
            kwargs["adapter_names"] = names
        return self.registry.model(input_ids=input_ids, use_cache=True, **kwargs)

    def _prefill(self, slots: list[_Slot]) -> None:
        """The prompts of newly admitted requests in one forward pass, left-padded to the longest
        (the mask hides the padding, positions count real tokens only), then their caches join the batch."""
        requests = [s.request for s in slots]
        width = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], dtype=torch.long, device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests], dtype=torch.long, device=self.device
        )
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self._forward(ids, [r.adapter for r in requests], attention_mask=mask, position_ids=positions, cache=DynamicCache())
        for row, slot in enumerate(slots):
            k = slot.params.prompt_logprobs
            if k is not None:
                n = len(slot.request.prompt_ids)
                slot.prompt_logprobs = prompt_token_logprobs(out.logits[row, width - n :], slot.request.prompt_ids, k)
        for slot, picked in zip(slots, pick_tokens(out.logits[:, -1, :], slots)):
            if slot.params.max_tokens <= 0:  # the prompt alone (echo)
                self._finish(slot, "length")
            else:
                self._accept(slot, picked)
        cache = [(layer.keys, layer.values) for layer in out.cache.layers]
        self._add_rows(slots, cache, mask)
        if any(s.done for s in slots):  # answered by their first token
            self._keep_rows([i for i, s in enumerate(self._slots) if not s.done])

    def _add_rows(self, slots: list[_Slot], cache: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Append new rows' caches to the batch, left-padding whichever side is shorter."""
        if self._mask is not None:
            width = max(mask.shape[1], self._mask.shape[1])
            old = [(_pad_left(k, width), _pad_left(v, width)) for k, v in self._cache]
            new = [(_pad_left(k, width), _pad_left(v, width)) for k, v in cache]
            cache = [(torch.cat([ko, kn]), torch.cat([vo, vn])) for (ko, vo), (kn, vn) in zip(old, new)]
            mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
        with self._cond:
            self._cache, self._mask, self._step_cache = cache, mask, None
            self._slots.extend(slots)

    def _keep_rows(self, rows: list[int]) -> None:
        """Keep only `rows` of the batch, and cut the padding columns no kept row needs."""
        if not rows:
            cache, mask = [], None
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            mask = self._mask.index_select(0, index)
            start = int((mask.sum(0) > 0).nonzero()[0])  # first column some row still uses
            mask = mask[:, start:]
            cache = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self._cache]
        with self._cond:
            self._slots = [self._slots[i] for i in rows]
            self._cache, self._mask, self._step_cache = cache, mask, None

    def _step(self) -> None:
        slots = self._slots
        tokens = torch.tensor([[s.next_token] for s in slots], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.length] for s in slots], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, torch.ones(len(slots), 1, dtype=torch.long, device=self.device)], dim=1)
        if self._step_cache is None:
            self._step_cache = DynamicCache()
            self._step_cache.layers = [GrowingLayer(k, v) for k, v in self._cache]
        out = self._forward(
            tokens,
            [s.request.adapter for s in slots],
            attention_mask=mask,
            position_ids=positions,
            cache=self._step_cache,
        )
        self._cache = [(layer.keys, layer.values) for layer in self._step_cache.layers]
        self._mask = mask
        self.steps += 1
        for slot, picked in zip(slots, pick_tokens(out.logits[:, -1, :], slots)):
            slot.length += 1
            self._accept(slot, picked)
        if any(s.done for s in slots):
            self._keep_rows([i for i, s in enumerate(slots) if not s.done])

    def _accept(self, slot: _Slot, picked: tuple[int, TokenLogprob | None] | None) -> None:
        """A new token: emit the text it makes visible, and end the request when it should."""
        if picked is None:  # picking this row's token failed (logged)
            self._finish(slot, "error", error=GENERATION_FAILED)
            return
        token, logprob = picked
        slot.generated += 1
        if token == self.eos_id:
            self._finish(slot, "stop")
            return
        slot.counts[token] += 1
        if logprob is not None:
            slot.pending_logprobs.append(logprob)
        piece = slot.text.push([token])
        if slot.text.stopped:
            if piece:
                self._emit(slot, Event(text=piece))
            slot.pending_logprobs.clear()  # the stop string's tokens: their text is never shown
            self._finish(slot, "stop", flush=False)
            return
        if slot.generated >= slot.params.max_tokens:
            if piece:
                self._emit(slot, Event(text=piece))
            self._finish(slot, "length")
            return
        slot.next_token = token
        if piece or slot.generated == 1:  # the first event tells the client its request started
            self._emit(slot, Event(text=piece))

    def _emit(self, slot: _Slot, event: Event) -> None:
        """Send `event` with the log-probabilities of the tokens whose text it shows (when asked)
        and, on the first, the prompt's."""
        if slot.params.logprobs and (event.text or event.finish_reason):
            event.logprobs, slot.pending_logprobs = slot.pending_logprobs, []
        if slot.prompt_logprobs is not None:
            event.prompt_logprobs, slot.prompt_logprobs = slot.prompt_logprobs, None
        slot.request.sink(event)

    def _finish(self, slot: _Slot, reason: str, flush: bool = True, error: str | None = None) -> None:
        slot.done = True
        text = ""
        if flush and reason in ("stop", "length") and not slot.text.stopped:
            text = slot.text.finish()
        with self._cond:
            self.finished += 1
            self._inflight -= 1
        event = Event(
            text=text,
            finish_reason=reason,
            prompt_tokens=len(slot.request.prompt_ids),
            completion_tokens=slot.generated,
            error=error,
        )
        if reason == "error":
            slot.request.sink(event)
        else:
            self._emit(slot, event)


class GrowingLayer(DynamicLayer):
    """One layer's keys and values in a buffer with spare columns: a decoding step writes its
    column in place, where `DynamicLayer` copies the whole cache (`torch.cat`) every step, the
    largest cost of a batched step on the CPU. `keys` / `values` are views of the filled part."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self._fill(keys, values)

    def _fill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        length = keys.shape[2]
        spare = max(64, length)  # doubling: each column is copied O(1) times on average
        self._key_buffer = keys.new_empty(*keys.shape[:2], length + spare, keys.shape[3])
        self._value_buffer = values.new_empty(*values.shape[:2], length + spare, values.shape[3])
        self._key_buffer[:, :, :length] = keys
        self._value_buffer[:, :, :length] = values
        self._length = length
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[2]
        if self._length + new > self._key_buffer.shape[2]:
            self._fill(self.keys, self.values)
        end = self._length + new
        self._key_buffer[:, :, self._length : end] = key_states
        self._value_buffer[:, :, self._length : end] = value_states
        self._length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the sequence dimension (dim 2 of a KV tensor, dim 1 of a mask) up to `width`."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
